"""Resumable sweeps: the finished part of a profiling run, on disk, and the run around it.

`ProfileRun` is one run, in memory (steps are calibration batches) or streamed (steps are
decoder layers): its collector, its checkpoints and its `ProfileResult`. `fingerprint` says
what must match for a resume (`model_identity` / `checkpoint_identity`: which weights);
`SweepCheckpoint` writes, verifies and reads the files.

A checkpoint directory holds, per rank, ``state.<rank>.json`` (progress, a fingerprint of the
run's settings, and the name, size and SHA-256 of every file of the last finished step), the
tensors of that step: ``stats.<rank>.<step>.safetensors`` (the collector's running stats)
and, for layer-streaming runs, ``hidden.<rank>.<step>.safetensors`` (the hidden states
entering the next layer), and ``lock.<rank>``, the lock a running process holds (a second
run on the same directory is refused, naming the holder's pid).

Every file is written under a temporary name and renamed into place; a step's tensor files
come first, the state file last, then the previous step's files are deleted. An interrupt
at any point leaves the last finished step complete, and ``--resume`` continues from it
after checking every file the state names; what an interrupt left behind (temporary files,
a step the state does not name) is deleted when the next run on the directory starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .collector import StatsCollector, StatsTables
from .files import TMP_SUFFIX, DirLock, atomic_path, check_output_dir, write_json_atomic
from .result import ProfileResult

# Elements of each parameter that go into the in-memory weights digest.
_DIGEST_SAMPLES = 256


def fingerprint(tokens: torch.Tensor, **settings) -> dict:
    """What must match for a checkpoint to be resumed: the tokens (hashed) and settings."""
    digest = hashlib.sha256(tokens.cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"tokens_sha256": digest, "tokens_shape": list(tokens.shape), **settings}


def checkpoint_identity(model_dir: str | Path) -> dict:
    """Which checkpoint directory a streamed run reads: its path, the SHA-256 of its
    config.json and the size and mtime of every safetensors file (a rewritten checkpoint
    changes them)."""
    d = Path(model_dir).resolve()
    shards = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.glob("*.safetensors"))}
    return {
        "model": str(d),
        "config_sha256": _sha256_file(d / "config.json"),
        "weights": shards,
    }


def model_identity(model: torch.nn.Module) -> dict:
    """Which weights an in-memory run profiles: the model's source path, the SHA-256 of its
    config, its parameter dtypes, and a digest of every parameter's name, shape, dtype and
    `_DIGEST_SAMPLES` elements spread over it (any other checkpoint, or the same one changed,
    differs there; reading them costs milliseconds, not a pass over the weights)."""
    config = model.config.to_dict()
    config_text = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha256()
    dtypes = set()
    for name, p in model.named_parameters():
        dtypes.add(str(p.dtype))
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(_DIGEST_SAMPLES, flat.numel()), device=flat.device).long()
        digest.update(flat[index].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "weights": digest.hexdigest(),
        "dtype": sorted(dtypes),
    }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class SweepCheckpoint:
    """Checkpoints of one rank of one run in `directory`: `open` (lock, checks, clean-up)
    before anything else, `close` at the end."""

    def __init__(self, directory: str | Path, fingerprint: dict, rank: int = 0):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.rank = rank
        self._state_file = self.dir / f"state.{rank}.json"
        self._lock = DirLock(self.dir, f"lock.{rank}", "--checkpoint-dir")
        self._state: dict | None = None  # what the state file held when opened
        self._mine = re.compile(rf"^\.?(stats|hidden|state)\.{rank}\.")

    def _names(self, step: int) -> tuple[str, str]:
        return f"stats.{self.rank}.{step}.safetensors", f"hidden.{self.rank}.{step}.safetensors"

    def open(self, resume: bool) -> int | None:
        """Take this rank's lock on the directory, read its state, refuse to start over a
        checkpoint without `resume`, and delete what an interrupted run left behind.
        Returns the saved progress (None: no checkpoint)."""
        check_output_dir(self.dir, "--checkpoint-dir")
        self._lock.acquire()
        try:
            self._state = self._read_state()
            progress = None if self._state is None else self._state["progress"]
            if progress is not None and not resume:
                raise ValueError(
                    f"--checkpoint-dir {self.dir} holds a checkpoint of an earlier run ({progress} steps done); "
                    "pass --resume (resume=True) to continue it, or remove it or use another directory"
                )
            self._remove_leftovers()
        except BaseException:
            self.close()
            raise
        return progress

    def close(self) -> None:
        """Release the directory's lock."""
        self._lock.release()

    def _read_state(self) -> dict | None:
        if not self._state_file.is_file():
            return None
        try:
            state = json.loads(self._state_file.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError(f"a JSON {type(state).__name__}, not an object")
            for key, kind in (("progress", int), ("token_offset", int), ("fingerprint", dict), ("files", dict)):
                if not isinstance(state.get(key), kind):
                    raise ValueError(f"no {kind.__name__} {key!r}")
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(
                f"--checkpoint-dir: {self._state_file} is not a checkpoint state this version can read ({e}); "
                "remove it (and the checkpoint) or use another --checkpoint-dir"
            ) from None
        return state

    def _remove_leftovers(self) -> None:
        """Delete this rank's files that the state does not name: temporary files of an
        interrupted write, and steps an interrupt kept from being deleted."""
        keep = {self._state_file.name, *(self._state["files"] if self._state else ())}
        for f in self.dir.iterdir():
            if f.is_file() and self._mine.match(f.name) and (f.name not in keep or f.name.endswith(TMP_SUFFIX)):
                f.unlink(missing_ok=True)

    def save(self, stats: StatsCollector, progress: int, hidden: list[torch.Tensor] | None = None) -> None:
        """Record that `progress` steps (batches or layers) are done, with their stats."""
        stats_name, hidden_name = self._names(progress)
        tensors = {stats_name: {k: v.cpu() for k, v in stats.flat_tensors().items()}}
        if hidden is not None:
            tensors[hidden_name] = {str(i): h.cpu().contiguous() for i, h in enumerate(hidden)}
        files = {}
        for name, content in tensors.items():
            with atomic_path(self.dir / name) as tmp:
                save_file(content, str(tmp))
                files[name] = {"bytes": tmp.stat().st_size, "sha256": _sha256_file(tmp)}
        previous = self._state
        self._state = {"progress": progress, "token_offset": stats.token_offset, "fingerprint": self.fingerprint, "files": files}
        write_json_atomic(self._state_file, self._state)
        for name in previous["files"] if previous else ():
            if name not in files:
                (self.dir / name).unlink(missing_ok=True)

    def _verify(self) -> None:
        state = self._state
        if state["fingerprint"] != self.fingerprint:
            changed = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint)
                             if state["fingerprint"].get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"--resume: the checkpoint in {self.dir} was made with other settings ({', '.join(changed)}); "
                "use the same model, calibration and options, or another --checkpoint-dir"
            )
        for name, meta in state["files"].items():
            path = self.dir / name
            problem = None
            if not path.is_file():
                problem = "is missing"
            elif path.stat().st_size != meta.get("bytes"):
                problem = f"has {path.stat().st_size} bytes, not the {meta.get('bytes')} written"
            elif _sha256_file(path) != meta.get("sha256"):
                problem = "does not match the SHA-256 recorded when it was written"
            if problem:
                raise ValueError(
                    f"--resume: the checkpoint in {self.dir} is incomplete: {name} {problem} ({self._state_file.name} "
                    "names it); it cannot be resumed: remove the checkpoint or use another --checkpoint-dir"
                )

    def load(self, stats: StatsCollector, device: torch.device) -> tuple[int, list[torch.Tensor] | None]:
        """Fill `stats` from the last finished step; return (progress, hidden states or None).
        Raises ValueError when the checkpoint was made with other tokens or settings, or when
        a file it names is missing or differs from what was written."""
        self._verify()
        state = self._state
        stats_name, hidden_name = self._names(state["progress"])
        stats.load_tables(StatsTables.tables_from_flat(load_file(str(self.dir / stats_name)), device))
        stats.token_offset = state["token_offset"]
        hidden = None
        if hidden_name in state["files"]:
            saved = load_file(str(self.dir / hidden_name))
            hidden = [saved[str(i)] for i in range(len(saved))]
        return state["progress"], hidden


class ProfileRun:
    """One profiling run of `steps` steps over ``calibration [N, L]``: its `StatsCollector`
    (`stats`), its checkpoints when `checkpoint_dir` is given, and its `ProfileResult`.

    ``settings`` are what else the resume fingerprint holds (model identity, dtype, batch
    size, ...). Use: `start`, run the steps inside `timed`, `step_done` after each, `result`.
    """

    def __init__(
        self,
        calibration: torch.Tensor,
        *,
        steps: int,
        num_sink_tokens: int,
        top_k_hidden: int,
        checkpoint_dir: str | Path | None = None,
        save_every: int = 1,
        rank: int = 0,
        **settings,
    ):
        self.calibration = calibration
        self.steps = steps
        self.num_sink_tokens = num_sink_tokens
        self.save_every = save_every
        self.stats = StatsCollector(top_k_hidden=top_k_hidden, num_sink_tokens=num_sink_tokens)
        self.checkpoint = None
        if checkpoint_dir is not None:
            run = fingerprint(calibration, num_sink_tokens=num_sink_tokens, top_k_hidden=top_k_hidden, **settings)
            self.checkpoint = SweepCheckpoint(checkpoint_dir, run, rank)
        self.done = 0  # steps finished by an earlier process (resume)
        self.elapsed_s = 0.0

    def start(self, device: torch.device, resume: bool = False) -> list[torch.Tensor] | None:
        """Open the checkpoint directory (see `SweepCheckpoint.open`: lock, checks, clean-up)
        and, with `resume` and a checkpoint there, continue from its last step: fill `stats`,
        set `done`, and return the saved hidden states (streamed runs; else None)."""
        if self.checkpoint is None or self.checkpoint.open(resume) is None:
            return None
        try:
            self.done, hidden = self.checkpoint.load(self.stats, device)
        except BaseException:
            self.checkpoint.close()
            raise
        return hidden

    @contextmanager
    def timed(self) -> Iterator[None]:
        """The block that runs the steps: its wall time counts as the run's, and when it ends
        (finished or not) the checkpoint directory is released for another run."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.elapsed_s += time.perf_counter() - start
            if self.checkpoint is not None:
                self.checkpoint.close()

    def step_done(self, steps_done: int, hidden: list[torch.Tensor] | None = None) -> None:
        """`steps_done` steps are finished: save every `save_every` steps and after the last."""
        if self.checkpoint is not None and (steps_done % self.save_every == 0 or steps_done == self.steps):
            self.checkpoint.save(self.stats, steps_done, hidden)

    def result(self, **model_meta) -> ProfileResult:
        """The run's `ProfileResult` (stats on the CPU) with the model's metadata."""
        return ProfileResult.from_collector(
            self.stats,
            **model_meta,
            seq_len=self.calibration.shape[1],
            num_sequences=self.calibration.shape[0],
            num_sink_tokens=self.num_sink_tokens,
            elapsed_s=self.elapsed_s,
            work_fraction=(self.steps - self.done) / self.steps,
        )
