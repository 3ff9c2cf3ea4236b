"""What the GPU kernels would do on an H100, from the compiler alone (no GPU needed).

Compiles both Triton kernels for sm_90 at the benchmark shapes (those of
``bench_down_proj.py`` and ``bench_sink_attention.py``), reads the artifacts
(`superexperts_kernels._triton.offline`) and prints per shape: the config, registers,
spills, shared memory, shared-memory buffers per pipelined operand, CTAs per SM, the
instructions present (wgmma, TMA, mma.sync), and a model of an H100 SXM (989 TFLOP/s dense
bf16, 3.35 TB/s HBM3, 132 SMs at 1.83 GHz):

- ``floor_us``: max(FLOPs / peak, compulsory HBM bytes / bandwidth);
- down_proj, per variant (statistics off, on, with row norms), the cycles of one output tile
  on its SM: the K loop at the tensor-core rate (its own instructions issue under the
  asynchronous wgmma), plus the instructions of the tile loop outside the K loop, issued by
  the CTA's warps at 4 warp-instructions per cycle (`offline.loop_profile`: SASS counted per
  loop and multiplied by the loop's trips, not the static total), plus an L2 round trip
  (``L2_HIT_CYCLES``, assumed) per trip of the x-pass loop (its first tile is loaded before
  the epilogue and hidden by it; the loop loads two at a time). With one CTA per SM nothing overlaps the epilogue; with more,
  the other CTAs' MMAs do. ``est_us = max(HBM time, the busiest SM's tiles)``;
- ``stats_overhead_est``: est with statistics / est without - 1: what the statistics cost
  where HBM or the SMs bind; ``stats_overhead_bound``: the extra cycles of a tile over the
  tile without statistics, the cost if the kernel were bound by its SMs alone;
- attention: ``est_us`` from heaviest-first scheduling of the query blocks at peak.

These are estimates: ``bench_down_proj.py`` and ``bench_sink_attention.py`` measure on a GPU.

    python -m bench.gpu_static                  # writes bench/results/gpu_static_sm90.json
    python -m bench.gpu_static --all-configs    # also every config that ships in configs/ (slow)
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from ._common import RESULTS_DIR, machine, print_table  # noqa: E402
from .bench_down_proj import SHAPES, routed_inputs  # noqa: E402
from .bench_sink_attention import HEAD_DIM, HEADS, KV_HEADS  # noqa: E402

H100 = {"name": "NVIDIA H100 80GB HBM3", "tflops": 989.0, "hbm_tbs": 3.35, "sms": 132, "clock_ghz": 1.83}
ARCH = 90
# An L2 hit as seen by one warp, in SM cycles: microbenchmarks of H100 report a few hundred
# (an assumption of this model, not a measurement made here).
L2_HIT_CYCLES = 300
ISSUE_PER_CYCLE = 4  # warp-instructions per SM per cycle: 4 schedulers


def _sm_flops_per_cycle() -> float:
    return H100["tflops"] * 1e12 / H100["sms"] / (H100["clock_ghz"] * 1e9)


def _instructions(r: dict) -> str:
    return ",".join(k for k in ("wgmma", "tma", "mma_sync", "cp_async") if r[k]) or "-"


def x_pass_trips(k_steps: int, n_tiles: int) -> float:
    """Mean trips of the x-pass loop per tile: program (m, n) reduces the x tiles n, n + N, ...
    of its K steps, the first one loaded before the loop, then two per trip."""
    return sum(math.ceil(max(math.ceil((k_steps - n) / n_tiles) - 1, 0) / 2) for n in range(n_tiles)) / n_tiles


def tile_cycles(r: dict, cfg: dict, k_steps: int, x_trips: float) -> dict:
    """SM cycles of one ``BLOCK_M x BLOCK_N`` tile of a compiled variant (see the module
    docstring): ``{"mma", "issue", "latency", "total"}``, per CTA slot of the SM."""
    loops, warps, ctas = r["loops"], cfg["num_warps"], r["ctas_per_sm"]
    mma = 2.0 * cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["BLOCK_K"] * k_steps / _sm_flops_per_cycle()
    k_issue = loops["k_loop"] * k_steps * warps / ISSUE_PER_CYCLE
    issue = (loops["tile_body"] + sum(loops["other_loops"]) * x_trips) * warps / ISSUE_PER_CYCLE
    latency = (L2_HIT_CYCLES * x_trips) if loops["other_loops"] else 0.0
    if ctas == 1:
        total = max(mma, k_issue) + issue + latency
    else:  # the SM's other CTAs keep its tensor cores busy through this one's epilogue
        total = max(mma, k_issue + issue, (mma + issue + latency) / ctas)
    return {"mma": mma, "issue": issue, "latency": latency, "total": total}


def down_proj_rows(tokens: int, config_for) -> list[dict]:
    from superexperts_kernels._triton import offline

    rows = []
    for name, (experts, hidden, inter, top_k) in SHAPES.items():
        counts = routed_inputs(experts, 16, 16, top_k, tokens, torch.bfloat16, torch.device("cpu"))[3].tolist()
        total = sum(counts)
        cfg = config_for(total, experts, hidden, inter)
        got = offline.compile_down_proj(torch.bfloat16, cfg, ARCH)

        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        flops = 2.0 * total * hidden * inter
        active = sum(1 for c in counts if c)
        hbm = 2.0 * (total * inter + active * hidden * inter + total * hidden) / (H100["hbm_tbs"] * 1e12)
        floor = max(flops / (H100["tflops"] * 1e12), hbm)
        n_tiles, k_steps = math.ceil(hidden / bn), math.ceil(inter / bk)
        tiles = sum(math.ceil(c / bm) for c in counts) * n_tiles
        trips = x_pass_trips(k_steps, n_tiles)
        est, cycles = {}, {}
        for variant, r in got.items():
            ctas = r["ctas_per_sm"]
            cycles[variant] = tile_cycles(r, cfg, k_steps, trips)
            per_program = math.ceil(tiles / (H100["sms"] * ctas))
            sm_time = per_program * cycles[variant]["total"] * ctas / (H100["clock_ghz"] * 1e9)
            est[variant] = max(sm_time, hbm)
        off, on, chan, norms = (got[v] for v in ("off", "stats", "channels", "norms"))
        rows.append({
            "kernel": "down_proj", "shape": name, "rows": total,
            "config": f"{bm}x{bn}x{bk} w{cfg['num_warps']} s{cfg['num_stages']} g{cfg.get('GROUP_M', 1)}",
            "regs_off/on/chan/norms": "/".join(str(got[v]["registers"]) for v in ("off", "stats", "channels", "norms")),
            "spills": sum(r["spill_bytes"] for r in got.values()),
            "smem_KB": off["shared_bytes"] / 1024,
            "buffers_off/on": f"{[b['buffers'] for b in off['buffers']]}/{[b['buffers'] for b in on['buffers']]}",
            "ctas_per_sm": "/".join(str(got[v]["ctas_per_sm"]) for v in ("off", "stats", "channels", "norms")),
            "instructions": _instructions(on),
            "fences": on["gpu_fences"] + chan["gpu_fences"] + norms["gpu_fences"],
            "tile_issue_off/on/norms": "/".join(f"{cycles[v]['issue']:.0f}" for v in ("off", "stats", "norms")),
            "tile_mma_cycles": cycles["off"]["mma"],
            "x_pass_trips": trips,
            "floor_us": floor * 1e6, "est_us": est["off"] * 1e6, "floor_frac": floor / est["off"],
            "waves": tiles / (H100["sms"] * off["ctas_per_sm"]),
            "stats_overhead_est": est["stats"] / est["off"] - 1,
            "stats_overhead_bound": cycles["stats"]["total"] / cycles["off"]["total"] - 1,
            "norms_overhead_est": est["norms"] / est["off"] - 1,
            "channels_overhead_est": est["channels"] / est["off"] - 1,
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
    """Every config in configs/*.json compiled for its GPU's arch in every variant (as the
    launcher caps them): registers, spills, CTAs/SM."""
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
            got = offline.compile_down_proj(torch.bfloat16, cfg, arch)
            out.append({"file": path.name, "arch": arch, "config": cfg,
                        **{k: {v: r[k] for v, r in got.items()} for k in ("registers", "spill_bytes", "ctas_per_sm")}})
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
        "note": "estimates from compiled artifacts and a model; no GPU ran",
        "model": {"l2_hit_cycles": L2_HIT_CYCLES, "issue_per_cycle": ISSUE_PER_CYCLE,
                  "down_proj": "per tile: K loop at the tensor-core rate + tile-loop instructions outside it "
                               "(per-loop SASS counts x trips) at 4 warp-instructions/cycle + one L2 hit per "
                               "extra x-pass load; est = max(HBM time, busiest SM)"},
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
