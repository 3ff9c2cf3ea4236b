"""Benchmark attention_with_sink against the ways people get attention and sink mass today.

Methods, all on the same causal GQA inputs (Qwen3-30B-A3B heads: Hq=32, Hkv=4, D=128):

- ``ours``: ``torch.ops.superexperts.attention_with_sink`` through the public wrapper (the
  backend serving the device: Triton on CUDA; native C++, else the chunked torch reference, on CPU).
- ``ours_nosink``: the same Triton kernel without the sink accumulation (CUDA only); the
  sink overhead is ``ours / ours_nosink - 1``.
- ``sdpa``: ``F.scaled_dot_product_attention`` (GQA), forced to the flash backend on CUDA
  when it takes these inputs; no sink mass.
- ``eager``: what transformers' ``eager`` attention with ``output_attentions`` does: the
  ``[B, Hq, T, T]`` scores, an fp32 softmax, ``probs @ v``, then the sink mass
  ``probs[..., :N].sum(-1)``. Reported as OOM where it does not fit.

Peak memory: on CUDA the allocator's peak above the inputs; on CPU the growth of the peak
RSS over the inputs, each method in a fresh subprocess (``--no-memory`` skips it). On CPU the
methods are timed in turns (one call of each per round, median of the rounds), and eager runs
only up to ``--eager-max-seq`` (its T x T fp32 matrices would not fit past that).

Usage::

    python -m bench.bench_sink_attention                      # T = 2k, 8k, 32k on CUDA; 512, 2k, 8k on CPU
    python -m bench.bench_sink_attention --seq-lens 1024 4096 --dtype float16 float32
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import superexperts_kernels as sk
from superexperts_kernels import _backend

from ._common import peak_memory_mb, peak_rss_mb, print_table, run_child, time_fn, time_interleaved, write_json

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128  # Qwen3-30B-A3B
METHODS = ("ours", "ours_nosink", "sdpa", "eager")


def make_inputs(seq, dtype, device, batch=1, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, HEADS, seq, HEAD_DIM, generator=g, dtype=dtype, device=device)
    k = torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=g, dtype=dtype, device=device)
    v = torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=g, dtype=dtype, device=device)
    return q, k, v


def eager_attention(q, k, v, scale, num_sink, causal_mask):
    """transformers ``eager`` with output_attentions: the full probability matrix, then its
    first ``num_sink`` columns summed."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~causal_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    o = probs.to(q.dtype) @ v
    return o, probs[..., :num_sink].sum(-1)


def sdpa_fn(q, k, v, scale):
    """SDPA, on CUDA forced to the flash backend when it accepts the inputs; returns
    (callable, name of the backend used)."""

    def default():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    if q.device.type != "cuda":
        return default, "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return default()

    try:
        flash()
        return flash, "flash"
    except RuntimeError:
        return default, "default"


def method_fns(seq, dtype, device, num_sink, eager=True):
    """Callables for the methods that run on `device`, and the SDPA backend name."""
    q, k, v = make_inputs(seq, dtype, device)
    scale = HEAD_DIM**-0.5
    sdpa, sdpa_backend = sdpa_fn(q, k, v, scale)
    fns = {
        "ours": lambda: sk.attention_with_sink(q, k, v, scale, num_sink_tokens=num_sink),
        "sdpa": sdpa,
    }
    if eager:
        causal_mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        fns["eager"] = lambda: eager_attention(q, k, v, scale, num_sink, causal_mask)
    if _backend.select("attention_with_sink", device.type) == "triton":
        from superexperts_kernels._triton.attention import attention_with_sink_triton

        fns["ours_nosink"] = lambda: attention_with_sink_triton(q, k, v, scale, True, num_sink, with_sink=False)
    return fns, sdpa_backend


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def cpu_peak_rss_growth(method, seq, dtype, num_sink) -> float | str | None:
    """Run `method` once in a fresh process; its peak RSS growth over the inputs in MB."""
    res = run_child(__spec__.name, ["--child", method, str(seq), str(dtype).replace("torch.", ""), str(num_sink)])
    if res.returncode != 0:
        return "OOM" if "memory" in res.stderr.lower() or res.returncode == -9 else None
    return json.loads(res.stdout.strip().splitlines()[-1])["rss_growth_mb"]


def child(method, seq, dtype_name, num_sink):
    dtype, cpu = getattr(torch, dtype_name), torch.device("cpu")
    with torch.no_grad():
        # A tiny call first, so that the library code the method touches is already
        # resident and not counted as its memory.
        method_fns(64, dtype, cpu, num_sink, eager=method == "eager")[0][method]()
        fns, _ = method_fns(seq, dtype, cpu, num_sink, eager=method == "eager")
        before = peak_rss_mb(reset=True)
        fns[method]()
    print(json.dumps({"rss_growth_mb": peak_rss_mb() - before}))


def bench_seq(seq, dtype, device, reps, num_sink, memory, eager_max_seq):
    fns, sdpa_backend = method_fns(seq, dtype, device, num_sink, eager=eager_max_seq is None or seq <= eager_max_seq)
    backend = _backend.select("attention_with_sink", device.type)
    flops = 4.0 * HEADS * seq * seq * HEAD_DIM / 2  # causal: half of QK^T and PV
    times, mem, notes = {}, {}, {}
    with torch.no_grad():
        if device.type == "cpu":
            times = time_interleaved(fns, device, reps=reps)
            if memory:
                mem = {m: cpu_peak_rss_growth(m, seq, dtype, num_sink) for m in fns}
        for m, fn in fns.items():
            if device.type == "cpu":
                break
            try:
                times[m] = time_fn(fn, device, reps=reps, warmup=5)
                mem[m] = peak_memory_mb(fn, device)
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                notes[m] = "OOM"
                torch.cuda.empty_cache()

        agree = None
        if "eager" in times:
            ours, want = fns["ours"](), fns["eager"]()
            # eager rounds the scores to bf16/fp16 before its fp32 softmax; ours keeps them fp32
            sink_tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-2)
            agree = bool(
                torch.allclose(ours.sink_mass, want[1], **sink_tol)
                and torch.allclose(ours.o.float(), want[0].float(), rtol=3e-2, atol=3e-2)
            )
    rows = []
    for m in METHODS:
        if m not in fns:
            continue
        t = times.get(m)
        rows.append(
            {
                "T": seq,
                "dtype": str(dtype).replace("torch.", ""),
                "method": m,
                "backend": backend if m.startswith("ours") else (sdpa_backend if m == "sdpa" else "torch"),
                "ms": t,
                "TFLOP/s": flops / t / 1e9 if t else None,
                "vs_sdpa": t / times["sdpa"] if t and "sdpa" in times else None,
                "peak_MB": notes.get(m) or mem.get(m),
            }
        )
    summary = {
        "T": seq,
        "dtype": str(dtype).replace("torch.", ""),
        "ours_vs_sdpa": times["ours"] / times["sdpa"],
        "sink_overhead": times["ours"] / times["ours_nosink"] - 1.0 if "ours_nosink" in times else None,
        "speedup_vs_eager": times["eager"] / times["ours"] if "eager" in times else notes.get("eager", "not run"),
        "agrees_with_eager": agree,
    }
    return rows, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seq-lens", type=int, nargs="*", default=None,
        help="T (= Tk); default 2048 8192 32768 on CUDA, 512 2048 8192 on CPU",
    )
    p.add_argument(
        "--dtype", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
        help="one or more; default bfloat16 on CUDA, bfloat16 float32 on CPU",
    )
    p.add_argument("--eager-max-seq", type=int, default=None,
                   help="run eager only up to this T (default: 2048 on CPU, every T on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-sink", type=int, default=1)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="on CPU, skip the per-method peak RSS subprocesses")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/sink_attention_<device>.json)")
    p.add_argument("--child", nargs=4, metavar=("METHOD", "T", "DTYPE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        method, seq, dtype_name, num_sink = args.child
        child(method, int(seq), dtype_name, int(num_sink))
        return

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    seq_lens = args.seq_lens or ([2048, 8192, 32768] if on_cuda else [512, 2048, 8192])
    dtypes = args.dtype or (["bfloat16"] if on_cuda else ["bfloat16", "float32"])
    eager_max_seq = args.eager_max_seq or (None if on_cuda else 2048)
    reps = args.reps or (20 if on_cuda else 3)
    all_rows, summaries = [], []
    for seq in seq_lens:
        for dtype_name in dtypes:
            rows, summary = bench_seq(seq, getattr(torch, dtype_name), device, reps, args.num_sink, not args.no_memory,
                                      eager_max_seq)
            all_rows += rows
            summaries.append(summary)
            print_table(rows, ["T", "dtype", "method", "backend", "ms", "TFLOP/s", "vs_sdpa", "peak_MB"])
            print()
    print_table(summaries, list(summaries[0]))
    write_json(
        "sink_attention",
        {
            "dtypes": dtypes,
            "heads": [HEADS, KV_HEADS, HEAD_DIM],
            "num_sink_tokens": args.num_sink,
            "reps": reps,
            "peak_MB": "CUDA: allocator peak above the inputs; CPU: peak RSS growth in a fresh process",
            "results": all_rows,
            "summary": summaries,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
