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

`process_group` wraps a whole command: the group is joined with a timeout (``--dist-timeout``),
left through a barrier and ``destroy_process_group`` on every rank when the command succeeds,
and destroyed without a barrier when it fails. A collective that times out (a rank stopped,
crashed or far behind) becomes a `DistributedFailure` naming the ranks that did not answer,
found with a ``monitored_barrier`` on a side gloo group.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collector import ROUTED, TABLES, StatsCollector

MODES = ("expert", "data")
# How long a rank waits for the others in one collective (seconds). Streamed runs meet after
# every layer, so this bounds the gap between ranks within one layer, not over the run.
DEFAULT_TIMEOUT_S = 600.0
# How long the failure path waits for the other ranks to say they are alive.
_PROBE_TIMEOUT_S = 30.0
# What the collectives raise when a peer does not answer or has gone.
_PEER_FAILURE = re.compile(r"timed out|timeout|connection closed by peer|connection reset|broken pipe", re.I)
# (the default group, a gloo group beside it): the side group carries the small CPU
# collectives (agreeing on a resume step, the monitored barrier of the failure path).
_side: tuple[object, object] | None = None


class DistributedFailure(RuntimeError):
    """A collective failed because another rank did not answer in time or has gone."""


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

    def barrier(self) -> None:
        dist.barrier()

    def minimum(self, value: int) -> int:
        """The smallest `value` of all ranks."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_side_group())
        return int(t)


def init(mode: str, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Parallel | None:
    """Join the process group ``torchrun`` describes, its collectives timing out after
    `timeout_s` (None when run as one process; an existing group is used as it is)."""
    global _side
    if mode not in MODES:
        raise ValueError(f"--parallel must be one of {MODES}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if _side is None or _side[0] is not dist.group.WORLD:
        # gloo, for CPU tensors under NCCL too, and a group of its own: after a timeout gloo
        # closes the connections of the group that timed out.
        _side = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)))
    return Parallel(mode, dist.get_rank(), dist.get_world_size())


def _side_group():
    return _side[1] if _side is not None and _side[0] is dist.group.WORLD else None


@contextlib.contextmanager
def process_group(timeout_s: float, checkpoint_dir: str | None) -> Iterator[None]:
    """The block of a command that may run collectives (the group itself is joined by `init`
    inside it). On success every rank meets in a barrier, then leaves the group; on failure
    it leaves without waiting, and a peer failure becomes a `DistributedFailure`."""
    try:
        yield
        if dist.is_initialized():
            dist.barrier()
    except RuntimeError as e:
        if not dist.is_initialized() or isinstance(e, DistributedFailure) or not _PEER_FAILURE.search(str(e)):
            raise
        raise DistributedFailure(_failure_message(e, timeout_s, checkpoint_dir)) from e
    finally:
        global _side
        if dist.is_initialized():
            dist.destroy_process_group()
        # Release the groups now, not in the interpreter's teardown (where a gloo group's
        # destructor, joining its threads, can abort the process).
        _side = None
        gc.collect()


def _failure_message(error: Exception, timeout_s: float, checkpoint_dir: str | None) -> str:
    rank = dist.get_rank()
    silent = _unresponsive_ranks(timeout_s)
    if silent is None:
        who = "another rank did not answer (rank 0's message names it)"
    elif silent:
        who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not answer"
    else:
        who = "every rank answers again (one was late)"
    kept = (f"the checkpoint in {checkpoint_dir} keeps every finished layer: rerun with --resume"
            if checkpoint_dir else "no --checkpoint-dir was given, so the run must start over")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"rank {rank}: a collective failed after waiting up to {timeout_s:g} s (--dist-timeout): {who} "
            f"(stopped, crashed or far behind); {kept}. [{first_line}]")


def _unresponsive_ranks(timeout_s: float) -> list[int] | None:
    """The ranks that do not reach a monitored barrier (rank 0 finds out; None elsewhere)."""
    if _side_group() is None:
        return None
    try:
        dist.monitored_barrier(group=_side_group(), timeout=datetime.timedelta(seconds=min(_PROBE_TIMEOUT_S, timeout_s)),
                               wait_all_ranks=True)
    except RuntimeError as e:
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        return [int(r) for r in found.group(1).replace(" ", "").split(",") if r] if found else None
    return [] if dist.get_rank() == 0 else None


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
