"""Several processes (``torchrun``): expert parallel inside a layer, data parallel across tokens.

- ``expert``: every rank runs all tokens; rank r holds experts ``expert_range(E, r, N)`` of
  each MoE layer (and reads only those from disk). Its experts write their routed rows'
  outputs into a ``[T * k, H]`` buffer that is zero elsewhere; one ``all_reduce(SUM)`` of
  it gives every rank all rows, exactly (each slot is nonzero on one rank only), and the
  top-k sum is then taken in the same order as in one process.
- ``data``: rank r runs a contiguous shard of the calibration sequences (its token ids
  stay global) with all experts.

Statistics merge with collectives: ``all_reduce(MAX)`` for maxima, ``all_reduce(MIN)``
of packed ``token * 2**24 + channel`` among the ranks that hold the maximum (the same
first-occurrence rule as one process), ``all_reduce(SUM)`` for row counts and sink sums,
``all_gather`` for the per-layer top-k massive activations. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collector import StatsCollector

MODES = ("expert", "data")
_CHANNEL_SPAN = 2**24
_NONE = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Parallel:
    mode: str
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(mode: str, device: torch.device) -> Parallel | None:
    """Join the process group ``torchrun`` describes (None when run as one process)."""
    if mode not in MODES:
        raise ValueError(f"--parallel must be one of {MODES}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Parallel(mode, dist.get_rank(), dist.get_world_size())


def local_device(device: str) -> str:
    """``cuda`` -> ``cuda:<LOCAL_RANK>`` under torchrun."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def split_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced ``[start, end)`` share of ``n`` items for `rank`."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def reduce_stats(stats: StatsCollector, parallel: Parallel) -> None:
    """Merge every rank's statistics into every rank's collector, in place. In expert-parallel
    runs only the routed experts differ between ranks; everything else ran on every rank."""
    tables = (stats.routed, stats.shared, stats.dense) if parallel.mode == "data" else (stats.routed,)
    for table in tables:
        for layer in sorted(table):
            s = table[layer]
            local_max = s.out_absmax.clone()
            dist.all_reduce(s.out_absmax, op=dist.ReduceOp.MAX)
            holds_max = (local_max == s.out_absmax) & (s.out_token >= 0)
            packed = torch.where(holds_max, s.out_token * _CHANNEL_SPAN + s.out_channel, _NONE)
            dist.all_reduce(packed, op=dist.ReduceOp.MIN)
            found = packed != _NONE
            s.out_token = torch.where(found, packed // _CHANNEL_SPAN, -1)
            s.out_channel = torch.where(found, packed % _CHANNEL_SPAN, -1)
            dist.all_reduce(s.in_absmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(s.rows, op=dist.ReduceOp.SUM)
    if parallel.mode != "data":
        return
    for layer in sorted(stats.hidden):
        h = stats.hidden[layer]
        gathered = []
        for t in (h.top_values, h.top_token, h.top_channel):
            parts = [torch.empty_like(t) for _ in range(parallel.world)]
            dist.all_gather(parts, t)
            gathered.append(torch.cat(parts))  # rank order is token order: ties keep the earliest
        values, token, channel = gathered
        order = torch.sort(values, descending=True, stable=True).indices[: h.top_values.numel()]
        h.top_values, h.top_token, h.top_channel = values[order], token[order], channel[order]
        for t in (h.abs_sum, h.count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    for layer in sorted(stats.sink):
        for t in (stats.sink[layer].mass_sum, stats.sink[layer].count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
