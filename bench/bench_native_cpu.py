"""Benchmark the native CPU kernels (csrc/) against the pure-torch references, in one run.

Cases and methods:

- ``moe_down_proj_profile`` at Qwen3-30B-A3B shapes (E=128, H=2048, I=768, top-8 of a random
  routing), 256 and 512 tokens, bf16 and fp32:
  ``native`` (the public op on the native backend), ``native_nostats`` (the native kernel
  writing y only; the stats overhead is ``native / native_nostats - 1``) and ``reference``
  (the public op on the torch reference: per-expert fp32 matmuls, then the statistics).
- ``attention_with_sink``, causal, GQA with Qwen3-30B-A3B heads (Hq=32, Hkv=4, D=128), T = Tk
  in {2048, 8192}, fp32 and bf16: ``native``, ``reference`` (the chunked torch reference,
  256 queries at a time) and ``sdpa`` (ATen's CPU flash attention, which gives no sink mass:
  for context only).

Every (case, method) runs in a fresh subprocess, since CPU peak memory is per process: a
tiny call first (so library code paged in is not counted), then the peak RSS (VmHWM) is reset,
one warm-up call gives the peak RSS growth over the inputs, and ``reps`` more calls give the
median time. The parent checks that native and reference agree on each case (attention only
up to T = 2048, where the reference is quick) and records the machine, the thread count and
the load average with the numbers.

Usage::

    python -m bench.bench_native_cpu                         # everything (about 5 minutes on 2 cores)
    python -m bench.bench_native_cpu --tokens 512 --seq-lens 2048 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import superexperts_kernels as sk
from superexperts_kernels import native

from ._common import peak_rss_mb, print_table, run_child, time_fn, write_json
from .bench_down_proj import SHAPES, routed_inputs

DOWN_PROJ, ATTENTION = "moe_down_proj_profile", "attention_with_sink"
NUM_EXPERTS, HIDDEN, INTER, TOP_K = SHAPES["qwen3-30b-a3b"]
HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- the methods


def down_proj_fns(tokens: int, dtype: torch.dtype) -> dict:
    x, w, offsets, _ = routed_inputs(NUM_EXPERTS, HIDDEN, INTER, TOP_K, tokens, dtype, CPU)

    def public(backend):
        def call():
            with sk.use_backend(DOWN_PROJ, "cpu", backend):
                return sk.moe_down_proj_profile(x, w, offsets)

        return call

    return {
        "native": public("native"),
        "native_nostats": lambda: torch.ops.superexperts.moe_down_proj_profile_native(
            x, w, offsets, None, None, False, False, with_stats=False
        ),
        "reference": public("reference"),
    }


def attention_fns(seq: int, dtype: torch.dtype, heads: int) -> dict:
    g = torch.Generator().manual_seed(0)
    kv_heads = max(1, heads * KV_HEADS // HEADS)
    q = torch.randn(1, heads, seq, HEAD_DIM, generator=g, dtype=dtype)
    k = torch.randn(1, kv_heads, seq, HEAD_DIM, generator=g, dtype=dtype)
    v = torch.randn(1, kv_heads, seq, HEAD_DIM, generator=g, dtype=dtype)
    scale = HEAD_DIM**-0.5

    def public(backend):
        def call():
            with sk.use_backend(ATTENTION, "cpu", backend):
                return sk.attention_with_sink(q, k, v, scale)

        return call

    return {
        "native": public("native"),
        "reference": public("reference"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
    }


def fns_for(spec: dict) -> dict:
    dtype = getattr(torch, spec["dtype"])
    if spec["op"] == DOWN_PROJ:
        return down_proj_fns(spec["size"], dtype)
    return attention_fns(spec["size"], dtype, spec["heads"])


# --------------------------------------------------------------------------- one method per process


def child(spec: dict) -> None:
    with torch.no_grad():
        fns_for({**spec, "size": 64 if spec["op"] == ATTENTION else 8})[spec["method"]]()
        fn = fns_for(spec)[spec["method"]]
        before = peak_rss_mb(reset=True)
        fn()
        peak = peak_rss_mb() - before
        ms = time_fn(fn, CPU, warmup=0, reps=spec["reps"])
    print(json.dumps({"ms": ms, "peak_mb": peak}))


def measure(spec: dict) -> dict:
    res = run_child(__spec__.name, ["--child", json.dumps(spec)])
    if res.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- agreement


def agrees(spec: dict) -> bool:
    """Native and reference agree within dtype tolerance on this case (stats: those of
    native's own y, and close to the reference's)."""
    fns = fns_for(spec)
    with torch.no_grad():
        ours, ref = fns["native"](), fns["reference"]()
    tol = dict(rtol=2e-2, atol=2e-2) if spec["dtype"] != "float32" else dict(rtol=1e-4, atol=1e-4)
    if spec["op"] == DOWN_PROJ:
        ends = torch.cumsum(ours.rows, 0).tolist()
        own = torch.stack([
            ours.y[s:e].float().abs().max() if e > s else torch.tensor(0.0) for s, e in zip([0] + ends[:-1], ends)
        ])
        return bool(
            torch.allclose(ours.y.float(), ref.y.float(), **tol)
            and torch.equal(ours.out_absmax, own)
            and torch.allclose(ours.out_absmax, ref.out_absmax, **tol)
            and torch.equal(ours.in_absmax, ref.in_absmax)
        )
    return bool(
        torch.allclose(ours.o.float(), ref.o.float(), **tol)
        and torch.allclose(ours.sink_mass, ref.sink_mass, rtol=1e-4, atol=1e-5)
    )


# --------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, nargs="*", default=[256, 512])
    p.add_argument("--seq-lens", type=int, nargs="*", default=[2048, 8192])
    p.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--heads", type=int, default=HEADS, help="query heads of the attention cases (kv heads: heads / 8)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per method (default 5; attention 3, 1 above T=2048)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/native_cpu_cpu.json)")
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    if not native.info()["built"]:
        sys.exit(f"the native extension is not built: {native.info()['error']}")

    load_before = os.getloadavg()
    started = time.time()
    cases = [dict(op=DOWN_PROJ, size=t, dtype=d, reps=args.reps or 5) for t in args.tokens for d in args.dtypes]
    cases += [
        dict(op=ATTENTION, size=t, dtype=d, heads=args.heads, reps=args.reps or (3 if t <= 2048 else 1))
        for t in args.seq_lens
        for d in args.dtypes
    ]
    rows, summaries = [], []
    for case in cases:
        methods = ("native", "native_nostats", "reference") if case["op"] == DOWN_PROJ else ("native", "reference", "sdpa")
        results = {m: measure({**case, "method": m}) for m in methods}
        if case["op"] == DOWN_PROJ:
            flops = 2.0 * case["size"] * TOP_K * HIDDEN * INTER
        else:
            flops = 4.0 * case["heads"] * case["size"] ** 2 * HEAD_DIM / 2  # causal: half of QK^T and PV
        ref_ms = results["reference"]["ms"]
        for m, r in results.items():
            rows.append({
                "op": case["op"], "size": case["size"], "dtype": case["dtype"], "method": m, "ms": r["ms"],
                "GFLOP/s": flops / r["ms"] / 1e6, "speedup_vs_ref": ref_ms / r["ms"], "peak_MB": r["peak_mb"],
            })
        checked = case["op"] == DOWN_PROJ or case["size"] <= 2048
        summary = {
            "op": case["op"], "size": case["size"], "dtype": case["dtype"],
            "native_speedup_vs_ref": ref_ms / results["native"]["ms"],
            "native_peak_MB": results["native"]["peak_mb"], "ref_peak_MB": results["reference"]["peak_mb"],
            "stats_overhead": results["native"]["ms"] / results["native_nostats"]["ms"] - 1.0
            if "native_nostats" in results else None,
            "native_vs_sdpa": results["native"]["ms"] / results["sdpa"]["ms"] if "sdpa" in results else None,
            "agree": agrees(case) if checked else None,
        }
        summaries.append(summary)
        print_table(rows[-len(methods):], ["op", "size", "dtype", "method", "ms", "GFLOP/s", "speedup_vs_ref", "peak_MB"])
        print()

    print_table(summaries, list(summaries[0]))
    load_after = os.getloadavg()
    print(f"threads {torch.get_num_threads()}, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
          f"{time.time() - started:.0f} s")
    write_json("native_cpu", {
        "native": native.info(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "down_proj_shape": dict(experts=NUM_EXPERTS, hidden=HIDDEN, inter=INTER, top_k=TOP_K),
        "attention_shape": dict(heads=args.heads, kv_heads=max(1, args.heads * KV_HEADS // HEADS), head_dim=HEAD_DIM,
                                causal=True),
        "size": "tokens for moe_down_proj_profile (rows = tokens * top_k), T = Tk for attention_with_sink",
        "results": rows,
        "summary": summaries,
    }, args.out)


if __name__ == "__main__":
    main()
