"""Triton grouped-expert down projection with per-expert statistics in the epilogue.

One kernel: every program computes one ``[BLOCK_M, BLOCK_N]`` output tile whose rows all
belong to one expert (rows are sorted by expert; ``offsets`` holds cumulative row ends,
the layout `grouped_mm` uses). The tile epilogue rounds the fp32 accumulator to the
output dtype, stores it, and reduces the rounded values:

- max |y| and where it happened, packed into one int64 key
  ``(float_bits(|y|) << 32) | (2**32 - 1 - flat)`` with ``flat = local_row * H + channel``,
  merged with one ``atomic_max`` per tile: the larger value wins, and among equal values the
  first in row-major order, as ``torch.argmax`` picks;
- optionally max |y| per (expert, channel), ``atomic_max`` on the fp32 bits (values are >= 0,
  so their int32 bits order like the floats);
- max |x| of the expert's rows, by the tiles of the first column block while they stream x.

All maxima are taken on fp32 bit patterns, so a NaN wins (as with ``torch.max``).

``y`` is written once and never read back. The launcher decodes the keys with a few
``[E]``-sized torch ops.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

# The low 32 bits of a key hold ``LOW_MASK - flat``; a key of 0 means "no rows".
LOW_MASK = 2**32 - 1
# Flat in-expert indices must stay below LOW_MASK; larger calls are split into row
# chunks by the launcher.
MAX_FLAT_INDEX = LOW_MASK

_CONFIG_DIR = Path(__file__).parent / "configs"


@triton.jit
def _moe_down_proj_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    offsets_ptr,
    tile_ends_ptr,
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
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(hidden, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    # tile_ends[e] = cumulative count of BLOCK_M row tiles of experts 0..e; entry
    # `num_experts` covers the rows past offsets[-1] that belong to no expert (written as
    # zeros). The grid is an upper bound on the tile count, so the programs past
    # tile_ends[-1] are idle. No early return: the K loop must stay in the entry block for
    # the software pipeliner, so idle and tail programs run it zero times instead.
    e_range = tl.arange(0, E_POW2)
    tile_ends = tl.load(tile_ends_ptr + e_range, mask=e_range <= num_experts, other=2147483647)
    active = pid_m < tl.load(tile_ends_ptr + num_experts)
    e = tl.minimum(tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0), num_experts)
    routed = active & (e < num_experts)
    tile_start = tl.load(tile_ends_ptr + e - 1, mask=e > 0, other=0)
    row_start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    row_end = tl.load(offsets_ptr + e, mask=e < num_experts, other=num_rows)

    # Scalar conditions are folded into bounds rather than and-ed with vectors.
    local_rows = (pid_m - tile_start) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_start + local_rows
    row_mask = rows < tl.where(active, row_end, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    routed_cols = cols < tl.where(routed, hidden, 0)
    out_mask = row_mask[:, None] & col_mask[None, :]

    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_absmax_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
    k_end = tl.where(routed, inter, 0)
    for k0 in range(0, k_end, BLOCK_K):
        k_mask = ks < inter - k0
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if WITH_STATS:
            if pid_n == 0:
                a_bits = tl.abs(a.to(tl.float32)).to(tl.int32, bitcast=True)
                x_absmax_bits = tl.maximum(x_absmax_bits, tl.max(a_bits, axis=1))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + e * stride_be + cols * stride_bn, mask=routed_cols, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, y, mask=out_mask)

    if WITH_STATS:
        # Maxima are taken on the fp32 bits: for values >= 0 they order like the floats, and
        # NaN (above +inf) wins, as torch.max has it.
        bits32 = tl.where(out_mask, tl.abs(y.to(tl.float32)), 0.0).to(tl.int32, bitcast=True)
        bits = bits32.to(tl.int64)
        flat = local_rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        key = tl.where(out_mask, (bits << 32) | (4294967295 - flat), 0)
        tl.atomic_max(key_ptr + e, tl.max(tl.max(key, axis=1), axis=0), mask=routed)
        tl.atomic_max(in_bits_ptr + e, tl.max(x_absmax_bits, axis=0), mask=tl.where(routed, pid_n, 1) == 0)
        if CHANNEL_STATS:
            col_bits = tl.max(bits32, axis=0)
            tl.atomic_max(chan_bits_ptr + e.to(tl.int64) * hidden + cols, col_bits, mask=routed_cols)


# --------------------------------------------------------------------------- configs

_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def _default_cuda_config(rows_per_expert: float, dtype: torch.dtype) -> dict:
    """Heuristic tile sizes for a GPU without a tuned config file."""
    block_k = 32 if dtype == torch.float32 else 64
    if rows_per_expert <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if rows_per_expert <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4}
    if rows_per_expert <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3}


def config_file_name(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device_name: str) -> str:
    dt = str(dtype).replace("torch.", "")
    return f"E={num_experts},H={hidden},I={inter},dtype={dt},device_name={device_name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=None)
def _load_config_file(name: str) -> dict[int, dict] | None:
    path = _CONFIG_DIR / name
    if not path.is_file():
        return None
    with open(path) as f:
        return {int(m): cfg for m, cfg in json.load(f).items()}


def get_config(num_rows: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile config for a call: small tiles in the interpreter, else `config_for_device`."""
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIG)
    return config_for_device(torch.cuda.get_device_name(device), num_rows, num_experts, hidden, inter, dtype)


def config_for_device(device_name: str, num_rows: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> dict:
    """A tuned file from ``configs/`` (written by ``bench/tune_down_proj.py``) keyed by total
    rows, the nearest key winning; else a heuristic by rows per expert."""
    tuned = _load_config_file(config_file_name(num_experts, hidden, inter, dtype, device_name))
    if tuned:
        return dict(tuned[min(tuned, key=lambda m: abs(m - num_rows))])
    return _default_cuda_config(num_rows / max(num_experts, 1), dtype)


# --------------------------------------------------------------------------- launcher


def _launch_chunk(x, w_down, offsets, bias, y, key, in_bits, chan_bits, w_transposed, with_stats, channel_stats, cfg):
    num_rows, inter = x.shape
    num_experts = w_down.shape[0]
    hidden = y.shape[1]
    block_m = cfg["BLOCK_M"]

    ends = offsets.clamp(0, num_rows)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tail = num_rows - ends[-1:]
    tiles = torch.cat([counts, tail]).add_(block_m - 1).div_(block_m, rounding_mode="floor")
    tile_ends = torch.cumsum(tiles, 0, dtype=torch.int32)

    max_m_tiles = triton.cdiv(num_rows, block_m) + num_experts + 1
    grid = (max_m_tiles * triton.cdiv(hidden, cfg["BLOCK_N"]),)
    if w_transposed:
        stride_wn, stride_wk = w_down.stride(2), w_down.stride(1)
    else:
        stride_wn, stride_wk = w_down.stride(1), w_down.stride(2)
    bias_arg = bias if bias is not None else y
    upcast = x.device.type != "cuda"
    _moe_down_proj_kernel[grid](
        x,
        w_down,
        bias_arg,
        y,
        ends,
        tile_ends,
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
        HAS_BIAS=bias is not None,
        WITH_STATS=with_stats,
        CHANNEL_STATS=channel_stats,
        UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast or x.dtype == torch.float32 else "tf32",
        E_POW2=triton.next_power_of_2(num_experts + 1),
        BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _decode(key: torch.Tensor, starts: torch.Tensor, hidden: int):
    """Packed keys ``[E]`` -> (absmax fp32 bits as int64, global row, channel); -1 where empty."""
    bits = key >> 32
    flat = LOW_MASK - (key & LOW_MASK)
    empty = key == 0
    row = torch.where(empty, -1, starts + flat // hidden)
    channel = torch.where(empty, -1, flat % hidden)
    return bits, row, channel


def moe_down_proj_profile_triton(
    x: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    row_token: torch.Tensor | None,
    w_transposed: bool,
    channel_stats: bool,
    *,
    with_stats: bool = True,
    config: dict | None = None,
):
    """Triton implementation of ``superexperts::moe_down_proj_profile``.

    Same arguments and results as
    `superexperts_kernels.reference.down_proj.moe_down_proj_profile_reference`; inputs
    are assumed validated. `with_stats=False` runs the same kernel without the epilogue
    reductions (the stats outputs are then zeros); `config` overrides the tile config.
    """
    num_rows, inter = x.shape
    num_experts = w_down.shape[0]
    hidden = w_down.shape[2] if w_transposed else w_down.shape[1]
    dev = x.device
    cfg = config or get_config(num_rows, num_experts, hidden, inter, x.dtype, dev)

    y = torch.empty(num_rows, hidden, dtype=x.dtype, device=dev)
    ends = offsets.to(torch.int32)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).to(torch.int64)
    rows = ends.to(torch.int64) - starts
    in_bits = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    chan_bits = torch.zeros(num_experts, hidden if channel_stats else 0, dtype=torch.int32, device=dev)

    best_bits = torch.full((num_experts,), -1, dtype=torch.int64, device=dev)
    best_row = torch.full((num_experts,), -1, dtype=torch.int64, device=dev)
    best_channel = torch.full((num_experts,), -1, dtype=torch.int64, device=dev)

    chunk = max(1, MAX_FLAT_INDEX // max(hidden, 1))
    for r0 in range(0, max(num_rows, 1), chunk):
        r1 = min(num_rows, r0 + chunk)
        key = torch.zeros(num_experts, dtype=torch.int64, device=dev)
        if r1 > r0:
            _launch_chunk(
                x[r0:r1], w_down, ends - r0, bias, y[r0:r1], key, in_bits, chan_bits,
                w_transposed, with_stats, channel_stats, cfg,
            )
        bits, row, channel = _decode(key, (starts - r0).clamp(min=0) + r0, hidden)
        better = bits > best_bits  # strict: an earlier chunk wins ties, like argmax
        best_bits = torch.where(better, bits, best_bits)
        best_row = torch.where(better, row, best_row)
        best_channel = torch.where(better, channel, best_channel)

    out_absmax = best_bits.clamp(min=0).to(torch.int32).view(torch.float32)
    if row_token is not None and num_rows > 0:
        token = row_token.to(torch.int64)[best_row.clamp(min=0)]
        best_row = torch.where(best_row >= 0, token, best_row)
    out_argmax = torch.stack([best_row, best_channel], dim=1)
    in_absmax = in_bits.view(torch.float32)
    channel_absmax = chan_bits.view(torch.float32)
    return y, out_absmax, out_argmax, in_absmax, rows, channel_absmax
