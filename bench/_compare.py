"""Whole-model comparisons (ours vs the authors' way), each method in a fresh subprocess.

Shared by bench_profile_e2e.py and bench_sweep.py: the command-line options, the checkpoint
both read (written once, its page cache dropped before each method when ``--cold``), the
calibration tokens, the timed and memory-measured run of one method in a child process, and
the parent that runs every method and times each whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ._common import peak_rss_mb, run_child, sync

VOCAB = 4096


def add_args(p: argparse.ArgumentParser, *, cuda_tokens: int, cuda_batch: int, cpu_tokens: int = 512) -> None:
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--tokens", type=int, default=None, help=f"calibration tokens (default {cuda_tokens} on CUDA, {cpu_tokens} on CPU)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per batch (default {cuda_batch} on CUDA, 1 on CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-dir", default=None, help="reuse a checkpoint written by an earlier run (same --layers)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each method, in turns; the run of median time is reported")
    p.add_argument("--warm", action="store_true",
                   help="leave the checkpoint in the page cache (default: drop it before each method, so each reads the disk)")
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.set_defaults(_cuda_tokens=cuda_tokens, _cuda_batch=cuda_batch, _cpu_tokens=cpu_tokens)


def resolve(args) -> None:
    cuda = args.device.startswith("cuda")
    args.layers = args.layers or (8 if cuda else 2)
    args.tokens = args.tokens or (args._cuda_tokens if cuda else args._cpu_tokens)
    args.batch_size = args.batch_size or (args._cuda_batch if cuda else 1)


def calibration_ids(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (args.tokens // args.seq_len, args.seq_len), generator=g)


def drop_page_cache(model_dir: str | Path) -> None:
    """Evict the checkpoint's shards from the page cache (``POSIX_FADV_DONTNEED``), so the next
    reader reads the disk (as with a checkpoint bigger than the page cache)."""
    os.sync()
    for path in Path(model_dir).glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(method: str, run: Callable[[], tuple[list, dict]], args) -> dict:
    """Run one method; its time, tokens/s, peak memory (CUDA: max allocated over what was
    allocated before; CPU: peak RSS growth), the Super Experts it reports and the extra fields
    ``run()`` returns beside them."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss_before = peak_rss_mb(reset=True)
    sync(device)
    start = time.perf_counter()
    found, extra = run()
    sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = peak_rss_mb() - rss_before
    return {
        "method": method,
        "seconds": elapsed,
        "tokens_per_s": args.tokens / elapsed,
        "peak_MB": peak,
        "super_experts": [[s.layer, s.expert, round(s.value, 2)] for s in found],
        **extra,
    }


def run_methods(module: str, variants: list[tuple[str, list[str]]], args, forward: list[str]) -> list[dict]:
    """Run benchmark `module` per ``(method, extra args)`` in a fresh process, ``--repeat`` times
    in turns (so a change of machine load reaches every method alike). Each row is the child's
    JSON plus ``process_s``, the wall time of the whole process seen from here (interpreter
    start, imports, model load and run); per method, the run of median ``process_s``, with
    every run's figures under ``runs``. Unless ``--warm``, the checkpoint leaves
    the page cache before each process."""
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for method, extra in variants:
            row = _run_one(module, method, extra, args, forward)
            runs.setdefault(row["method"], []).append(row)
    rows = []
    for same in runs.values():
        row = dict(sorted(same, key=lambda r: r["process_s"])[(len(same) - 1) // 2])
        row["runs"] = [{k: v for k, v in r.items() if k != "super_experts"} for r in same]
        rows.append(row)
    return rows


def _run_one(module: str, method: str, extra: list[str], args, forward: list[str]) -> dict:
    cmd = ["--method", method, "--layers", str(args.layers), "--tokens", str(args.tokens),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
           "--device", args.device, "--model-dir", args.model_dir, *(["--warm"] if args.warm else []), *forward, *extra]
    if not args.warm:
        drop_page_cache(args.model_dir)
    start = time.perf_counter()
    done = run_child(module, cmd)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{module} --method {method} {' '.join(extra)} failed:\n{done.stderr[-4000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_s"] = wall
    return row


def ensure_checkpoint(args, write: Callable[[Path], None], prefix: str):
    """Point ``args.model_dir`` at a checkpoint: the one given (written there first when it has
    no config.json) or a temporary one; returns the TemporaryDirectory to clean up, or None."""
    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        args.model_dir = tmp.name
    path = Path(args.model_dir)
    if (path / "config.json").is_file():
        args.layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    else:
        write(path)
        os.sync()
    return tmp


def median_of(row: dict, field: str) -> float:
    """The median of `field` over a method's runs (`run_methods`)."""
    return statistics.median(r[field] for r in row["runs"])


def same_super_experts(a: dict, b: dict) -> bool:
    return [s[:2] for s in a["super_experts"]] == [s[:2] for s in b["super_experts"]]
