"""Triton flash-attention forward that also returns the softmax mass on the sink keys.

One program per (block of ``BLOCK_M`` queries, batch * query head), as in the Triton
fused-attention tutorial: the query tile, the running max ``m``, the running denominator
``l`` and the output accumulator stay in registers while the program streams the key and
value blocks its queries can see (online softmax, base-2 exponentials, fp32 state).

Key blocks are visited in three stages (as in the tutorial's ``STAGE``): the edge blocks
at the start of the sliding window, masked element-wise; the blocks every query of the
tile sees entirely (no mask to apply); the edge blocks on the causal diagonal, masked.
Blocks no query of the tile sees are skipped. The key padding mask, when given, applies
to every block. With causal masking the programs of the last query blocks (the most keys)
are launched first, so the short ones fill the tail.

With ``softcap`` (Gemma 2) the scores are ``softcap * tanh(scale * q.k / softcap)``.

The sink mass needs no extra pass: a sink key (position ``< N``) that a query sees lies
in a block that the program visits, because skipped blocks hold only keys that no query
of the tile sees. So while visiting the blocks that start below ``N``, the program adds
the probabilities of their sink columns into ``sink_acc``, rescaled by the same factor as
``l`` whenever the running max moves; the epilogue writes ``sink_acc / l``. With learned
``sink_logits`` the state starts at ``m = sink_logit * log2(e), l = 1``: the extra logit
joins the denominator through the same online update.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend_stage(
    acc, l_i, m_i, sink_acc, q, k_ptrs, v_ptrs, pad_ptr, d_ok, pos_q, lo, full_lo, full_hi, hi,
    seq_k, num_sink, window, qk_scale, softcap, stride_kn, stride_vn, stride_pn,
    STAGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_SINK: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax steps over the key blocks of one stage: 0 = ``[lo, full_lo)`` and
    2 = ``[full_hi, hi)`` with bounds, causal and window masks;
    1 = ``[full_lo, full_hi)``, seen entirely by every query of the tile, unmasked."""
    if STAGE == 0:
        start, end = lo, full_lo
    elif STAGE == 1:
        start, end = full_lo, full_hi
    else:
        start, end = full_hi, hi
    MASKED: tl.constexpr = STAGE != 1
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_k
        k = _load_tile(k_ptrs + tl.cast(start_n, tl.int64) * stride_kn, d_ok, n_ok, not EVEN_D, MASKED)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:
            # qk_scale is scale / softcap here and softcap carries log2(e); tanh(t) = 2 sigmoid(2t) - 1.
            s = softcap * (2.0 * tl.sigmoid(2.0 * s) - 1.0)
        if HAS_PAD:
            key_ok = tl.load(pad_ptr + offs_n * stride_pn, mask=n_ok, other=0) != 0
            s = tl.where(key_ok[None, :], s, float("-inf"))
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= pos_q[:, None])
            if HAS_WINDOW:
                visible = visible & (pos_q[:, None] - offs_n[None, :] < window)
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 there instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + tl.cast(start_n, tl.int64) * stride_vn, n_ok, d_ok, MASKED, not EVEN_D)
        if UPCAST:
            v = v.to(tl.float32)
            p_v = p
        else:
            p_v = p.to(v.dtype)
        acc = tl.dot(p_v, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        if WITH_SINK:
            sink_acc = sink_acc * alpha
            if start_n < num_sink:
                sink_acc += tl.sum(tl.where(offs_n[None, :] < num_sink, p, 0.0), 1)
        m_i = m_new
    return acc, l_i, m_i, sink_acc


@triton.jit
def _sink_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    sink_mass_ptr,
    pad_ptr,
    sink_logits_ptr,
    seq_q,
    seq_k,
    num_heads,
    group_size,
    num_sink,
    window,
    qk_scale,
    softcap,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_pb,
    stride_pn,
    seq_q_bucket,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_SINK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (batch * heads, query blocks): the query blocks vary slowest, so with causal
    # masking reversing them launches the heaviest programs first.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    kv_h = (h // group_size).to(tl.int64)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    past = seq_k - seq_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    pos_q = offs_m + past

    q_ptrs = q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_tile(q_ptrs, m_ok, d_ok, True, not EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = k_ptr + b * stride_kb + kv_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    pad_row = pad_ptr + b * stride_pb

    if HAS_SINK_LOGITS:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sink_logits_ptr + h)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    sink_acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key range [lo, hi) some query of the tile sees, and the block-aligned range
    # [full_lo, full_hi) that every (in-bounds) query of the tile sees entirely.
    first = pid_m * BLOCK_M + past
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_q) - 1 + past
    # Integer divisions only of non-negative values (Triton truncates toward zero). `zero`
    # keeps the bounds int32 tensors where Triton specializes an int argument equal to 1.
    zero = first * 0
    hi = zero + seq_k
    full_hi = zero + seq_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
        full_hi = tl.minimum(full_hi, tl.maximum(first + 1, 0) // BLOCK_N * BLOCK_N)
    lo = zero
    full_lo = zero
    if HAS_WINDOW:
        lo = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = (tl.maximum(last - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    # Without a block seen entirely, the first masked range covers all of [lo, hi).
    no_full = full_lo >= full_hi
    hi_up = (tl.maximum(hi, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = tl.where(no_full, hi_up, full_lo)
    full_hi = tl.where(no_full, hi_up, full_hi)

    for stage in tl.static_range(3):
        acc, l_i, m_i, sink_acc = _attend_stage(
            acc, l_i, m_i, sink_acc, q, k_ptrs, v_ptrs, pad_row, d_ok, pos_q, lo, full_lo, full_hi, hi,
            seq_k, num_sink, window, qk_scale, softcap, stride_kn, stride_vn, stride_pn,
            stage, CAUSAL, HAS_WINDOW, HAS_PAD, HAS_SOFTCAP, WITH_SINK, EVEN_D, UPCAST, DOT_PRECISION, BLOCK_N,
        )

    # l == 0 only for a query that saw no key (and has no learned sink): o = 0, mass = 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = o_ptr + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if WITH_SINK:
        # sink_mass is contiguous [B, Hq, T].
        tl.store(sink_mass_ptr + pid_bh.to(tl.int64) * seq_q + offs_m, sink_acc / l_safe, mask=m_ok)


# --------------------------------------------------------------------------- configs

_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}

# What the Triton launcher supports beyond q, k, v, scale, causal and num_sink_tokens, so
# that the op's dispatch can route a call it cannot serve to another backend.
SUPPORTS = frozenset({"sliding_window", "key_padding_mask", "sink_logits", "softcap"})

# Shared memory per CTA and registers per thread the candidates may plan for: sm_80's
# 164 KB (the smallest of the GPUs the tiles are for) and 255 registers less a margin for
# the sink and softcap paths.
_SMEM_BUDGET = 160 * 1024
_REG_BUDGET = 224


def estimate_resources(block_m: int, block_n: int, block_d: int, num_warps: int, num_stages: int, elem_bytes: int,
                       arch: int = 90) -> dict:
    """Shared memory and registers per thread of one forward config, by a simple model.

    Shared memory: Q once plus ``num_stages`` K and V blocks. Registers: the fp32 output
    accumulator plus twice the fp32 scores (scores, then probabilities) spread over the
    threads, plus a fixed part for addresses, row statistics and the sink sums that is
    larger with 4 warps (each warp holds more rows) and before sm_90 (``mma.sync`` takes
    the probabilities from registers). Fitted to what ptxas allocates for sm_90 and sm_80;
    ``tests/test_triton_compile.py`` checks that no listed config spills.
    """
    threads = 32 * num_warps
    smem = (block_m * block_d + 2 * num_stages * block_n * block_d) * elem_bytes
    fixed = (96 if num_warps >= 8 else 128) + (0 if arch >= 90 else 16)
    regs = (block_m * block_d + 2 * block_m * block_n) / threads + fixed
    return {"shared_bytes": smem, "registers": regs}


def candidate_configs(head_dim: int, dtype: torch.dtype, arch: int = 90) -> list[dict]:
    """The autotune list: BLOCK_M 64/128, BLOCK_N 32/64/128, 2-4 stages, 4 or 8 warps (8 only
    for 128-row blocks), less the configs the resource model says do not fit."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    elem = torch.finfo(dtype).bits // 8
    out = []
    for bm in (128, 64):
        for bn in (128, 64, 32):
            for stages in (2, 3, 4):
                for warps in ((8, 4) if bm == 128 else (4,)):
                    use = estimate_resources(bm, bn, block_d, warps, stages, elem, arch)
                    if use["shared_bytes"] <= _SMEM_BUDGET and use["registers"] <= _REG_BUDGET:
                        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages})
    return out


def get_config(seq_q: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile config when not autotuning: small tiles in the interpreter; on GPU a heuristic by
    head dim and dtype: the Triton tutorial's choices for 16-bit, smaller tiles for fp32 and
    ``D > 128`` (fp32 with ``D > 128`` unpipelined) so that every config compiled for sm_80
    needs under 100 KB of shared memory, which consumer GPUs also have, and none spills.

    Short query blocks (decode) use the smallest tile ``tl.dot`` takes.
    """
    if device.type != "cuda":
        return dict(_INTERPRETER_CONFIG)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        wide = block_d > 128
        cfg = {
            "BLOCK_M": 32 if wide else 64,
            "BLOCK_N": 32,
            "num_warps": 4 if block_d <= 64 else 8,
            "num_stages": 1 if wide else 2,
        }
    elif block_d > 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(seq_q)))
    if cfg["BLOCK_M"] < 64:
        cfg["num_warps"] = 4
    return cfg


def _autotuned_kernel(head_dim: int, dtype: torch.dtype, arch: int):
    """The kernel wrapped in ``triton.autotune`` over `candidate_configs`, keyed by the
    compile-time flags and the query length rounded to a power of 2."""
    key = (head_dim, dtype, arch)
    if key not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
            for c in candidate_configs(head_dim, dtype, arch)
        ]
        _AUTOTUNED[key] = triton.autotune(
            configs=configs,
            key=["seq_q_bucket", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_PAD", "HAS_SINK_LOGITS", "HAS_SOFTCAP", "WITH_SINK"],
        )(_sink_attention_fwd_kernel)
    return _AUTOTUNED[key]


_AUTOTUNED: dict = {}


# --------------------------------------------------------------------------- launcher


def attention_with_sink_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    num_sink_tokens: int = 1,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    softcap: float | None = None,
    *,
    with_sink: bool = True,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of ``superexperts::attention_with_sink``.

    Same arguments and results as
    `superexperts_kernels.reference.attention.attention_with_sink_reference` (without its
    keyword-only extras), plus `softcap` (scores ``softcap * tanh(s / softcap)``, None or 0
    for none); inputs are assumed validated. `with_sink=False` runs the same kernel without
    the sink accumulation (``sink_mass`` is then zeros), to measure what the sink output
    costs. On CUDA fp16/bf16 with ``D <= 128`` the tiles are autotuned over
    `candidate_configs`; `config` fixes them instead.
    """
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    dev = q.device
    o = torch.empty(batch, num_heads, seq_q, head_dim, dtype=q.dtype, device=dev)
    sink_mass = (torch.empty if with_sink else torch.zeros)(batch, num_heads, seq_q, dtype=torch.float32, device=dev)
    if o.numel() == 0:
        return o, sink_mass.zero_()

    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    pad_arg = pad if pad is not None else sink_mass
    pad_strides = pad.stride() if pad is not None else (0, 0)
    upcast = dev.type != "cuda"
    has_softcap = bool(softcap)
    args = (
        q,
        k,
        v,
        o,
        sink_mass,
        pad_arg,
        sink_logits.float() * LOG2E if sink_logits is not None else sink_mass,
        seq_q,
        seq_k,
        num_heads,
        num_heads // num_kv_heads,
        num_sink_tokens,
        sliding_window or 0,
        scale / softcap if has_softcap else scale * LOG2E,
        softcap * LOG2E if has_softcap else 1.0,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        *pad_strides,
    )
    flags = dict(
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        HAS_WINDOW=sliding_window is not None,
        HAS_PAD=pad is not None,
        HAS_SINK_LOGITS=sink_logits is not None,
        HAS_SOFTCAP=has_softcap,
        WITH_SINK=with_sink,
        UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast or q.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    autotune = config is None and not upcast and q.dtype != torch.float32 and head_dim <= 128 and seq_q >= 128
    if autotune:
        major, minor = torch.cuda.get_device_capability(dev)
        kernel = _autotuned_kernel(head_dim, q.dtype, major * 10 + minor)
        grid = lambda meta: (batch * num_heads, triton.cdiv(seq_q, meta["BLOCK_M"]))  # noqa: E731
        kernel[grid](*args, triton.next_power_of_2(seq_q), **flags)
    else:
        cfg = config or get_config(seq_q, head_dim, q.dtype, dev)
        grid = (batch * num_heads, triton.cdiv(seq_q, cfg["BLOCK_M"]))
        _sink_attention_fwd_kernel[grid](
            *args, triton.next_power_of_2(seq_q), **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return o, sink_mass


attention_with_sink_triton.supports = SUPPORTS
