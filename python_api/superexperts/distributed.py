"""Several processes (``torchrun``): expert parallel inside a layer, data parallel across tokens.

- ``expert``: every rank runs all tokens; rank r holds experts ``expert_range(E, r, N)`` of
  each MoE layer (and reads only those from disk). Its experts write their routed rows'
  outputs into a ``[T * k, H]`` buffer that is zero elsewhere; one ``all_reduce(SUM)`` of
  it gives every rank all rows, exactly (each slot is nonzero on one rank only), and the
  top-k sum is then taken in the same order as in one process.
- ``data``: rank r runs a contiguous shard of the calibration sequences (its token ids
  stay global) with all experts.

Statistics merge with collectives (each stats class's ``merge_ranks`` in
`superexperts.collector`): ``all_reduce(MAX)`` for maxima, ``all_reduce(MIN)`` of packed
``token * 2**24 + channel`` among the ranks that hold the maximum (the same
first-occurrence rule as one process), ``all_reduce(SUM)`` for row counts and sink sums,
``all_gather`` for the per-layer top-k massive activations. NCCL on CUDA, gloo on CPU.

`ExpertShard` tells an experts module (through its `superexperts.layers.ModuleTag`) which
experts it holds, and the process group that completes its output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collector import ROUTED, TABLES, StatsCollector

MODES = ("expert", "data")


@dataclass
class ExpertShard:
    """This rank's experts of one MoE layer: ``start .. start + count`` of ``num_global``;
    `group` is the process group that completes the layer's output (None: the default)."""

    start: int
    count: int
    num_global: int
    group: object = None


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
    names = TABLES if parallel.mode == "data" else (ROUTED,)
    for name in names:
        table = getattr(stats, name)
        for layer in sorted(table):
            table[layer].merge_ranks()
