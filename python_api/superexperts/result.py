"""`ProfileResult`: what one profiling run measured, on the CPU, with tables and save/load.

Its stat tables (per decoder layer: routed/shared/dense down_proj, hidden, sink) are those
of `superexperts.collector.StatsTables`. Token ids are global (``sample * seq_len + position``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .collector import DENSE, ROUTED, SHARED, TABLES, StatsCollector, StatsTables
from .rules import Rule, SuperExpert, detect

STATS_FILE = "stats.safetensors"
META_FILE = "profile.json"


def shared_label(index: int, count: int) -> str:
    return "shared" if count == 1 else f"shared:{index}"


@dataclass
class ProfileResult(StatsTables):
    """The metadata of a run and its `StatsTables` on the CPU."""

    model_type: str
    num_layers: int
    seq_len: int
    num_sequences: int
    num_sink_tokens: int
    layer_kinds: list[str]
    shared_names: dict[int, list[str]] = field(default_factory=dict)
    dense_names: dict[int, list[str]] = field(default_factory=dict)
    structure: dict = field(default_factory=dict)  # how the layers map onto the config (`layers.describe_structure`)
    elapsed_s: float = 0.0
    work_fraction: float = 1.0  # share of the run done in `elapsed_s` (less than 1 after a resume)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_collector(cls, collector: StatsCollector, **meta) -> ProfileResult:
        return cls(**meta, **collector.tables_on("cpu"))

    # ------------------------------------------------------------------ views

    @property
    def num_tokens(self) -> int:
        return self.seq_len * self.num_sequences

    @property
    def tokens_per_s(self) -> float:
        """Calibration tokens per second through the whole model (the resumed part only, after a resume)."""
        return self.num_tokens * self.work_fraction / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def locate(self, token: int) -> tuple[int, int]:
        """Global token id -> (sample, position); (-1, -1) for none."""
        if token < 0:
            return -1, -1
        return token // self.seq_len, token % self.seq_len

    def units(self) -> list[dict]:
        """One row per measured down_proj unit: routed experts, shared experts, dense MLPs."""
        rows = []
        for kind, table in ((ROUTED, self.routed), (SHARED, self.shared), (DENSE, self.dense)):
            for layer, s in table.items():
                for i in range(s.out_absmax.numel()):
                    if kind == ROUTED:
                        label: int | str = i
                    elif kind == SHARED:
                        label = shared_label(i, s.out_absmax.numel())
                    else:
                        label = "dense" if s.out_absmax.numel() == 1 else f"dense:{i}"
                    sample, position = self.locate(int(s.out_token[i]))
                    n_rows = int(s.rows[i])
                    rows.append(
                        {
                            "layer": layer,
                            "expert": label,
                            "kind": kind,
                            "output_max": float(s.out_absmax[i]) if n_rows else 0.0,
                            "input_max": float(s.in_absmax[i]),
                            "rows": n_rows,
                            "sample": sample,
                            "position": position,
                            "channel": int(s.out_channel[i]),
                        }
                    )
        return rows

    def candidates(self) -> list[tuple[int, int | str, float]]:
        """``(layer, expert, a)`` for every routed or shared expert that saw at least one row."""
        return [
            (u["layer"], u["expert"], u["output_max"])
            for u in self.units()
            if u["kind"] in (ROUTED, SHARED) and u["rows"] > 0
        ]

    def super_experts(self, rule: Rule | None = None) -> list[SuperExpert]:
        return detect(self.candidates(), self.num_layers, rule)

    def expert_matrix(self) -> torch.Tensor:
        """``[num_layers, max_E + n_shared]`` fp32 of routed (then shared) output maxima; NaN where
        a layer has no such expert or the expert saw no rows."""
        width_routed = max((s.out_absmax.numel() for s in self.routed.values()), default=0)
        width_shared = max((s.out_absmax.numel() for s in self.shared.values()), default=0)
        m = torch.full((self.num_layers, width_routed + width_shared), float("nan"))
        for layer, s in self.routed.items():
            m[layer, : s.out_absmax.numel()] = torch.where(s.rows > 0, s.out_absmax, float("nan"))
        for layer, s in self.shared.items():
            m[layer, width_routed : width_routed + s.out_absmax.numel()] = torch.where(s.rows > 0, s.out_absmax, float("nan"))
        return m

    def massive_activations(self) -> list[dict]:
        """Per layer: max |h| of its output, where, mean |h|, and the top entries."""
        rows = []
        for layer, h in self.hidden.items():
            top = []
            for v, t, c in zip(h.top_values.tolist(), h.top_token.tolist(), h.top_channel.tolist()):
                if t >= 0:
                    sample, position = self.locate(t)
                    top.append({"value": v, "sample": sample, "position": position, "channel": c})
            mean = float(h.abs_sum) / max(int(h.count), 1)
            rows.append(
                {
                    "layer": layer,
                    "max": top[0]["value"] if top else 0.0,
                    "position": top[0]["position"] if top else -1,
                    "channel": top[0]["channel"] if top else -1,
                    "mean_abs": mean,
                    "max_over_mean": (top[0]["value"] / mean) if top and mean > 0 else float("nan"),
                    "top": top,
                }
            )
        return rows

    def sink_mass(self) -> dict[int, torch.Tensor]:
        """Per layer, the mean sink mass of each head over queries t >= 1: ``[heads]`` fp64."""
        return {layer: s.mean() for layer, s in self.sink.items()}

    # ------------------------------------------------------------------ persistence

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{"routed.3.out_absmax": tensor, ...}`` of every stat tensor."""
        return self.flat_tensors()

    def metadata(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in TABLES}
        meta["shared_names"] = {str(k): v for k, v in self.shared_names.items()}
        meta["dense_names"] = {str(k): v for k, v in self.dense_names.items()}
        return meta

    def save(self, directory: str | Path) -> Path:
        """Write ``profile.json`` (metadata) and ``stats.safetensors`` (all stat tensors)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(d / STATS_FILE))
        with open(d / META_FILE, "w") as f:
            json.dump(self.metadata(), f, indent=2)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> ProfileResult:
        d = Path(directory)
        with open(d / META_FILE) as f:
            meta = json.load(f)
        meta["shared_names"] = {int(k): v for k, v in meta["shared_names"].items()}
        meta["dense_names"] = {int(k): v for k, v in meta["dense_names"].items()}
        tables = StatsTables.tables_from_flat(load_file(str(d / STATS_FILE)))
        return cls(**meta, **tables)
