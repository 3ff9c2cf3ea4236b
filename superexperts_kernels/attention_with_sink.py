"""``torch.ops.superexperts.attention_with_sink``: flash attention + per-query sink mass.

The op is a `torch.library.custom_op` with an explicit fake implementation, so
`torch.compile(fullgraph=True)` and CUDA graphs trace through it; the real
implementation validates its inputs and dispatches to the backend chosen by
`superexperts_kernels._backend` (CUDA: Triton; CPU: native, else the chunked torch reference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend
from ._validation import FLOAT_DTYPES, check_dim, check_same_dtype, check_tensor
from .reference.attention import attention_with_sink_reference

OP = "attention_with_sink"
_NAME = f"superexperts.{OP}"
MAX_HEAD_DIM = 256


class SinkAttention(NamedTuple):
    """Result of `attention_with_sink`.

    o: ``[B, Hq, T, D]`` in q.dtype. sink_mass: ``[B, Hq, T]`` fp32, the softmax
    probability on the visible sink keys (positions ``0 .. num_sink_tokens-1``) per query.
    """

    o: torch.Tensor
    sink_mass: torch.Tensor


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits) -> None:
    """Check shapes, dtypes, devices and the scalar arguments."""
    check_tensor(_NAME, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    batch, num_heads, _, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{_NAME}: `q` has head dim {head_dim} (shape {tuple(q.shape)}); it must be in 1..{MAX_HEAD_DIM}")
    dev = q.device
    for name, t in (("k", k), ("v", v)):
        check_tensor(_NAME, name, t, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
        check_same_dtype(_NAME, name, t, "q", q)
        check_dim(_NAME, name, t, 0, batch, "the batch size q.shape[0]")
        check_dim(_NAME, name, t, 3, head_dim, "the head dim q.shape[3]")
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{_NAME}: `k` has {num_kv_heads} heads (shape {tuple(k.shape)}), which must divide the "
            f"{num_heads} query heads of `q`"
        )
    if seq_k == 0:
        raise ValueError(f"{_NAME}: `k` holds no key (shape {tuple(k.shape)}); attention needs at least one")
    check_dim(_NAME, "v", v, 1, num_kv_heads, "the kv heads k.shape[1]")
    check_dim(_NAME, "v", v, 2, seq_k, "the keys k.shape[2]")

    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{_NAME}: `scale` must be a float, got {type(scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"{_NAME}: `causal` must be a bool, got {type(causal).__name__}")
    if not _is_int(num_sink_tokens):
        raise TypeError(f"{_NAME}: `num_sink_tokens` must be an int, got {type(num_sink_tokens).__name__}")
    if num_sink_tokens < 1:
        raise ValueError(f"{_NAME}: `num_sink_tokens` must be >= 1, got {num_sink_tokens}")
    if sliding_window is not None:
        if not _is_int(sliding_window):
            raise TypeError(f"{_NAME}: `sliding_window` must be an int or None, got {type(sliding_window).__name__}")
        if sliding_window < 1:
            raise ValueError(f"{_NAME}: `sliding_window` must be >= 1 (keys including the query's own), got {sliding_window}")
        if not causal:
            raise ValueError(f"{_NAME}: `sliding_window` is defined only together with causal=True")
    if key_padding_mask is not None:
        check_tensor(_NAME, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), device=dev)
        check_dim(_NAME, "key_padding_mask", key_padding_mask, 0, batch, "the batch size q.shape[0]")
        check_dim(_NAME, "key_padding_mask", key_padding_mask, 1, seq_k, "the keys k.shape[2]")
    if sink_logits is not None:
        check_tensor(_NAME, "sink_logits", sink_logits, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        check_dim(_NAME, "sink_logits", sink_logits, 0, num_heads, "the query heads q.shape[1]")


@torch.library.custom_op("superexperts::attention_with_sink", mutates_args=())
def _attention_with_sink_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    num_sink_tokens: int = 1,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits)
    _validate(*args)
    impl = _backend.get_impl(OP, q.device.type)
    return tuple(impl(*args))


def fake_outputs(q, k, v, scale, causal=True, num_sink_tokens=1, sliding_window=None, key_padding_mask=None, sink_logits=None):
    """Validated empty outputs of the right shapes (the fake implementation)."""
    _validate(q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits)
    batch, num_heads, seq_q, head_dim = q.shape
    return (
        q.new_empty(batch, num_heads, seq_q, head_dim),
        torch.empty(batch, num_heads, seq_q, dtype=torch.float32, device=q.device),
    )


_attention_with_sink_op.register_fake(fake_outputs)


def attention_with_sink(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    causal: bool = True,
    num_sink_tokens: int = 1,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> SinkAttention:
    """Softmax attention that also returns, per query, the probability mass on the sink keys,
    without building the ``T x Tk`` attention matrix.

    Query ``i`` sits at absolute position ``p_i = Tk - T + i`` (bottom-right alignment, as
    with a KV cache). Key ``j`` is visible to it when all of these hold: ``j <= p_i`` if
    `causal`; ``p_i - j < sliding_window`` if a window is given; ``key_padding_mask[b, j]``
    if a mask is given. Scores are ``scale * q.k`` with an fp32 softmax; a query that sees
    no key gets ``o = 0`` and ``sink_mass = 0``.

    Args:
        q: ``[B, Hq, T, D]`` fp32/fp16/bf16, ``D <= 256``.
        k, v: ``[B, Hkv, Tk, D]`` in q.dtype, ``Hq % Hkv == 0`` (query head ``h`` reads kv
            head ``h // (Hq // Hkv)``).
        scale: score scale; None means ``D ** -0.5``.
        causal: apply the causal mask.
        num_sink_tokens: ``N >= 1``; the sink keys are key positions ``0 .. N-1``.
        sliding_window: ``W >= 1`` visible keys including the query's own (causal only).
        key_padding_mask: optional bool ``[B, Tk]``, True where a key may be attended.
        sink_logits: optional ``[Hq]`` float learned sink logit per head (GPT-OSS): joins the
            softmax denominator with no value vector; taken in fp32, not scaled.

    Returns:
        `SinkAttention`: ``o [B, Hq, T, D]`` in q.dtype and ``sink_mass [B, Hq, T]`` fp32,
        the sum of the probabilities of the visible sink keys.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = q.shape[-1] ** -0.5
    _validate(q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits)
    return SinkAttention(
        *torch.ops.superexperts.attention_with_sink(
            q, k, v, float(scale), causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits
        )
    )


def _load_triton() -> None:
    from ._triton.attention import attention_with_sink_triton

    _backend.register_impl(OP, "triton", attention_with_sink_triton)


_backend.register_impl(OP, "reference", attention_with_sink_reference)
_backend.register_loader("triton", _load_triton)
