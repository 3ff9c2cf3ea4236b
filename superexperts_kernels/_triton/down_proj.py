"""Triton grouped-expert down projection with per-expert statistics in the epilogue.

A persistent kernel: ``min(tiles, SMs x CTAs per SM)`` programs walk the ``[BLOCK_M,
BLOCK_N]`` output tiles in a grouped order (``GROUP_M`` row tiles share their column
sweep, so the x rows they read stay in L2). The rows of a tile all belong to one expert
(rows are sorted by expert; ``offsets`` holds cumulative row ends, the layout `grouped_mm`
uses); each program derives the tile -> expert map from ``offsets`` itself, so the host
launches without reading any device value. The K loop is a plain ``tl.dot`` loop whose
loads feed only the dot, so the software pipeliner gives x and w the same ``num_stages``
shared-memory buffers with and without statistics. On sm_90 and later (16-bit inputs
that TMA can address) x and w are loaded through device-side tensor descriptors (TMA);
elsewhere, and in the interpreter, through pointers (``cp.async``). A TMA tile of x may
hold rows past its expert (the next expert's, or zeros past S): they are never stored and
every statistic masks them per row.

The tile epilogue rounds the fp32 accumulator to the output dtype and stores it; then:

- max |y| per row, two values per instruction on sm_86+ (``max.NaN.xorsign.abs`` on packed
  16-bit pairs, column halves folded down to 8 columns), else one fp32 ``max`` per element
  on the accumulator (rounding is monotone, so the rounded row max is the max of the
  rounded row); a NaN wins, as in ``torch.max``;
- per tile, the max and the first row holding it: for 16-bit outputs one int32 per row,
  ``(bits << 16) | (0xFFFF - row)``, and one int32 max across the tile's warps; packed once
  per tile into an int64 key ``(bits << 32) | (2**32 - 1 - row)`` merged with one relaxed
  ``atomic_max`` per tile (larger value wins, then the first row, as ``torch.argmax``);
- optionally max |y| per (expert, channel), relaxed ``atomic_max`` on the fp32 bits;
- optionally (``row_weight``) the squared norm of each row's columns of the tile, to a
  ``[column tiles, S]`` buffer;
- max |x| of the expert's rows: program ``(m, n)`` reduces the x tiles ``k = n, n + N, ...``
  of its rows (``N`` column blocks; the first one loaded before the store so that its
  latency overlaps it), so x is read once more in all, outside the pipelined loop.

Relaxed atomics need no fence: the kernel only ever merges maxima, and the results are
read after the kernel ends. ``y`` is written once; the finalize kernel (one program per
expert) decodes the keys, reads back the one row of ``y`` holding each expert's max to
find its channel, and sums the row norms per expert.
"""

from __future__ import annotations

import contextvars
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
def _max_nan(a, b):
    """max where a NaN wins, as in ``torch.max``."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _abs_max(v, axis: tl.constexpr, BITS: tl.constexpr):
    """max |v| along `axis`, fp32 in and out; NaN if any entry is NaN. A NaN-propagating
    float max (one ``FMNMX.NAN`` per element), or with `BITS` an int32 max of the fp32 bits
    (|v| orders like its bits, a NaN above +inf), which the interpreter runs as one numpy
    reduction instead of one call per element."""
    if BITS:
        return tl.max(tl.abs(v).to(tl.int32, bitcast=True), axis).to(tl.float32, bitcast=True)
    else:
        return tl.reduce(tl.abs(v), axis, _max_nan)


@triton.jit
def _packed_abs_max(a, b, ASM: tl.constexpr):
    """max(|a|, |b|) elementwise on fp16/bf16 pairs packed in 32-bit registers (sm_86+); the
    signs of the result are garbage (xorsign), NaN wins. Without `ASM` (the interpreter, which
    runs no inline assembly) the same maxima one by one."""
    if not ASM:
        return _max_nan(tl.abs(a.to(tl.float32)), tl.abs(b.to(tl.float32))).to(a.dtype)
    elif a.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("max.NaN.xorsign.abs.bf16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise("max.NaN.xorsign.abs.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _fold_columns(v, BLOCK_M: tl.constexpr, W: tl.constexpr, ASM: tl.constexpr):
    """``[BLOCK_M, W]`` -> ``[BLOCK_M, W // 2]``: `_packed_abs_max` of the columns 8 apart in
    each group of 16, which the MMA layouts keep in one thread."""
    lo, hi = tl.split(tl.permute(tl.reshape(v, (BLOCK_M, W // 16, 2, 8)), (0, 1, 3, 2)))
    return tl.reshape(_packed_abs_max(lo, hi, ASM), (BLOCK_M, W // 2))


@triton.jit
def _row_abs_max_packed(y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FOLDS: tl.constexpr, ASM: tl.constexpr):
    """max |y| per row of a 16-bit ``[BLOCK_M, BLOCK_N]`` tile, fp32: `FOLDS` in-thread folds
    with `_packed_abs_max` (two values per instruction), the rest in fp32."""
    v = y
    if FOLDS >= 1:
        v = _fold_columns(v, BLOCK_M, BLOCK_N, ASM)
    if FOLDS >= 2:
        v = _fold_columns(v, BLOCK_M, BLOCK_N // 2, ASM)
    if FOLDS >= 3:
        v = _fold_columns(v, BLOCK_M, BLOCK_N // 4, ASM)
    if FOLDS >= 4:
        v = _fold_columns(v, BLOCK_M, BLOCK_N // 8, ASM)
    if FOLDS >= 5:
        v = _fold_columns(v, BLOCK_M, BLOCK_N // 16, ASM)
    return _abs_max(v.to(tl.float32), 1, False)


@triton.jit
def _value_bits(v, DTYPE: tl.constexpr):
    """``v`` (fp32, >= 0 or NaN) rounded to the output dtype, as non-negative int32 bits that
    order like the values (a NaN above +inf): the 16-bit pattern for fp16/bf16, the fp32 bits
    for fp32."""
    if DTYPE.primitive_bitwidth == 16:
        return v.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _fp32_bits(v, DTYPE: tl.constexpr):
    """``v`` (fp32, >= 0 or NaN) rounded to the output dtype and back: its fp32 bits, as int32."""
    return v.to(DTYPE).to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _tile_key(row_bits, first_row, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The int64 key of a tile from the `_value_bits` of its row maxima (0 for masked rows):
    ``(bits << 32) | (2**32 - 1 - row)`` with ``row = first_row + `` the first tile row that
    holds the max. 16-bit values pack (bits, row) into one int32 per row, so one reduction
    across the tile's warps finds both; fp32 values take two."""
    local = tl.arange(0, BLOCK_M)
    if DTYPE.primitive_bitwidth == 16:
        packed = tl.max((row_bits << 16) | (0xFFFF - local), 0)
        bits = packed >> 16
        first = 0xFFFF - (packed & 0xFFFF)
    else:
        bits = tl.max(row_bits, 0)
        first = tl.min(tl.where(row_bits == bits, local, BLOCK_M), 0)
    return (bits.to(tl.int64) << 32) | (4294967295 - (first_row + first).to(tl.int64))


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
    sq_ptr,
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
    ROW_NORMS: tl.constexpr,
    USE_TMA: tl.constexpr,
    PACKED_MAX: tl.constexpr,
    FOLDS: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    OUT: tl.constexpr = y_ptr.dtype.element_ty
    e_ids, seg_start, seg_end, tile_ends, seg_tiles = _segments(
        offsets_ptr, num_rows, num_experts, BLOCK_M, E_POW2
    )
    total_m = tl.sum(seg_tiles, 0)
    num_n = tl.cdiv(hidden, BLOCK_N)
    per_group = GROUP_M * num_n
    ks = tl.arange(0, BLOCK_K)
    local_rows = tl.arange(0, BLOCK_M)
    # Offsets of an x tile from its first element (int32: a tile spans BLOCK_M rows).
    x_offsets = local_rows[:, None] * stride_xm + ks[None, :] * stride_xk
    if USE_TMA:
        # Rows of a tile past its expert's end are loaded (the next expert's rows, or zeros
        # past S): they are never stored, and the statistics mask them per row.
        x_desc = tl.make_tensor_descriptor(x_ptr, [num_rows, inter], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        if W_TRANSPOSED:
            w_desc = tl.make_tensor_descriptor(w_ptr, [num_experts, inter, hidden], [stride_we, stride_wk, 1],
                                               [1, BLOCK_K, BLOCK_N])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, [num_experts, hidden, inter], [stride_we, stride_wn, 1],
                                               [1, BLOCK_N, BLOCK_K])

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

        first_row = row_start + (pid_m - tile_start) * BLOCK_M
        rows = first_row + local_rows
        row_mask = rows < row_end
        col0 = pid_n * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        col_mask = cols < hidden

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # The tail rows (e == num_experts) run the loop zero times and store zeros.
        k_end = tl.where(routed, inter, 0)
        if USE_TMA:
            for k0 in range(0, k_end, BLOCK_K):
                a = x_desc.load([first_row, k0])
                if W_TRANSPOSED:
                    b = w_desc.load([e, k0, col0]).reshape(BLOCK_K, BLOCK_N)
                else:
                    b = w_desc.load([e, col0, k0]).reshape(BLOCK_N, BLOCK_K).T
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
            w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
            for k0 in range(0, k_end, BLOCK_K):
                k_mask = ks < inter - k0
                a = tl.load(x_ptrs + k0 * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(w_ptrs + k0 * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        if WITH_STATS:
            # max |x| of the expert's rows: program (m, n) reduces the x tiles k = n, n + N, ...
            # The first one is loaded here, so that its latency overlaps the epilogue.
            x_tile = x_ptr + first_row.to(tl.int64) * stride_xm
            x_rows = local_rows[:, None] < row_end - first_row
            kx = pid_n * BLOCK_K
            x_run = tl.load(x_tile + (x_offsets + kx * stride_xk), mask=x_rows & (ks < k_end - kx)[None, :], other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + e * stride_be + cols * stride_bn, mask=cols < tl.where(routed, hidden, 0), other=0.0)
            acc += bias.to(tl.float32)[None, :]
        y = acc.to(OUT)
        if WITH_STATS and ROW_NORMS:
            # Squared norm of the row's columns of this tile, from y as written.
            if OUT == tl.bfloat16:
                y32 = (y.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            else:
                y32 = y.to(tl.float32)
            tl.store(sq_ptr + pid_n.to(tl.int64) * num_rows + rows, tl.sum(y32 * y32, 1), mask=row_mask)
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn, y,
                 mask=row_mask[:, None] & col_mask[None, :])
        if WITH_STATS:
            # max |y| per row: on the packed 16-bit pairs of y, or on acc (rounding to the
            # output dtype is monotone: the rounded max of a row of acc is the max of its row
            # of y). Columns past H hold 0 (their w was zero-filled); rows past the expert
            # are masked per row.
            if PACKED_MAX:
                row_max = _row_abs_max_packed(y, BLOCK_M, BLOCK_N, FOLDS, not UPCAST)
            else:
                row_max = _abs_max(acc, 1, UPCAST)
            row_bits = tl.where(row_mask, _value_bits(row_max, OUT), 0)
            tl.atomic_max(key_ptr + e, _tile_key(row_bits, first_row, OUT, BLOCK_M), mask=routed, sem="relaxed")
            if CHANNEL_STATS:
                col_max = _abs_max(tl.where(row_mask[:, None], y, 0.0).to(tl.float32), 0, UPCAST)
                tl.atomic_max(chan_bits_ptr + e.to(tl.int64) * hidden + cols, col_max.to(tl.int32, bitcast=True),
                              mask=cols < tl.where(routed, hidden, 0), sem="relaxed")
            if not PACKED_MAX:
                x_run = tl.abs(x_run.to(tl.float32))
            # Two tiles per trip: their loads are in flight together.
            step = num_n * BLOCK_K
            for k0 in range(kx + step, k_end, 2 * step):
                a = tl.load(x_tile + (x_offsets + k0 * stride_xk), mask=x_rows & (ks < inter - k0)[None, :], other=0.0)
                b = tl.load(x_tile + (x_offsets + (k0 + step) * stride_xk),
                            mask=x_rows & (ks < k_end - k0 - step)[None, :], other=0.0)
                if PACKED_MAX:
                    x_run = _packed_abs_max(x_run, _packed_abs_max(a, b, not UPCAST), not UPCAST)
                else:
                    x_run = _max_nan(x_run, _max_nan(tl.abs(a.to(tl.float32)), tl.abs(b.to(tl.float32))))
            x_bits = tl.max(_abs_max(x_run.to(tl.float32), 1, UPCAST).to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
            tl.atomic_max(in_bits_ptr + e, x_bits, mask=kx < k_end, sem="relaxed")


@triton.jit
def _finalize_kernel(
    key_ptr,
    offsets_ptr,
    row_token_ptr,
    y_ptr,
    sq_ptr,
    row_weight_ptr,
    out_absmax_ptr,
    argmax_ptr,
    rows_ptr,
    norm_sum_ptr,
    num_rows,
    hidden,
    num_n,
    stride_ym,
    stride_yn,
    HAS_ROW_TOKEN: tl.constexpr,
    ROW_NORMS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One program per expert: rows, out_absmax, out_argmax and norm_sum.

    The key holds the bits of max |y| and the first row holding it. The channel is the first
    column of that row of ``y`` holding the max: one row of ``y`` read back per expert
    (E x H values, against the S x H the main kernel writes), so that the main kernel needs
    no per-element index. An expert without rows (key 0) gets -1 locations.
    """
    OUT: tl.constexpr = y_ptr.dtype.element_ty
    e = tl.program_id(0)
    end = tl.load(offsets_ptr + e).to(tl.int64)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    tl.store(rows_ptr + e, end - start)
    key = tl.load(key_ptr + e)
    bits = (key >> 32).to(tl.int32)
    if OUT.primitive_bitwidth == 16:
        value = bits.to(tl.int16).to(OUT, bitcast=True).to(tl.float32)
    else:
        value = bits.to(tl.float32, bitcast=True)
    tl.store(out_absmax_ptr + e, value)
    row = tl.where(key != 0, 4294967295 - (key & 4294967295), -1)
    channel = (row * 0 - 1).to(tl.int32)
    if key != 0:
        channel = hidden
        for c0 in range(0, hidden, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            v = tl.abs(tl.load(y_ptr + row * stride_ym + cols * stride_yn, mask=cols < hidden, other=0.0).to(tl.float32))
            hit = tl.where(value != value, v != v, v == value) & (cols < hidden)
            channel = tl.minimum(channel, tl.min(tl.where(hit, cols, hidden), 0))
        if HAS_ROW_TOKEN:
            row = tl.load(row_token_ptr + row).to(tl.int64)
    tl.store(argmax_ptr + 2 * e, row)
    tl.store(argmax_ptr + 2 * e + 1, channel.to(tl.int64))

    norm_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if ROW_NORMS:
        for r0 in range(start, end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            inside = r < end
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for n in range(num_n):
                sq += tl.load(sq_ptr + n * num_rows + r, mask=inside, other=0.0)
            norm_sum += tl.load(row_weight_ptr + r, mask=inside, other=0.0) * tl.sqrt_rn(sq)
    tl.store(norm_sum_ptr + e, tl.sum(norm_sum, 0))


# --------------------------------------------------------------------------- configs


_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1}

# For a GPU without a config file: tiles by rows per expert that fit the shared memory of
# sm_80 (164 KB) and above; fp32 (FMA loops) with smaller K and N blocks, K = 16 so that
# ptxas (Triton 3.7.1 and 3.9) keeps the unrolled K step in registers.
_FALLBACK_16BIT = [
    [16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}],
    [64, {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}],
    [128, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}],
    [None, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}],
]
_FALLBACK_FP32 = [
    [16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}],
    [64, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}],
    [None, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}],
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
def _device_info(index: int) -> tuple[str, int, int]:
    """(name, SMs, compute capability as 10 * major + minor) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count, props.major * 10 + props.minor


def _cuda_info(device: torch.device) -> tuple[str, int, int]:
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())


def get_config(num_rows: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile config for a call: small tiles in the interpreter, else `config_for_device`."""
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIG)
    return config_for_device(_cuda_info(device)[0], num_rows, num_experts, hidden, inter, dtype)


# --------------------------------------------------------------------------- launcher

# CTAs of one config that fit an SM, learned from the first compiled launch (registers and
# shared memory), so that the persistent grid fills the GPU exactly.
_ctas_per_sm: dict[tuple, int] = {}
# Register cap (``maxnreg``) of the 16-bit statistics kernels per config, from the same
# config without statistics (ptxas would otherwise spend registers freely where shared
# memory bounds the occupancy anyway). fp32 (FMA loops, no tensor cores) is left uncapped.
_stats_caps: dict[tuple, int] = {}
STATS_EXTRA_REGISTERS = 16


def stats_register_cap(registers: int, shared_bytes: int, num_warps: int, arch: int, *, extended: bool) -> int:
    """``maxnreg`` for a statistics kernel, from the registers and shared memory of the same
    config without statistics: at most `STATS_EXTRA_REGISTERS` more for the per-expert
    statistics; with channel statistics or row norms (`extended`), the most that keeps the
    same CTAs per SM."""
    from .occupancy import ctas_per_sm

    if not extended:
        return min(255, registers + STATS_EXTRA_REGISTERS)
    ctas = ctas_per_sm(registers, shared_bytes, num_warps, arch)
    cap = 255
    while cap > registers and ctas_per_sm(cap, shared_bytes, num_warps, arch) < ctas:
        cap -= 8
    return max(cap, registers)


def tma_arch(arch: int, dtype: torch.dtype) -> bool:
    """Whether x and w are loaded with tensor descriptors (TMA) on ``sm_<arch>``: sm_90 and
    later, 16-bit inputs (fp32 runs FMA loops from cp.async tiles)."""
    return arch >= 90 and dtype in (torch.float16, torch.bfloat16)


def packed_max_arch(arch: int, dtype: torch.dtype) -> bool:
    """Whether the 16-bit maxima run two per instruction (``max.NaN.xorsign.abs.{bf16x2,
    f16x2}``, sm_86 and later)."""
    return arch >= 86 and dtype in (torch.float16, torch.bfloat16)


def column_folds(cfg: dict) -> int:
    """In-thread folds of a row's columns for `_row_abs_max_packed`: the column groups of 8 that
    one warp's MMA fragment holds, ``BLOCK_N / warps along N / 8`` (halved per fold). Warps
    go along M first, one per 16 rows (Triton's MMA warp layouts)."""
    warps_m = min(cfg["num_warps"], max(1, cfg["BLOCK_M"] // 16))
    groups = cfg["BLOCK_N"] // (cfg["num_warps"] // warps_m) // 8
    return max(0, min(5, groups.bit_length() - 1))


def tma_applies(x: torch.Tensor, w_down: torch.Tensor, arch: int) -> bool:
    """`tma_arch`, and x and w as TMA takes them: unit innermost strides, 16-byte aligned
    bases and outer strides."""
    def aligned(t: torch.Tensor) -> bool:
        return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])

    return tma_arch(arch, x.dtype) and aligned(x) and aligned(w_down)


def _num_programs(x: torch.Tensor, cfg: dict, max_tiles: int, key: tuple) -> int:
    if x.device.type != "cuda":
        return max(1, min(max_tiles, 4))
    sms = _cuda_info(x.device)[1]
    return max(1, min(max_tiles, sms * _ctas_per_sm.get(key, cfg.get("ctas_per_sm", 1))))


def _learn_occupancy(compiled, key: tuple, arch: int) -> None:
    if key in _ctas_per_sm or compiled is None or not hasattr(compiled, "n_regs"):
        return
    from .occupancy import ctas_per_sm

    _ctas_per_sm[key] = ctas_per_sm(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, arch)


def _with_scratch(device: torch.device, launch):
    """Run `launch` with a Triton allocator for the global scratch memory that device-side
    tensor descriptors live in, in a copy of the current context: the caller's allocator
    setting is left as it was."""
    def run():
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
        return launch()

    return contextvars.copy_context().run(run)


def _launch(x, w_down, offsets, bias, y, key, in_bits, chan_bits, sq, w_transposed, with_stats, channel_stats,
            row_norms, cfg):
    num_rows, inter = x.shape
    num_experts = w_down.shape[0]
    hidden = y.shape[1]
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    max_tiles = (triton.cdiv(num_rows, block_m) + num_experts + 1) * triton.cdiv(hidden, block_n)
    upcast = x.device.type != "cuda"
    arch = 0 if upcast else _cuda_info(x.device)[2]
    use_tma = tma_applies(x, w_down, arch)
    occupancy_key = (tuple(sorted(cfg.items())), x.dtype, with_stats, channel_stats, row_norms, bias is not None,
                     use_tma, x.device.index)
    grid = (_num_programs(x, cfg, max_tiles, occupancy_key),)
    if w_transposed:
        stride_wn, stride_wk = w_down.stride(2), w_down.stride(1)
    else:
        stride_wn, stride_wk = w_down.stride(1), w_down.stride(2)
    bias_arg = bias if bias is not None else y
    args = (
        x,
        w_down,
        bias_arg,
        y,
        offsets,
        key,
        in_bits,
        chan_bits,
        sq,
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
        ROW_NORMS=row_norms,
        USE_TMA=use_tma,
        PACKED_MAX=packed_max_arch(arch, x.dtype),
        FOLDS=column_folds(cfg),
        W_TRANSPOSED=w_transposed,
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
    if with_stats and not upcast and x.dtype != torch.float32:
        if occupancy_key not in _stats_caps:
            plain = _moe_down_proj_kernel.warmup(*args, grid=grid, **{**flags, "WITH_STATS": False})
            plain._init_handles()
            _stats_caps[occupancy_key] = stats_register_cap(
                plain.n_regs, plain.metadata.shared, cfg["num_warps"], arch, extended=channel_stats or row_norms
            )
        flags["maxnreg"] = _stats_caps[occupancy_key]

    def launch():
        return _moe_down_proj_kernel[grid](*args, **flags)

    compiled = _with_scratch(x.device, launch) if use_tma else launch()
    if not upcast:
        _learn_occupancy(compiled, occupancy_key, arch)


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
    row_weight: torch.Tensor | None = None,
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

    With `row_weight` (and statistics), each output tile also writes the squared norms of
    its rows' columns to a ``[ceil(H / BLOCK_N), S]`` fp32 buffer (4 bytes per row and
    column tile, against the ``2 * H`` bytes per row of a 16-bit y), which the finalize
    kernel sums per row in a fixed order (deterministic), takes the square root of, and
    sums per expert weighted by `row_weight`.
    """
    num_rows, inter = x.shape
    num_experts = w_down.shape[0]
    hidden = w_down.shape[2] if w_transposed else w_down.shape[1]
    dev = x.device
    cfg = config or get_config(num_rows, num_experts, hidden, inter, x.dtype, dev)
    row_norms = with_stats and row_weight is not None and num_rows > 0
    num_n = triton.cdiv(hidden, cfg["BLOCK_N"])

    y = torch.empty(num_rows, hidden, dtype=x.dtype, device=dev)
    key = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    in_absmax = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    channel_absmax = torch.zeros(num_experts, hidden if channel_stats else 0, dtype=torch.float32, device=dev)
    sq = torch.empty(num_n, num_rows, dtype=torch.float32, device=dev) if row_norms else in_absmax
    if num_rows:
        _launch(x, w_down, offsets, bias, y, key, in_absmax.view(torch.int32), channel_absmax.view(torch.int32), sq,
                w_transposed, with_stats, channel_stats, row_norms, cfg)

    out_absmax = torch.empty(num_experts, dtype=torch.float32, device=dev)
    out_argmax = torch.empty(num_experts, 2, dtype=torch.int64, device=dev)
    rows = torch.empty(num_experts, dtype=torch.int64, device=dev)
    norm_sum = torch.empty(num_experts, dtype=torch.float32, device=dev)
    _finalize_kernel[(num_experts,)](
        key,
        offsets,
        row_token if row_token is not None else offsets,
        y,
        sq,
        row_weight if row_norms else sq,
        out_absmax,
        out_argmax,
        rows,
        norm_sum,
        num_rows,
        hidden,
        num_n,
        y.stride(0),
        y.stride(1),
        HAS_ROW_TOKEN=row_token is not None,
        ROW_NORMS=row_norms,
        BLOCK_H=min(1024, triton.next_power_of_2(max(hidden, 16))),
        BLOCK_R=256,
        num_warps=4,
    )
    return y, out_absmax, out_argmax, in_absmax, rows, channel_absmax, norm_sum
