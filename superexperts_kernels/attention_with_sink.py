"""``torch.ops.superexperts.attention_with_sink``: flash attention + per-query sink mass.

The op is a `torch.library.custom_op` with an explicit fake implementation, so
`torch.compile(fullgraph=True)` and CUDA graphs trace through it. Its real implementation
checks the arguments and calls the implementation that `IMPLEMENTATIONS` (below) picks
for the device and for the optional arguments the call uses (`softcap` and `attn_mask`
only where a backend honours them; see `superexperts_kernels._backend`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import native
from ._backend import Impl, OpTable
from ._validation import FLOAT_DTYPES, ArgumentTypes, check_dim, check_same_dtype, check_tensor

OP = "attention_with_sink"
_NAME = f"superexperts.{OP}"
MAX_HEAD_DIM = 256

IMPLEMENTATIONS = OpTable(
    OP,
    defaults={"softcap": None, "attn_mask": None},
    reference=Impl("superexperts_kernels.reference.attention:attention_with_sink_reference", options=("softcap", "attn_mask")),
    triton=Impl("superexperts_kernels._triton.attention:attention_with_sink_triton", options=("softcap",)),
    native=Impl("torch:ops.superexperts.attention_with_sink_native", native.DEVICE_TYPES[OP]),
)


class SinkAttention(NamedTuple):
    """Result of `attention_with_sink`.

    o: ``[B, Hq, T, D]`` in q.dtype. sink_mass: ``[B, Hq, T]`` fp32, the softmax
    probability on the visible sink keys (positions ``0 .. num_sink_tokens-1``) per query.
    """

    o: torch.Tensor
    sink_mass: torch.Tensor


def _validate(
    q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits, softcap, attn_mask
) -> None:
    """Check shapes, dtypes, devices and the values of the scalar arguments."""
    check_tensor(_NAME, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    batch, num_heads, seq_q, head_dim = q.shape
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

    if num_sink_tokens < 1:
        raise ValueError(f"{_NAME}: `num_sink_tokens` must be >= 1, got {num_sink_tokens}")
    if sliding_window is not None:
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
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{_NAME}: `softcap` must be > 0 or None, got {softcap}")
    if attn_mask is not None:
        check_tensor(_NAME, "attn_mask", attn_mask, ndim=4, dtypes=(torch.bool,), device=dev)
        for dim, size, what in ((0, batch, "the batch size q.shape[0]"), (1, num_heads, "the query heads q.shape[1]"),
                                (2, seq_q, "the queries q.shape[2]")):
            check_dim(_NAME, "attn_mask", attn_mask, dim, size, what, broadcast=True)
        check_dim(_NAME, "attn_mask", attn_mask, 3, seq_k, "the keys k.shape[2]")


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
    softcap: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits)
    _validate(*args, softcap, attn_mask)
    return tuple(IMPLEMENTATIONS(q.device.type, *args, softcap=softcap, attn_mask=attn_mask))


@_attention_with_sink_op.register_fake
def fake_outputs(
    q, k, v, scale, causal=True, num_sink_tokens=1, sliding_window=None, key_padding_mask=None, sink_logits=None,
    softcap=None, attn_mask=None,
):
    """Validated empty outputs of the right shapes; also the fake of the native op."""
    _validate(q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits, softcap, attn_mask)
    batch, num_heads, seq_q, head_dim = q.shape
    return (
        q.new_empty(batch, num_heads, seq_q, head_dim),
        torch.empty(batch, num_heads, seq_q, dtype=torch.float32, device=q.device),
    )


if native.BUILT:
    torch.library.register_fake("superexperts::attention_with_sink_native")(fake_outputs)

_ARGUMENT_TYPES = ArgumentTypes(_NAME, torch.ops.superexperts.attention_with_sink.default._schema)


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
    softcap: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> SinkAttention:
    """Softmax attention that also returns, per query, the probability mass on the sink keys,
    without building the ``T x Tk`` attention matrix.

    Query ``i`` sits at absolute position ``p_i = Tk - T + i`` (bottom-right alignment, as
    with a KV cache). Key ``j`` is visible to it when all of these hold: ``j <= p_i`` if
    `causal`; ``p_i - j < sliding_window`` if a window is given; ``key_padding_mask[b, j]``
    and ``attn_mask[b, h, i, j]`` if given. Scores are ``scale * q.k``, then
    ``softcap * tanh(s / softcap)`` if a soft cap is given, with an fp32 softmax; a query
    that sees no key gets ``o = 0`` and ``sink_mass = 0``.

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
        softcap: optional score soft cap ``> 0`` (Gemma 2).
        attn_mask: optional bool ``[B or 1, Hq or 1, T or 1, Tk]``, True where query ``i``
            may attend key ``j``: any pattern (packed sequences, chunked attention). To use
            it alone, pass ``causal=False``.

    `softcap` and `attn_mask` run on the backends that honour them (the torch reference
    today); the first call that needs another backend than the device's default says so
    in a warning.

    Returns:
        `SinkAttention`: ``o [B, Hq, T, D]`` in q.dtype and ``sink_mass [B, Hq, T]`` fp32,
        the sum of the probabilities of the visible sink keys.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = q.shape[-1] ** -0.5
    args = (q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits, softcap, attn_mask)
    _ARGUMENT_TYPES.check(args)
    return SinkAttention(*torch.ops.superexperts.attention_with_sink(q, k, v, float(scale), *args[4:]))
