"""Resumable sweeps: the finished part of a profiling run, on disk, and the run around it.

`ProfileRun` is one run, in memory (steps are calibration batches) or streamed (steps are
decoder layers): its collector, its checkpoints and its `ProfileResult`. `fingerprint` says
what must match for a resume; `SweepCheckpoint` writes and reads the files.

A checkpoint directory holds, per rank, ``state.<rank>.json`` (progress and a fingerprint
of the run's settings) and the tensors of one step: ``stats.<rank>.<step>.safetensors``
(the collector's running stats) and, for layer-streaming runs, ``hidden.<rank>.<step>``
(the hidden states entering the next layer). A step's tensor files are written first,
the state file is replaced atomically last, then older steps are deleted: an interrupt at
any point leaves the last finished step readable, and ``--resume`` continues from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .collector import StatsCollector, StatsTables
from .result import ProfileResult


def fingerprint(tokens: torch.Tensor, **settings) -> dict:
    """What must match for a checkpoint to be resumed: the tokens (hashed) and settings."""
    digest = hashlib.sha256(tokens.cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"tokens_sha256": digest, "tokens_shape": list(tokens.shape), **settings}


class SweepCheckpoint:
    """Checkpoints of one rank of one run in `directory`."""

    def __init__(self, directory: str | Path, fingerprint: dict, rank: int = 0):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.rank = rank
        self._state = self.dir / f"state.{rank}.json"

    def _files(self, step: int) -> tuple[Path, Path]:
        return self.dir / f"stats.{self.rank}.{step}.safetensors", self.dir / f"hidden.{self.rank}.{step}.safetensors"

    def save(self, stats: StatsCollector, progress: int, hidden: list[torch.Tensor] | None = None) -> None:
        """Record that `progress` steps (batches or layers) are done, with their stats."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stats_file, hidden_file = self._files(progress)
        save_file({k: v.cpu() for k, v in stats.flat_tensors().items()}, str(stats_file))
        if hidden is not None:
            save_file({str(i): h.cpu().contiguous() for i, h in enumerate(hidden)}, str(hidden_file))
        previous = self.progress()
        tmp = self._state.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"progress": progress, "token_offset": stats.token_offset, "fingerprint": self.fingerprint}))
        os.replace(tmp, self._state)
        if previous is not None and previous != progress:
            for f in self._files(previous):
                f.unlink(missing_ok=True)

    def progress(self) -> int | None:
        if not self._state.is_file():
            return None
        return json.loads(self._state.read_text())["progress"]

    def load(self, stats: StatsCollector, device: torch.device) -> tuple[int, list[torch.Tensor] | None]:
        """Fill `stats` from the last finished step; return (progress, hidden states or None).
        Raises ValueError when the checkpoint was made with other tokens or settings."""
        state = json.loads(self._state.read_text())
        if state["fingerprint"] != self.fingerprint:
            changed = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint)
                             if state["fingerprint"].get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"--resume: the checkpoint in {self.dir} was made with other settings ({', '.join(changed)}); "
                "use the same model, calibration and options, or another --checkpoint-dir"
            )
        stats_file, hidden_file = self._files(state["progress"])
        stats.load_tables(StatsTables.tables_from_flat(load_file(str(stats_file)), device))
        stats.token_offset = state["token_offset"]
        hidden = None
        if hidden_file.is_file():
            saved = load_file(str(hidden_file))
            hidden = [saved[str(i)] for i in range(len(saved))]
        return state["progress"], hidden


class ProfileRun:
    """One profiling run of `steps` steps over ``calibration [N, L]``: its `StatsCollector`
    (`stats`), its checkpoints when `checkpoint_dir` is given, and its `ProfileResult`.

    ``settings`` are what else the resume fingerprint holds (model, batch size, ...).
    Use: `resume` (optional), run the steps inside `timed`, `step_done` after each, `result`.
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

    def resume(self, device: torch.device) -> list[torch.Tensor] | None:
        """Continue from the last saved step, if there is one: fill `stats`, set `done`, and
        return the saved hidden states (streamed runs; else None)."""
        if self.checkpoint is None or self.checkpoint.progress() is None:
            return None
        self.done, hidden = self.checkpoint.load(self.stats, device)
        return hidden

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block's wall time as the run's."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.elapsed_s += time.perf_counter() - start

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
