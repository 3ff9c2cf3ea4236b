"""Benchmark moe_down_proj_profile against the ways people get the same numbers today.

Methods, all on the same routed rows and weights, in one run:

- ``ours``: ``torch.ops.superexperts.moe_down_proj_profile`` (the backend serving the
  device: Triton on CUDA; native or torch reference on CPU).
- ``ours_kernel``: the backend called directly, without the op's argument checks (which
  read ``offsets`` once: one host sync).
- ``ours_nostats``: the same backend with the statistics turned off; the stats overhead
  is ``ours_kernel / ours_nostats - 1``.
- ``grouped_mm``: ``F.grouped_mm`` (``torch._grouped_mm``) alone, no statistics: the GEMM
  that transformers' default experts run; ``ours_vs_grouped_mm`` = ``ours / grouped_mm``.
- ``grouped_mm_fp32`` (CPU, bf16/fp16 only): the same on fp32 copies (the weights upcast once,
  outside the timing; the rows upcast and y rounded back inside it): the strongest plain-torch
  CPU baseline where torch's bf16 GEMMs are slow.
- ``grouped_mm+reduce``: ``F.grouped_mm`` followed by separate reductions giving the same
  outputs (per-expert max |y|, its location, max |x|).
- ``hook_loop``: one ``nn.Linear`` per expert with a forward hook recording
  ``input[0].abs().max()`` and ``output.abs().max()``, run in a Python loop over experts:
  how the authors' tool profiles (it needs per-expert modules).

On CPU the methods are timed in turns (one call of each per round, median of the rounds),
and the JSON records the CPU flags and the native kernels' run-time choices.

Usage::

    python -m bench.bench_down_proj                       # defaults per device
    python -m bench.bench_down_proj --shapes qwen3-30b-a3b --tokens 512 --dtype bfloat16 float32
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import superexperts_kernels as sk
from superexperts_kernels import _backend

from ._common import peak_memory_mb, print_table, time_fn, time_interleaved, write_json

SHAPES = {
    # name: (experts, hidden H, moe intermediate I, top-k)
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3": (256, 7168, 2048, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
}
# DeepSeek-V3's weights take 7.5 GB in bf16 (15 GB in fp32): on CPU only when asked for.
CPU_SHAPES = ["qwen3-30b-a3b", "mixtral-8x7b"]


def routed_inputs(num_experts, hidden, inter, top_k, tokens, dtype, device, seed=0):
    """Rows sorted by expert from a random top-k routing of `tokens` tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g)
    expert_ids = logits.topk(top_k, dim=-1).indices.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts)
    x = torch.randn(tokens * top_k, inter, generator=g)[order].to(dtype).to(device)
    w = torch.empty(num_experts, hidden, inter, dtype=dtype, device=device)
    for e in range(num_experts):  # one expert at a time: DeepSeek-V3 in fp32 would not fit host memory
        w[e] = torch.randn(hidden, inter, generator=g) / inter**0.5
    offsets = torch.cumsum(counts, 0).to(torch.int32).to(device)
    return x, w, offsets, counts


def grouped_mm_then_reduce(x, w, offsets, counts_dev):
    """Plain grouped GEMM, then separate reductions producing the same statistics."""
    y = F.grouped_mm(x, w.transpose(1, 2), offs=offsets)
    num_experts = w.shape[0]
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts_dev)
    row_max, row_channel = y.abs().float().max(dim=1)
    x_row_max = x.abs().float().amax(dim=1)
    out_absmax = torch.zeros(num_experts, device=x.device).scatter_reduce(0, expert_of_row, row_max, "amax")
    in_absmax = torch.zeros(num_experts, device=x.device).scatter_reduce(0, expert_of_row, x_row_max, "amax")
    is_max = row_max == out_absmax[expert_of_row]
    row_ids = torch.arange(y.shape[0], device=x.device)
    first_row = torch.full((num_experts,), y.shape[0], device=x.device).scatter_reduce(
        0, expert_of_row, torch.where(is_max, row_ids, y.shape[0]), "amin"
    )
    channel = row_channel[first_row.clamp(max=y.shape[0] - 1)]
    return y, out_absmax, first_row, channel, in_absmax


class HookLoop:
    """Per-expert nn.Linear modules (weights shared, not copied) with recording hooks."""

    def __init__(self, w: torch.Tensor):
        self.experts = []
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        for e in range(w.shape[0]):
            lin = torch.nn.Linear(w.shape[2], w.shape[1], bias=False, device="meta")
            lin.weight = torch.nn.Parameter(w[e], requires_grad=False)
            lin.register_forward_hook(self._hook)
            self.experts.append(lin)

    def _hook(self, module, inputs, output):
        self.records.append((inputs[0].abs().max(), output.abs().max()))

    def __call__(self, x, counts: list[int]):
        out = torch.empty(x.shape[0], self.experts[0].out_features, dtype=x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out[start : start + n] = self.experts[e](x[start : start + n])
            start += n
        self.records.clear()
        return out


def bench_shape(name, tokens, dtype, device, reps):
    num_experts, hidden, inter, top_k = SHAPES[name]
    x, w, offsets, counts = routed_inputs(num_experts, hidden, inter, top_k, tokens, dtype, device)
    counts_list = counts.tolist()
    counts_dev = counts.to(device)
    backend = _backend.select("moe_down_proj_profile", device.type)
    impl = _backend.get_impl("moe_down_proj_profile", device.type)
    hook_loop = HookLoop(w)

    w_t = w.transpose(1, 2)
    methods = {
        "ours": lambda: sk.moe_down_proj_profile(x, w, offsets),
        "ours_kernel": lambda: impl(x, w, offsets, None, None, False, False),
        "ours_nostats": lambda: impl(x, w, offsets, None, None, False, False, with_stats=False),
        "grouped_mm": lambda: F.grouped_mm(x, w_t, offs=offsets),
        "grouped_mm+reduce": lambda: grouped_mm_then_reduce(x, w, offsets, counts_dev),
        "hook_loop": lambda: hook_loop(x, counts_list),
    }
    if device.type == "cpu" and dtype != torch.float32:
        w32_t = w.float().transpose(1, 2)
        methods["grouped_mm_fp32"] = lambda: F.grouped_mm(x.float(), w32_t, offs=offsets).to(dtype)
    with torch.no_grad():
        ours = sk.moe_down_proj_profile(x, w, offsets)
        base = grouped_mm_then_reduce(x, w, offsets, counts_dev)
        agree = bool(torch.allclose(ours.out_absmax, base[1], rtol=2e-2, atol=1e-2))
        if device.type == "cpu":
            times = time_interleaved(methods, device, reps=reps)
        else:
            times = {m: time_fn(fn, device, reps=reps, warmup=5) for m, fn in methods.items()}
        mem = {m: peak_memory_mb(fn, device) for m, fn in methods.items()}
    flops = 2.0 * x.shape[0] * hidden * inter
    rows = []
    for m, t in times.items():
        rows.append(
            {
                "shape": name,
                "dtype": str(dtype).replace("torch.", ""),
                "method": m,
                "backend": backend if m.startswith("ours") else "torch",
                "rows": x.shape[0],
                "ms": t,
                "TFLOP/s": flops / t / 1e9,
                "vs_ours": t / times["ours"],
                "peak_MB": mem[m],
            }
        )
    summary = {
        "shape": name,
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": tokens,
        "stats_overhead": times["ours_kernel"] / times["ours_nostats"] - 1.0,
        "ours_vs_grouped_mm": times["ours"] / times["grouped_mm"],
        "ours_vs_grouped_mm_fp32": times["ours"] / times["grouped_mm_fp32"] if "grouped_mm_fp32" in times else None,
        "ours_vs_grouped_mm+reduce": times["ours"] / times["grouped_mm+reduce"],
        "speedup_vs_hook_loop": times["hook_loop"] / times["ours"],
        "stats_agree_with_baseline": agree,
    }
    return rows, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES),
                   help=f"default: all on CUDA, {' '.join(CPU_SHAPES)} on CPU")
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default 4096 on CUDA, 256 on CPU)")
    p.add_argument("--dtype", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                   help="one or more (default bfloat16 on CUDA, bfloat16 float32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/down_proj_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    tokens = args.tokens or (4096 if device.type == "cuda" else 256)
    reps = args.reps or (20 if device.type == "cuda" else 7)
    shapes = args.shapes or (list(SHAPES) if device.type == "cuda" else CPU_SHAPES)
    dtypes = args.dtype or (["bfloat16"] if device.type == "cuda" else ["bfloat16", "float32"])
    all_rows, summaries = [], []
    for name in shapes:
        for dtype_name in dtypes:
            rows, summary = bench_shape(name, tokens, getattr(torch, dtype_name), device, reps)
            all_rows += rows
            summaries.append(summary)
            print_table(rows, ["shape", "dtype", "method", "backend", "rows", "ms", "TFLOP/s", "vs_ours", "peak_MB"])
            print()
    print_table(summaries, list(summaries[0]))
    write_json(
        "down_proj",
        {"dtypes": dtypes, "tokens": tokens, "reps": reps, "results": all_rows, "summary": summaries},
        args.out,
    )


if __name__ == "__main__":
    main()
