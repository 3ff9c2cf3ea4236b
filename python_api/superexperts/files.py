"""Files the toolkit writes: atomic replacement, output-directory checks, and the lock file
that keeps a second run out of a checkpoint directory.

- `atomic_path`: write to a temporary name in the same directory, rename over the target
  on success (a reader, or a crash, never sees a half-written file);
- `check_output_dir`: refuse, before any long work, a directory that cannot be written;
- `DirLock`: an exclusive ``fcntl`` lock on a file in a directory, holding the owner's pid
  (the kernel drops it when the owner dies, so a stale lock is taken over).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (``.<name>.<random>.tmp``) for the block to write;
    when the block ends without an error it replaces `path` (``os.replace``), else it is
    removed."""
    path = Path(path)
    # Not mkstemp: the file is created by the writer, with the permissions the umask gives.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data) -> Path:
    """Write `data` as indented JSON to `path` atomically (NaN/inf must be encoded already:
    `allow_nan=False` refuses them)."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False))


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Make sure `path` is, or can be made, a writable directory: create it (and its parents)
    and write and remove a probe file. Raises ValueError naming `flag` otherwise."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == path else f"is under {parent}, which is a file"
            raise ValueError(f"{flag} {path} {what}; it must be a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not a writable directory ({e.strerror or e})") from None
    return path


class LockedError(RuntimeError):
    """Another live process holds the lock."""


class DirLock:
    """An exclusive lock on ``directory/name``, released by `release` (or by the process's end).

    The file holds ``{"pid": ..., "host": ...}`` of the holder, for the message that refuses a
    second writer. The lock is ``fcntl.flock``: the kernel drops it when its holder exits or is
    killed, so the lock file a dead run leaves behind is taken over. (Where there is no
    ``fcntl``, as on Windows, nothing is locked.)
    """

    def __init__(self, directory: str | Path, name: str, what: str):
        self.path = Path(directory) / name
        self.what = what
        self._file = None

    def acquire(self) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            import fcntl
        except ImportError:
            fcntl = None
        try:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.path)
            f.close()
            who = f"process {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
            raise LockedError(
                f"{self.what} {self.path.parent} is in use by {who} (lock file {self.path}); "
                "wait for it to finish, stop it, or use another directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __del__(self):
        self.release()


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}

