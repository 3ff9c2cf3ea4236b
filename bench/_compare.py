"""Whole-model comparisons (ours vs the authors' way), each method in a fresh subprocess.

Shared by bench_profile_e2e.py and bench_sweep.py: the command-line options, the
calibration tokens, the timed and memory-measured run of one method in a child process,
and the parent that runs every method and compares it with ours.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from ._common import peak_rss_mb, print_table, run_child, sync

VOCAB = 4096


def add_args(p: argparse.ArgumentParser, *, cuda_tokens: int, cuda_batch: int) -> None:
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--tokens", type=int, default=None, help=f"calibration tokens (default {cuda_tokens} on CUDA, 512 on CPU)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per batch (default {cuda_batch} on CUDA, 1 on CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.set_defaults(_cuda_tokens=cuda_tokens, _cuda_batch=cuda_batch)


def resolve(args) -> None:
    cuda = args.device.startswith("cuda")
    args.layers = args.layers or (8 if cuda else 2)
    args.tokens = args.tokens or (args._cuda_tokens if cuda else 512)
    args.batch_size = args.batch_size or (args._cuda_batch if cuda else 1)


def calibration_ids(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (args.tokens // args.seq_len, args.seq_len), generator=g)


def measure(method: str, run: Callable[[], list], args) -> dict:
    """Run one method; its time, tokens/s, peak memory (CUDA: max allocated over what was
    allocated before; CPU: peak RSS growth) and the Super Experts it reports."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss_before = peak_rss_mb(reset=True)
    sync(device)
    start = time.perf_counter()
    found = run()
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
    }


def compare(module: str, variants: list[tuple[str, list[str]]], args, forward: list[str]) -> list[dict]:
    """Run benchmark `module` once per ``(method, extra args)`` in a fresh process (the first
    is ours), print the table, and return the rows with the speedup of ours and SE agreement."""
    rows = []
    for method, extra in variants:
        cmd = ["--method", method, "--layers", str(args.layers), "--tokens", str(args.tokens),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
               "--device", args.device, *forward, *extra]
        out = run_child(module, cmd, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ours = rows[0]
    for r in rows:
        r["speedup_of_ours"] = r["seconds"] / ours["seconds"]
        r["same_SEs_as_ours"] = [s[:2] for s in r["super_experts"]] == [s[:2] for s in ours["super_experts"]]
    print_table(rows, ["method", "seconds", "tokens_per_s", "peak_MB", "speedup_of_ours", "same_SEs_as_ours", "super_experts"])
    return rows
