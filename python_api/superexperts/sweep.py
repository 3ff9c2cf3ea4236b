"""Resumable sweeps: the finished part of a profiling run, on disk, and the run around it.

`ProfileRun` is one run, in memory (steps are calibration batches) or streamed (steps are
decoder layers): its collector, its checkpoints and its `ProfileResult`. `fingerprint` says
what must match for a resume (`model_identity` / `checkpoint_identity`: which weights);
`SweepCheckpoint` writes, verifies and reads the files.

A checkpoint directory holds, per rank, ``state.<rank>.json`` (a fingerprint of the run's
settings and, for the last finished step, its progress and the name, size and SHA-256 of
each of its files), the tensors of that step: ``stats.<rank>.<step>.safetensors`` (the
collector's running stats) and, for layer-streaming runs, ``hidden.<rank>.<step>.safetensors``
(the hidden states entering the next layer), and ``lock.<rank>``, the lock a running process
holds (a second run on the same directory is refused, naming the holder's pid).

Every file is written under a temporary name and renamed into place; a step's tensor files
come first, the state file next, and the previous step is deleted last (with several ranks,
once every rank has saved the new one, so that ranks stopped while saving can still resume
from a step they all hold). An interrupt at any point leaves the last finished step
complete, and ``--resume`` continues from it after checking every file the state names; what
an interrupt left behind (temporary files, a step the state does not name) is deleted when
the next run on the directory starts.
"""

from __future__ import annotations

import hashlib
import json
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
# The temporary file safetensors writes a file to before renaming it (Rust's tempfile naming).
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


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
    before anything else, `close` at the end.

    The state file lists the steps on disk, oldest first, each with its progress, token offset
    and files. Normally one; `save` adds the new step and `commit` (immediately in one process,
    after all ranks saved in several) drops the older one, so that ranks killed while saving can
    still agree on a step all of them hold.
    """

    def __init__(self, directory: str | Path, fingerprint: dict, rank: int = 0):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.rank = rank
        self._state_file = self.dir / f"state.{rank}.json"
        self._lock = DirLock(self.dir, f"lock.{rank}", "--checkpoint-dir")
        self._steps: list[dict] = []  # as in the state file
        self._saved_fingerprint: dict | None = None
        self._mine = re.compile(rf"^\.?(stats|hidden|state)\.{rank}\.")

    def _names(self, step: int) -> tuple[str, str]:
        return f"stats.{self.rank}.{step}.safetensors", f"hidden.{self.rank}.{step}.safetensors"

    def open(self, resume: bool) -> list[int]:
        """Take this rank's lock on the directory, read its state, refuse to start over a
        checkpoint without `resume`, and delete what an interrupted run left behind.
        Returns the progress of the steps on disk (empty: no checkpoint)."""
        check_output_dir(self.dir, "--checkpoint-dir")
        self._lock.acquire()
        try:
            self._read_state()
            if self._steps and not resume:
                raise ValueError(
                    f"--checkpoint-dir {self.dir} holds a checkpoint of an earlier run ({self._steps[-1]['progress']} "
                    "steps done); pass --resume (resume=True) to continue it, or remove it or use another directory"
                )
            self._remove_leftovers()
        except BaseException:
            self.close()
            raise
        return [step["progress"] for step in self._steps]

    def close(self) -> None:
        """Release the directory's lock."""
        self._lock.release()

    def _read_state(self) -> None:
        if not self._state_file.is_file():
            return
        try:
            state = json.loads(self._state_file.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict):
                raise ValueError("no 'fingerprint' object")
            steps = state.get("steps")
            if not isinstance(steps, list) or not steps:
                raise ValueError("no 'steps' list")
            for step in steps:
                for key, kind in (("progress", int), ("token_offset", int), ("files", dict)):
                    if not isinstance(step.get(key) if isinstance(step, dict) else None, kind):
                        raise ValueError(f"a step without {kind.__name__} {key!r}")
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(
                f"--checkpoint-dir: {self._state_file} is not a checkpoint state this version can read ({e}); "
                "remove it (and the checkpoint) or use another --checkpoint-dir"
            ) from None
        self._steps, self._saved_fingerprint = steps, state["fingerprint"]

    def _write_state(self) -> None:
        write_json_atomic(self._state_file, {"fingerprint": self.fingerprint, "steps": self._steps})

    def _remove_leftovers(self) -> None:
        """Delete this rank's files that the state does not name: temporary files of an
        interrupted write, and steps an interrupt kept from being deleted. Rank 0 also deletes
        the ``.tmpXXXXXX`` files safetensors writes before renaming (no rank writes any while
        the ranks open their checkpoints: they agree on the step to resume first)."""
        keep = {self._state_file.name, *(name for step in self._steps for name in step["files"])}
        for f in self.dir.iterdir():
            ours = self._mine.match(f.name) and (f.name not in keep or f.name.endswith(TMP_SUFFIX))
            if f.is_file() and (ours or (self.rank == 0 and _SAFETENSORS_TMP.match(f.name))):
                f.unlink(missing_ok=True)

    def save(self, stats: StatsCollector, progress: int, hidden: list[torch.Tensor] | None = None) -> None:
        """Record that `progress` steps (batches or layers) are done, with their stats; the
        previous step stays on disk until `commit`."""
        stats_name, hidden_name = self._names(progress)
        tensors = {stats_name: {k: v.cpu() for k, v in stats.flat_tensors().items()}}
        if hidden is not None:
            tensors[hidden_name] = {str(i): h.cpu().contiguous() for i, h in enumerate(hidden)}
        files = {}
        for name, content in tensors.items():
            with atomic_path(self.dir / name) as tmp:
                save_file(content, str(tmp))
                files[name] = {"bytes": tmp.stat().st_size, "sha256": _sha256_file(tmp)}
        kept = [step for step in self._steps[-1:] if step["progress"] != progress]
        self._steps = [*kept, {"progress": progress, "token_offset": stats.token_offset, "files": files}]
        self._saved_fingerprint = self.fingerprint
        self._write_state()

    def commit(self) -> None:
        """Drop every step but the last (its files too)."""
        dropped, self._steps = self._steps[:-1], self._steps[-1:]
        if dropped:
            self._write_state()
        for step in dropped:
            for name in step["files"]:
                (self.dir / name).unlink(missing_ok=True)

    def _verify(self, step: dict) -> None:
        saved = self._saved_fingerprint
        if saved != self.fingerprint:
            changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"--resume: the checkpoint in {self.dir} was made with other settings ({', '.join(changed)}); "
                "use the same model, calibration and options, or another --checkpoint-dir"
            )
        for name, meta in step["files"].items():
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

    def load(self, stats: StatsCollector, device: torch.device, progress: int) -> list[torch.Tensor] | None:
        """Fill `stats` from the saved step `progress` (one `open` returned); return its hidden
        states (None when it has none). Raises ValueError when the checkpoint was made with
        other tokens or settings, or when a file it names is missing or differs from what was
        written."""
        step = next(step for step in self._steps if step["progress"] == progress)
        self._verify(step)
        stats_name, hidden_name = self._names(progress)
        stats.load_tables(StatsTables.tables_from_flat(load_file(str(self.dir / stats_name)), device))
        stats.token_offset = step["token_offset"]
        self._steps = [step]
        hidden = None
        if hidden_name in step["files"]:
            saved = load_file(str(self.dir / hidden_name))
            hidden = [saved[str(i)] for i in range(len(saved))]
        return hidden


class ProfileRun:
    """One profiling run of `steps` steps over ``calibration [N, L]``: its `StatsCollector`
    (`stats`), its checkpoints when `checkpoint_dir` is given, and its `ProfileResult`.

    ``settings`` are what else the resume fingerprint holds (model identity, dtype, batch
    size, ...). `ranks`: the ranks of a distributed run (`superexperts.distributed.Parallel`):
    they meet after every step is saved (so no rank waits long in a collective, and every
    checkpoint holds a step all ranks finished) and agree on the step a resume starts from.
    Use: `start`, run the steps inside `timed`, `step_done` after each, `result`.
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
        ranks=None,
        **settings,
    ):
        self.calibration = calibration
        self.steps = steps
        self.num_sink_tokens = num_sink_tokens
        self.save_every = save_every
        self.ranks = ranks
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
        if self.checkpoint is None:
            return None
        on_disk = self.checkpoint.open(resume)
        try:
            start = max(on_disk, default=0)
            if self.ranks is not None:
                start = self.ranks.minimum(start)
            if start == 0:
                return None
            if start not in on_disk:
                raise ValueError(
                    f"--resume: rank {self.checkpoint.rank}'s checkpoint in {self.checkpoint.dir} holds steps {on_disk}, "
                    f"not step {start}, the last one every rank finished; it cannot be resumed"
                )
            hidden = self.checkpoint.load(self.stats, device, start)
            self.done = start
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
        """`steps_done` steps are finished: save every `save_every` steps and after the last
        (with several ranks: meet the others, then drop the previous step)."""
        saving = self.checkpoint is not None and (steps_done % self.save_every == 0 or steps_done == self.steps)
        if saving:
            self.checkpoint.save(self.stats, steps_done, hidden)
        if self.ranks is not None:
            self.ranks.barrier()
        if saving:
            self.checkpoint.commit()

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
