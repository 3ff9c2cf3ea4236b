"""Triton grouped-expert down projection with per-expert statistics in the epilogue.

A persistent kernel: ``min(tiles, SMs x CTAs per SM)`` programs walk the ``[BLOCK_M,
BLOCK_N]`` output tiles in a grouped order (``GROUP_M`` row tiles share their column
sweep, so the x rows they read stay in L2). The rows of a tile all belong to one expert
(rows are sorted by expert; ``offsets`` holds cumulative row ends, the layout `grouped_mm`
uses); each program derives the tile -> expert map from ``offsets`` itself, so the host
launches without reading any device value. The K loop is a plain ``tl.dot`` loop whose
loads feed only the dot, so the software pipeliner gives x and w the same ``num_stages``
shared-memory buffers with and without statistics.

The tile epilogue rounds the fp32 accumulator to the output dtype, stores it, and
reduces the rounded values in 32 bits:

- max |y| of the tile (int32 max of the fp32 bits; for values >= 0 they order like the
  floats, and a NaN, above +inf, wins as in ``torch.max``) and the first row-major position
  holding it (int32 min of the tile-local index), packed once per tile into one int64 key
  ``(bits << 32) | (2**32 - 1 - flat)`` with ``flat = local_row * H + channel`` and merged
  with one relaxed ``atomic_max``: the larger value wins, and among equal values the first
  in row-major order, as ``torch.argmax`` picks;
- optionally max |y| per (expert, channel), relaxed ``atomic_max`` on the fp32 bits;
- max |x| of the expert's rows: after its tile, program ``(m, n)`` reduces the x tiles
  ``k = n, n + N, n + 2N, ...`` of its rows (``N`` column blocks), so the whole x tile is
  read once more per row tile, spread over its ``N`` programs, outside the pipelined loop.

Relaxed atomics need no fence: the kernel only ever merges maxima, and the results are
read after the kernel ends. ``y`` is written once and never read back. A one-program
finalize kernel decodes the keys into the op's outputs.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

_CONFIG_DIR = Path(__file__).parent / "configs"


@triton.jit
def _chunk_stats(y, row_mask, chan_ptr, col0, hidden, routed, CHANNEL_STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 WIDTH: tl.constexpr):
    """Max |y| bits per row of a column chunk of a tile; merges its column maxima."""
    # Columns past H hold 0 (their w loads were masked), which never beats a value. Rows
    # past the expert hold 0 too, or the bias: the caller drops their row maxima, and they
    # are zeroed here only when they reach the column maxima.
    bits = tl.abs(y.to(tl.float32)).to(tl.int32, bitcast=True)
    if CHANNEL_STATS:
        if HAS_BIAS:
            bits = tl.where(row_mask[:, None], bits, 0)
        cols = col0 + tl.arange(0, WIDTH)
        tl.atomic_max(chan_ptr + cols, tl.max(bits, 0), mask=cols < tl.where(routed, hidden, 0), sem="relaxed")
    return tl.max(bits, 1)


@triton.jit
def _tile_row_max(y, row_mask, chan_ptr, col0, hidden, routed, CHANNEL_STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Max |y| fp32 bits per row of a ``[BLOCK_M, BLOCK_N]`` tile; with `CHANNEL_STATS` also merges
    its column maxima into ``chan_ptr[col0:]``. A column reduction leaves one value per column
    and thread, so wide tiles go by column quarters, each one's registers freed before the
    next one's are taken."""
    if CHANNEL_STATS and BLOCK_N >= 128:
        Q: tl.constexpr = BLOCK_N // 4
        # Column 2Q * a + Q * b + q goes to [q, a, b]; split takes b, then a.
        y_b0, y_b1 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, 2, Q)), (0, 3, 1, 2)))
        y0, y2 = tl.split(y_b0)
        y1, y3 = tl.split(y_b1)
        r0 = _chunk_stats(y0, row_mask, chan_ptr, col0, hidden, routed, CHANNEL_STATS, HAS_BIAS, Q)
        r1 = _chunk_stats(y1, row_mask, chan_ptr, col0 + Q, hidden, routed, CHANNEL_STATS, HAS_BIAS, Q)
        r2 = _chunk_stats(y2, row_mask, chan_ptr, col0 + 2 * Q, hidden, routed, CHANNEL_STATS, HAS_BIAS, Q)
        r3 = _chunk_stats(y3, row_mask, chan_ptr, col0 + 3 * Q, hidden, routed, CHANNEL_STATS, HAS_BIAS, Q)
        row_bits = tl.maximum(tl.maximum(r0, r1), tl.maximum(r2, r3))
    else:
        row_bits = _chunk_stats(y, row_mask, chan_ptr, col0, hidden, routed, CHANNEL_STATS, HAS_BIAS, BLOCK_N)
    return tl.where(row_mask, row_bits, 0)


@triton.jit
def _segments(offsets_ptr, num_rows, num_experts, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row segments ``[start, end)`` per expert (entry ``num_experts``: the rows past the last
    expert, written as zeros; later entries empty), clamped to ``[0, num_rows]``, and the
    cumulative count of ``BLOCK_M`` row tiles."""
    e = tl.arange(0, E_POW2)
    end = tl.load(offsets_ptr + e, mask=e < num_experts, other=0).to(tl.int32)
    end = tl.where(e < num_experts, tl.minimum(tl.maximum(end, 0), num_rows), num_rows)
    start = tl.load(offsets_ptr + e - 1, mask=(e > 0) & (e <= num_experts), other=0).to(tl.int32)
    start = tl.where(e == 0, 0, tl.where(e <= num_experts, tl.minimum(tl.maximum(start, 0), num_rows), num_rows))
    tiles = (tl.maximum(end - start, 0) + BLOCK_M - 1) // BLOCK_M
    return e, start, end, tl.cumsum(tiles, 0), tiles


@triton.jit
def _moe_down_proj_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    offsets_ptr,
    key_ptr,
    in_bits_ptr,
    chan_bits_ptr,
    num_rows,
    hidden,
    inter,
    num_experts,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    WITH_STATS: tl.constexpr,
    CHANNEL_STATS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    e_ids, seg_start, seg_end, tile_ends, seg_tiles = _segments(
        offsets_ptr, num_rows, num_experts, BLOCK_M, E_POW2
    )
    total_m = tl.sum(seg_tiles, 0)
    num_n = tl.cdiv(hidden, BLOCK_N)
    per_group = GROUP_M * num_n
    ks = tl.arange(0, BLOCK_K)

    for tile in range(tl.program_id(0), total_m * num_n, tl.num_programs(0)):
        first_m = tile // per_group * GROUP_M
        group_rows = tl.minimum(total_m - first_m, GROUP_M)
        pid_m = first_m + tile % per_group % group_rows
        pid_n = tile % per_group // group_rows

        e = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
        this = e_ids == e
        tile_start = tl.sum(tl.where(this, tile_ends - seg_tiles, 0), 0)
        row_start = tl.sum(tl.where(this, seg_start, 0), 0)
        row_end = tl.sum(tl.where(this, seg_end, 0), 0)
        routed = e < num_experts

        local_rows_0 = (pid_m - tile_start) * BLOCK_M
        local_rows = local_rows_0 + tl.arange(0, BLOCK_M)
        rows = row_start + local_rows
        row_mask = local_rows < row_end - row_start
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < hidden
        out_mask = row_mask[:, None] & col_mask[None, :]

        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # The tail rows (e == num_experts) run the loop zero times and store zeros.
        k_end = tl.where(routed, inter, 0)
        for k0 in range(0, k_end, BLOCK_K):
            k_mask = ks < inter - k0
            a = tl.load(x_ptrs + k0 * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs + k0 * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            bias = tl.load(bias_ptr + e * stride_be + cols * stride_bn, mask=cols < tl.where(routed, hidden, 0), other=0.0)
            acc += bias.to(tl.float32)[None, :]
        y = acc.to(y_ptr.dtype.element_ty)

        if WITH_STATS:
            row_bits = _tile_row_max(y, row_mask, chan_bits_ptr + e.to(tl.int64) * hidden, pid_n * BLOCK_N, hidden,
                                     routed, CHANNEL_STATS, HAS_BIAS, BLOCK_M, BLOCK_N)
            tile_bits = tl.max(row_bits, 0)
            first_row = tl.min(tl.where(row_bits == tile_bits, tl.arange(0, BLOCK_M), BLOCK_M), 0)
            key = (tile_bits.to(tl.int64) << 32) | (4294967295 - (row_start + local_rows_0 + first_row).to(tl.int64))
            tl.atomic_max(key_ptr + e, key, mask=routed, sem="relaxed")

        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, y, mask=out_mask)

        if WITH_STATS:
            x_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for k0 in range(pid_n * BLOCK_K, k_end, num_n * BLOCK_K):
                k_mask = ks < inter - k0
                a = tl.load(x_ptrs + k0 * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                x_bits = tl.maximum(x_bits, tl.max(tl.abs(a.to(tl.float32)).to(tl.int32, bitcast=True), 1))
            tl.atomic_max(in_bits_ptr + e, tl.max(x_bits, 0), mask=pid_n * BLOCK_K < tl.where(routed, inter, 0), sem="relaxed")


@triton.jit
def _finalize_kernel(
    key_ptr,
    offsets_ptr,
    row_token_ptr,
    y_ptr,
    out_absmax_ptr,
    argmax_ptr,
    rows_ptr,
    hidden,
    stride_ym,
    stride_yn,
    HAS_ROW_TOKEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per expert: rows, out_absmax and out_argmax from its key.

    The key holds the max |y| bits and the first row holding it; the channel is the first
    column of that row of ``y`` whose |y| has those bits (one row of ``y`` read back per
    expert). An expert without rows (key 0) gets -1 locations.
    """
    e = tl.program_id(0)
    end = tl.load(offsets_ptr + e).to(tl.int64)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    tl.store(rows_ptr + e, end - start)
    key = tl.load(key_ptr + e)
    bits = (key >> 32).to(tl.int32)
    tl.store(out_absmax_ptr + e, bits.to(tl.float32, bitcast=True))
    row = tl.where(key != 0, 4294967295 - (key & 4294967295), -1)
    channel = (row * 0 - 1).to(tl.int32)
    if key != 0:
        channel = hidden
        for c0 in range(0, hidden, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            v = tl.load(y_ptr + row * stride_ym + cols * stride_yn, mask=cols < hidden, other=0.0)
            hit = (tl.abs(v.to(tl.float32)).to(tl.int32, bitcast=True) == bits) & (cols < hidden)
            channel = tl.minimum(channel, tl.min(tl.where(hit, cols, hidden), 0))
        if HAS_ROW_TOKEN:
            row = tl.load(row_token_ptr + row).to(tl.int64)
    tl.store(argmax_ptr + 2 * e, row)
    tl.store(argmax_ptr + 2 * e + 1, channel.to(tl.int64))


# --------------------------------------------------------------------------- configs


_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1}

# For a GPU without a config file: tiles by rows per expert that fit the shared memory of
# sm_80 (164 KB) and above; fp32 with smaller K and N blocks.
_FALLBACK_16BIT = [
    [16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}],
    [64, {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}],
    [128, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}],
    [None, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}],
]
_FALLBACK_FP32 = [
    [16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}],
    [64, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}],
    [None, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}],
]


def device_file_name(device_name: str) -> str:
    """``configs/`` file of a GPU model: its name with runs of other characters as ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_") + ".json"


def shape_key(num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> str:
    """Key of a tuned table in a device file; fp16 and bf16 share tables (same tile bytes)."""
    kind = "fp32" if dtype == torch.float32 else "16bit"
    return f"E={num_experts},H={hidden},I={inter},{kind}"


@functools.lru_cache(maxsize=None)
def load_device_configs(device_name: str) -> dict:
    """The ``configs/`` file for `device_name`: the file named after it (written by
    ``bench/tune_down_proj.py``), else the file of its family (``H100.json`` for
    "NVIDIA H100 80GB HBM3"), else ``{}``."""
    candidates = [device_file_name(device_name)]
    candidates += sorted(p.name for p in _CONFIG_DIR.glob("*.json") if p.stem in re.split(r"[^A-Za-z0-9]+", device_name))
    for name in candidates:
        path = _CONFIG_DIR / name
        if path.is_file():
            with open(path) as f:
                return json.load(f)
    return {}


def _pick(table: list, value: float) -> dict:
    for limit, cfg in table:
        if limit is None or value <= limit:
            return cfg
    return table[-1][1]


def config_for_device(device_name: str, num_rows: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> dict:
    """Tile config for a call on GPU `device_name`.

    From its ``configs/`` file: the table tuned for this (E, H, I) keyed by total rows
    (the key nearest in log scale wins), else the file's ``default`` table by rows per
    expert; without a file, a heuristic that fits every GPU from sm_80 on. fp32 always
    takes the heuristic (the files hold 16-bit tiles).
    """
    rows_per_expert = num_rows / max(num_experts, 1)
    if dtype == torch.float32:
        return dict(_pick(_FALLBACK_FP32, rows_per_expert))
    configs = load_device_configs(device_name)
    tuned = configs.get("shapes", {}).get(shape_key(num_experts, hidden, inter, dtype))
    if tuned:
        m = min(tuned, key=lambda k: abs(math.log2(int(k)) - math.log2(max(num_rows, 1))))
        return dict(tuned[m])
    return dict(_pick(configs.get("default", _FALLBACK_16BIT), rows_per_expert))


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count


def get_config(num_rows: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile config for a call: small tiles in the interpreter, else `config_for_device`."""
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIG)
    name, _ = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    return config_for_device(name, num_rows, num_experts, hidden, inter, dtype)


# --------------------------------------------------------------------------- launcher

# CTAs of one config that fit an SM, learned from the first compiled launch (registers and
# shared memory), so that the persistent grid fills the GPU exactly.
_ctas_per_sm: dict[tuple, int] = {}
# Register cap of the 16-bit stats kernel per config: what the same config needs without
# stats, plus 16 (ptxas would otherwise spend registers freely where shared memory bounds
# the occupancy anyway). fp32 (FMA loops, no tensor cores) is left uncapped.
_stats_caps: dict[tuple, int] = {}
STATS_EXTRA_REGISTERS = 16


def stats_register_cap(registers_without_stats: int) -> int:
    """``maxnreg`` for the kernel with (per-expert) statistics, from the same config's
    registers without them."""
    return min(255, registers_without_stats + STATS_EXTRA_REGISTERS)


def _num_programs(x: torch.Tensor, cfg: dict, max_tiles: int, key: tuple) -> int:
    if x.device.type != "cuda":
        return max(1, min(max_tiles, 4))
    _, sms = _device_info(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return max(1, min(max_tiles, sms * _ctas_per_sm.get(key, cfg.get("ctas_per_sm", 1))))


def _learn_occupancy(compiled, key: tuple, device: torch.device) -> None:
    if key in _ctas_per_sm or compiled is None or not hasattr(compiled, "n_regs"):
        return
    from .occupancy import ctas_per_sm

    props = torch.cuda.get_device_properties(device)
    _ctas_per_sm[key] = ctas_per_sm(
        compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, props.major * 10 + props.minor
    )


def _launch(x, w_down, offsets, bias, y, key, in_bits, chan_bits, w_transposed, with_stats, channel_stats, cfg):
    num_rows, inter = x.shape
    num_experts = w_down.shape[0]
    hidden = y.shape[1]
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    max_tiles = (triton.cdiv(num_rows, block_m) + num_experts + 1) * triton.cdiv(hidden, block_n)
    occupancy_key = (tuple(sorted(cfg.items())), x.dtype, with_stats, channel_stats, bias is not None, x.device.index)
    grid = (_num_programs(x, cfg, max_tiles, occupancy_key),)
    if w_transposed:
        stride_wn, stride_wk = w_down.stride(2), w_down.stride(1)
    else:
        stride_wn, stride_wk = w_down.stride(1), w_down.stride(2)
    bias_arg = bias if bias is not None else y
    upcast = x.device.type != "cuda"
    args = (
        x,
        w_down,
        bias_arg,
        y,
        offsets,
        key,
        in_bits,
        chan_bits,
        num_rows,
        hidden,
        inter,
        num_experts,
        x.stride(0),
        x.stride(1),
        w_down.stride(0),
        stride_wn,
        stride_wk,
        bias_arg.stride(0),
        bias_arg.stride(1),
        y.stride(0),
        y.stride(1),
    )
    flags = dict(
        HAS_BIAS=bias is not None,
        WITH_STATS=with_stats,
        CHANNEL_STATS=channel_stats,
        UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast or x.dtype == torch.float32 else "tf32",
        E_POW2=triton.next_power_of_2(num_experts + 1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg.get("GROUP_M", 1),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if with_stats and not channel_stats and not upcast and x.dtype != torch.float32:
        if occupancy_key not in _stats_caps:
            plain = _moe_down_proj_kernel.warmup(*args, grid=grid, **{**flags, "WITH_STATS": False})
            plain._init_handles()
            _stats_caps[occupancy_key] = stats_register_cap(plain.n_regs)
        flags["maxnreg"] = _stats_caps[occupancy_key]
    compiled = _moe_down_proj_kernel[grid](*args, **flags)
    if not upcast:
        _learn_occupancy(compiled, occupancy_key, x.device)


def moe_down_proj_profile_triton(
    x: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    row_token: torch.Tensor | None,
    w_transposed: bool,
    channel_stats: bool,
    with_stats: bool = True,
    *,
    config: dict | None = None,
):
    """Triton implementation of ``superexperts::moe_down_proj_profile``.

    Same arguments and results as
    `superexperts_kernels.reference.down_proj.moe_down_proj_profile_reference`; inputs
    are assumed validated (``offsets`` values are clamped to ``[0, S]`` in the kernel, so
    bad values cannot make it read or write out of bounds). `with_stats=False` runs the
    same kernel without the epilogue reductions (the stats outputs are then zeros, the
    locations -1); `config` overrides the tile config. Reads no device value on the host:
    a few allocations and two kernel launches.
    """
    num_rows, inter = x.shape
    num_experts = w_down.shape[0]
    hidden = w_down.shape[2] if w_transposed else w_down.shape[1]
    dev = x.device
    cfg = config or get_config(num_rows, num_experts, hidden, inter, x.dtype, dev)

    y = torch.empty(num_rows, hidden, dtype=x.dtype, device=dev)
    key = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    in_absmax = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    channel_absmax = torch.zeros(num_experts, hidden if channel_stats else 0, dtype=torch.float32, device=dev)
    if num_rows:
        _launch(x, w_down, offsets, bias, y, key, in_absmax.view(torch.int32), channel_absmax.view(torch.int32),
                w_transposed, with_stats, channel_stats, cfg)

    out_absmax = torch.empty(num_experts, dtype=torch.float32, device=dev)
    out_argmax = torch.empty(num_experts, 2, dtype=torch.int64, device=dev)
    rows = torch.empty(num_experts, dtype=torch.int64, device=dev)
    _finalize_kernel[(num_experts,)](
        key,
        offsets,
        row_token if row_token is not None else offsets,
        y,
        out_absmax,
        out_argmax,
        rows,
        hidden,
        y.stride(0),
        y.stride(1),
        HAS_ROW_TOKEN=row_token is not None,
        BLOCK_H=min(1024, triton.next_power_of_2(max(hidden, 16))),
        num_warps=4,
    )
    return y, out_absmax, out_argmax, in_absmax, rows, channel_absmax
