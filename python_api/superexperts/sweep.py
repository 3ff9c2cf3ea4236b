"""Resumable sweeps: the finished part of a profiling run, on disk.

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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .collector import StatsCollector, flatten_tables, unflatten_tables


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
        save_file({k: v.cpu() for k, v in flatten_tables(stats).items()}, str(stats_file))
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
        for name, table in unflatten_tables(load_file(str(stats_file)), device).items():
            setattr(stats, name, table)
        stats.token_offset = state["token_offset"]
        hidden = None
        if hidden_file.is_file():
            saved = load_file(str(hidden_file))
            hidden = [saved[str(i)] for i in range(len(saved))]
        return state["progress"], hidden
