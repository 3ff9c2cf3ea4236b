"""Tune the Triton down_proj kernel's tiles for one MoE shape on this GPU; write them as data.

For each token count, every candidate tile config runs the kernel (statistics on) on rows
routed top-k at random, and the fastest is kept. The table (``{total rows: config}``) is
merged into ``superexperts_kernels/_triton/configs/<device name>.json`` under the shape's
key, which `get_config` prefers to the family file (``H100.json``, seeded from public
tuned values) on GPUs of that name.

    python -m bench.tune_down_proj --experts 128 --hidden 2048 --inter 768 --top-k 8      # Qwen3-30B-A3B
    python -m bench.tune_down_proj --experts 256 --hidden 7168 --inter 2048 --top-k 8     # DeepSeek-V3/R1
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from ._common import time_fn
from .bench_down_proj import routed_inputs


def candidates(dtype: torch.dtype) -> list[dict]:
    out = []
    grid = itertools.product((16, 32, 64, 128), (64, 128, 256), (32, 64, 128), (1, 8), (4, 8), (3, 4, 5))
    for bm, bn, bk, group, warps, stages in grid:
        if dtype == torch.float32 and (bk > 64 or bn > 128):
            continue  # fp32 tiles of that size do not fit shared memory with 3+ stages
        if bm * bn > 128 * 256 or (bm * bn >= 128 * 256 and warps == 4) or (group > 1 and bm < 64):
            continue
        elem = dtype.itemsize
        if stages * (bm + bn) * bk * elem > 227 * 1024:
            continue  # over the shared memory of an H100 CTA
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps,
                    "num_stages": stages})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--inter", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 64, 256, 1024, 4096, 16384])
    p.add_argument("--out", default=None, help="JSON path (default: the package's configs/ folder)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("tuning needs a CUDA device: the configs are per GPU model")

    from superexperts_kernels._triton import down_proj as tk

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    best: dict[int, dict] = {}
    for tokens in args.tokens:
        x, w, offsets, _ = routed_inputs(args.experts, args.hidden, args.inter, args.top_k, tokens, dtype, device)
        timings = []
        for cfg in candidates(dtype):
            try:
                ms = time_fn(lambda: tk.moe_down_proj_profile_triton(x, w, offsets, None, None, False, False, config=cfg),
                             device, warmup=2, reps=10)
            except Exception as e:  # out of shared memory or registers for this tile
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            timings.append((ms, cfg))
        ms, cfg = min(timings, key=lambda t: t[0])
        best[x.shape[0]] = cfg
        print(f"tokens {tokens:>6} rows {x.shape[0]:>7}: {ms:.3f} ms with {cfg}")

    device_name = torch.cuda.get_device_name(device)
    path = Path(args.out) if args.out else tk._CONFIG_DIR / tk.device_file_name(device_name)
    data = json.loads(path.read_text()) if path.is_file() else {"device_names": [device_name], "source": {}, "shapes": {}}
    key = tk.shape_key(args.experts, args.hidden, args.inter, dtype)
    data["shapes"][key] = {str(rows): cfg for rows, cfg in sorted(best.items())}
    data["source"][key] = f"bench/tune_down_proj.py on {device_name}, top-{args.top_k}, triton {triton.__version__}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    tk.load_device_configs.cache_clear()
    print(f"wrote {key} to {path}")


if __name__ == "__main__":
    main()
