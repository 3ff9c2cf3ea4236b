"""What the GPU kernels would do on an H100, from the compiler alone (no GPU needed).

Compiles both Triton kernels for sm_90 at the benchmark shapes (those of
``bench_down_proj.py`` and ``bench_sink_attention.py``), reads the artifacts
(`superexperts_kernels._triton.offline`) and prints per shape: the config, registers,
spills, shared memory, shared-memory buffers per pipelined operand, CTAs per SM, the
instructions present (wgmma, TMA, mma.sync), and a roofline estimate on an H100 SXM
(989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 132 SMs):

- ``floor_us``: max(FLOPs / peak, compulsory HBM bytes / bandwidth);
- ``est_us``: the time the tiling allows: tiles padded to whole blocks (row tails per
  expert, causal diagonal blocks), spread over SMs x CTAs/SM (the persistent down_proj
  grid takes tiles round-robin; attention programs go heaviest first, simulated as
  longest-processing-time scheduling), each SM at peak; never below the HBM time;
- ``floor_frac``: floor / est, the fraction of the roofline the tiling leaves reachable;
- ``stats_overhead_est``: the extra SASS instructions of the statistics (down_proj; the
  sink for attention), issued by the CTA's warps at 4 warp-instructions per cycle per SM,
  over the cycles of one tile at peak. An estimate, not a measurement.

These are estimates: ``bench_down_proj.py`` and ``bench_sink_attention.py`` measure on a GPU.

    python bench/gpu_static.py                 # writes bench/results/gpu_static_sm90.json
    python bench/gpu_static.py --all-configs   # also every config that ships in configs/ (slow)
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS_DIR, machine, print_table  # noqa: E402
from bench_down_proj import SHAPES, routed_inputs  # noqa: E402
from bench_sink_attention import HEAD_DIM, HEADS, KV_HEADS  # noqa: E402

H100 = {"name": "NVIDIA H100 80GB HBM3", "tflops": 989.0, "hbm_tbs": 3.35, "sms": 132, "clock_ghz": 1.83}
ARCH = 90


def _sm_flops_per_cycle() -> float:
    return H100["tflops"] * 1e12 / H100["sms"] / (H100["clock_ghz"] * 1e9)


def _overhead(extra_instructions: int, num_warps: int, tile_flops: float, ctas: int) -> float:
    """Issue cycles of `extra_instructions` per warp of a CTA over the cycles of its tile."""
    issue = extra_instructions * num_warps / 4.0
    tile_cycles = tile_flops * ctas / _sm_flops_per_cycle()
    return issue / tile_cycles


def _instructions(r: dict) -> str:
    return ",".join(k for k in ("wgmma", "tma", "mma_sync", "cp_async") if r[k]) or "-"


def down_proj_rows(tokens: int, config_for) -> list[dict]:
    from superexperts_kernels._triton import down_proj, offline

    rows = []
    for name, (experts, hidden, inter, top_k) in SHAPES.items():
        counts = routed_inputs(experts, 16, 16, top_k, tokens, torch.bfloat16, torch.device("cpu"))[3].tolist()
        total = sum(counts)
        cfg = config_for(total, experts, hidden, inter)
        off = offline.compile_and_analyze(offline.down_proj_kernel_args(torch.bfloat16, cfg, with_stats=False), ARCH)
        spec = offline.down_proj_kernel_args(torch.bfloat16, cfg, with_stats=True)
        spec["maxnreg"] = down_proj.stats_register_cap(off["registers"])
        on = offline.compile_and_analyze(spec, ARCH)
        chan = offline.compile_and_analyze(offline.down_proj_kernel_args(torch.bfloat16, cfg, with_stats=True, channel_stats=True), ARCH)

        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        flops = 2.0 * total * hidden * inter
        active = sum(1 for c in counts if c)
        hbm = 2.0 * (total * inter + active * hidden * inter + total * hidden)
        floor = max(flops / (H100["tflops"] * 1e12), hbm / (H100["hbm_tbs"] * 1e12))
        n_tiles = math.ceil(hidden / bn)
        tiles = sum(math.ceil(c / bm) for c in counts) * n_tiles
        tile_flops = 2.0 * bm * bn * math.ceil(inter / bk) * bk
        programs = H100["sms"] * on["ctas_per_sm"]
        per_program = math.ceil(tiles / programs)
        compute = per_program * tile_flops * on["ctas_per_sm"] / (_sm_flops_per_cycle() * H100["clock_ghz"] * 1e9)
        est = max(compute, hbm / (H100["hbm_tbs"] * 1e12))
        # The x pass of a tile: ceil(K tiles / N tiles) loads of [BM, BK] after the epilogue.
        extra = on["sass_instructions"] - off["sass_instructions"]
        rows.append({
            "kernel": "down_proj", "shape": name, "rows": total,
            "config": f"{bm}x{bn}x{bk} w{cfg['num_warps']} s{cfg['num_stages']} g{cfg.get('GROUP_M', 1)}",
            "regs_off/on/chan": f"{off['registers']}/{on['registers']}/{chan['registers']}",
            "spills": off["spill_bytes"] + on["spill_bytes"] + chan["spill_bytes"],
            "smem_KB": off["shared_bytes"] / 1024,
            "buffers_off/on": f"{[b['buffers'] for b in off['buffers']]}/{[b['buffers'] for b in on['buffers']]}",
            "ctas_per_sm": on["ctas_per_sm"],
            "instructions": _instructions(on),
            "fences": on["gpu_fences"],
            "floor_us": floor * 1e6, "est_us": est * 1e6, "floor_frac": floor / est,
            "waves": tiles / programs,
            "stats_overhead_est": _overhead(extra, cfg["num_warps"], tile_flops, on["ctas_per_sm"]),
        })
    return rows


def _lpt_makespan(costs: list[float], slots: int) -> float:
    """Longest-processing-time-first schedule of `costs` on `slots` workers: its makespan."""
    loads = [0.0] * min(slots, len(costs))
    heapq.heapify(loads)
    for c in sorted(costs, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + c)
    return max(loads)


def attention_rows(seq_lens: list[int]) -> list[dict]:
    from superexperts_kernels._triton import attention, offline

    rows = []
    for seq in seq_lens:
        flops = 4.0 * HEADS * seq * seq * HEAD_DIM / 2
        hbm = 2.0 * (2 * HEADS * seq * HEAD_DIM + 2 * KV_HEADS * seq * HEAD_DIM)
        floor = max(flops / (H100["tflops"] * 1e12), hbm / (H100["hbm_tbs"] * 1e12))
        for cfg in attention.candidate_configs(HEAD_DIM, torch.bfloat16, ARCH):
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            sink = offline.compile_and_analyze(offline.attention_kernel_args(torch.bfloat16, cfg, HEAD_DIM, with_sink=True), ARCH)
            plain = offline.compile_and_analyze(offline.attention_kernel_args(torch.bfloat16, cfg, HEAD_DIM, with_sink=False), ARCH)
            block_flops = 4.0 * bm * bn * HEAD_DIM
            costs = [math.ceil(min(seq, (m + 1) * bm) / bn) * block_flops for m in range(math.ceil(seq / bm))] * HEADS
            slots = H100["sms"] * sink["ctas_per_sm"]
            makespan = _lpt_makespan(costs, slots) * sink["ctas_per_sm"] / (_sm_flops_per_cycle() * H100["clock_ghz"] * 1e9)
            est = max(makespan, hbm / (H100["hbm_tbs"] * 1e12))
            blocks_per_program = sum(costs) / len(costs) / block_flops
            rows.append({
                "kernel": "attention", "shape": f"T={seq}",
                "config": f"{bm}x{bn} w{cfg['num_warps']} s{cfg['num_stages']}",
                "regs_nosink/sink": f"{plain['registers']}/{sink['registers']}",
                "spills": plain["spill_bytes"] + sink["spill_bytes"],
                "smem_KB": sink["shared_bytes"] / 1024,
                "buffers": str(sorted({b["buffers"] for b in sink["buffers"]})),
                "ctas_per_sm": sink["ctas_per_sm"],
                "instructions": _instructions(sink),
                "floor_us": floor * 1e6, "est_us": est * 1e6, "floor_frac": floor / est,
                # The sink adds a per-block rescale and, in the blocks holding sink keys, a sum.
                "sink_overhead_est": (sink["sass_instructions"] - plain["sass_instructions"]) / plain["sass_instructions"]
                / max(1.0, blocks_per_program / 3),
            })
    return rows


def all_shipped_configs() -> list[dict]:
    """Every config in configs/*.json compiled for its GPU's arch, stats on: spills, CTAs/SM."""
    from superexperts_kernels._triton import down_proj, offline

    out, seen = [], set()
    for path in sorted(down_proj._CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        arch = 80 if path.stem.startswith("A100") else 90
        tables = [c for _, c in data.get("default", [])] + [c for t in data.get("shapes", {}).values() for c in t.values()]
        for cfg in tables:
            key = (arch, json.dumps(cfg, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            off = offline.compile_and_analyze(offline.down_proj_kernel_args(torch.bfloat16, cfg, with_stats=False), arch)
            spec = offline.down_proj_kernel_args(torch.bfloat16, cfg, with_stats=True)
            spec["maxnreg"] = down_proj.stats_register_cap(off["registers"])
            on = offline.compile_and_analyze(spec, arch)
            chan = offline.compile_and_analyze(offline.down_proj_kernel_args(torch.bfloat16, cfg, with_stats=True, channel_stats=True), arch)
            out.append({"file": path.name, "arch": arch, "config": cfg, "regs_off/on/chan": [off["registers"], on["registers"], chan["registers"]],
                        "spills": [off["spill_bytes"], on["spill_bytes"], chan["spill_bytes"]],
                        "ctas_per_sm": [off["ctas_per_sm"], on["ctas_per_sm"], chan["ctas_per_sm"]]})
            print(out[-1], flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="down_proj tokens per call (as bench_down_proj on CUDA)")
    p.add_argument("--seq-lens", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--all-configs", action="store_true", help="also compile every config in configs/")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import triton

    from superexperts_kernels._triton import down_proj

    def h100_config(total, experts, hidden, inter):
        return down_proj.config_for_device(H100["name"], total, experts, hidden, inter, torch.bfloat16)

    dp = down_proj_rows(args.tokens, h100_config)
    print_table(dp, list(dp[0]))
    print()
    att = attention_rows(args.seq_lens)
    print_table(att, list(att[0]))
    payload = {
        "machine": machine(),
        "triton": triton.__version__,
        "target": {"arch": ARCH, **H100},
        "note": "estimates from compiled artifacts and a roofline model; no GPU ran",
        "tokens": args.tokens,
        "down_proj": dp,
        "attention": att,
    }
    if args.all_configs:
        payload["shipped_configs"] = all_shipped_configs()
    path = Path(args.out) if args.out else RESULTS_DIR / f"gpu_static_sm{ARCH}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
