"""Snapshots of the workers' statistics: bytes for RPC, files on disk, and their merge.

A snapshot is ``{"meta": {...}, "stats": bytes}``; ``stats`` is a safetensors blob of
``"<layer>.<field>"`` tensors (fields of `superexperts.vllm.stats.LayerStats`). A dump
directory holds one ``rank<r>.safetensors`` + ``rank<r>.json`` per worker.

Ranks merge like the project's collective merge: maxima with MAX (the first rank holding
the maximum gives its token and channel), row counts with SUM. Under expert parallelism
each expert lives on one rank, and under pipeline parallelism each layer on one rank, so
nothing else can tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from .stats import FIELDS, LayerStats


def to_bytes(layers: dict[int, LayerStats]) -> bytes:
    return save({f"{layer}.{k}": t.detach().cpu().contiguous() for layer, s in layers.items() for k, t in s.tensors().items()})


def _tables(flat: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        layer, field = key.split(".")
        out.setdefault(int(layer), {})[field] = t
    return out


def write_rank(directory: str | Path, snap: dict) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rank = snap["meta"]["rank"]
    save_file(load(snap["stats"]), str(d / f"rank{rank}.safetensors"))
    (d / f"rank{rank}.json").write_text(json.dumps(snap["meta"], indent=1))
    return d


def read_dir(directory: str | Path) -> list[dict]:
    """The snapshots in a dump directory, as written by `write_rank`."""
    d = Path(directory)
    metas = sorted(d.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not metas:
        raise FileNotFoundError(f"{d}: no rank<r>.json files: not a superexperts vLLM dump")
    return [{"meta": json.loads(m.read_text()), "stats": save(load_file(str(m.with_suffix(".safetensors"))))} for m in metas]


def merge(snaps: list[dict]) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """The ranks' snapshots -> (meta of the whole run, ``{layer: {field: tensor [E]}}``)."""
    if not snaps:
        raise ValueError("no worker snapshots to merge")
    per_rank = [_tables(load(s["stats"])) for s in snaps]
    metas = [s["meta"] for s in snaps]
    meta = metas[0]
    if any(m["request_ids"] != meta["request_ids"] for m in metas[1:]):
        raise ValueError("worker snapshots disagree on the requests they ran: were they taken from one engine at one time?")
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for layer in sorted({layer for t in per_rank for layer in t}):
        parts = [t[layer] for t in per_rank if layer in t]
        merged[layer] = _merge_layer(parts)
    return meta, merged


def _merge_layer(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    stacked = {k: torch.stack([p[k] for p in parts]) for k in FIELDS}  # [R, E]
    seen = stacked["rows"] > 0
    key = torch.where(seen, stacked["out_absmax"], float("-inf"))
    key = torch.where(key.isnan(), float("inf"), key)  # NaN is a finding: it wins
    best = key.argmax(dim=0, keepdim=True)  # first rank on ties
    any_seen = seen.any(dim=0)
    out = {k: stacked[k].gather(0, best)[0] for k in ("out_absmax", "out_token", "out_channel")}
    out["out_absmax"] = torch.where(any_seen, out["out_absmax"], -1.0)
    out["out_token"] = torch.where(any_seen, out["out_token"], -1)
    out["out_channel"] = torch.where(any_seen, out["out_channel"], -1)
    out["in_absmax"] = stacked["in_absmax"].amax(dim=0)
    out["rows"] = stacked["rows"].sum(dim=0)
    return out
