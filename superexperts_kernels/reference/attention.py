"""Pure-torch reference of `attention_with_sink`: the test oracle, and the backend that serves
the op where no faster one runs or honours the call's arguments (`softcap`, `attn_mask`).

Explicit softmax attention, one chunk of queries at a time, so memory is
O(chunk_size x Tk) per head and the T x Tk matrix is never built at once.
"""

from __future__ import annotations

import torch


def _visible(
    i0: int,
    i1: int,
    seq_q: int,
    seq_k: int,
    causal: bool,
    sliding_window: int | None,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Bool ``[B or 1, 1, i1 - i0, Tk]``: which keys queries ``i0:i1`` may attend."""
    pos_q = torch.arange(i0, i1, device=device)[:, None] + (seq_k - seq_q)
    pos_k = torch.arange(seq_k, device=device)[None, :]
    visible = torch.ones(i1 - i0, seq_k, dtype=torch.bool, device=device)
    if causal:
        visible &= pos_k <= pos_q
    if sliding_window is not None:
        visible &= pos_q - pos_k < sliding_window
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return visible


def attention_with_sink_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    num_sink_tokens: int = 1,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    attn_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the softmax mass on the sink keys, per query.

    Query ``i`` sits at absolute position ``p_i = Tk - T + i`` (bottom-right alignment, as
    with a KV cache). Key ``j`` is visible to query ``i`` when every given mask allows it
    (the masks are ANDed):

    - `causal`: ``j <= p_i``;
    - `sliding_window` ``W`` (only with `causal`): ``p_i - j < W``;
    - `key_padding_mask`: ``key_padding_mask[b, j]``;
    - `attn_mask`: ``attn_mask[b, h, i, j]`` (broadcast over size-1 dims). To use it
      alone, pass ``causal=False``.

    Scores are ``s = scale * q.k`` in fp32, then ``softcap * tanh(s / softcap)`` when
    `softcap` is given. With `sink_logits` (GPT-OSS learned sinks) the softmax denominator
    gains ``exp(sink_logits[h])``, a logit without a value.
    A query that sees no key gets ``o = 0`` and ``sink_mass = 0``. NaN comes out where softmax
    attention gives it: a NaN in q, in a key the query sees, in `scale` or in its sink logit,
    or visible scores that are all ``-inf`` (an overflow), make the query's ``o`` and
    ``sink_mass`` NaN; a NaN in ``v`` reaches ``o`` through ``p @ v``.

    Args:
        q: ``[B, Hq, T, D]`` fp32/fp16/bf16.
        k, v: ``[B, Hkv, Tk, D]``, dtype of `q`; query head ``h`` uses kv head
            ``h // (Hq // Hkv)``.
        scale: score scale, usually ``D ** -0.5``.
        causal: bottom-right aligned causal mask.
        num_sink_tokens: ``N``; the sink keys are key positions ``0 .. N-1``.
        sliding_window: ``W >= 1`` keys including the query's own position, or None.
        key_padding_mask: optional bool ``[B, Tk]``, True where the key may be attended.
        sink_logits: optional ``[Hq]`` float, taken in fp32 as given (not scaled).
        softcap: optional score soft cap ``> 0``.
        attn_mask: optional bool ``[B or 1, Hq or 1, T or 1, Tk]``, True where visible.
        chunk_size: queries per chunk; bounds the scores to ``[B, Hq, chunk_size, Tk]``.

    Returns:
        ``o [B, Hq, T, D]`` in q.dtype and ``sink_mass [B, Hq, T]`` fp32: the sum of the
        softmax probabilities of the visible sink keys.
    """
    if sliding_window is not None and not causal:
        raise ValueError("`sliding_window` is defined only together with causal=True")
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    dev = q.device

    # Query head h = kv_head * group + g: grouping the query heads of one kv head into the
    # row dimension lets one batched matmul serve GQA without copying k or v per head.
    k_t = k.float().transpose(-1, -2)
    v_f = v.float()
    sink = sink_logits.float().view(1, num_heads, 1, 1) if sink_logits is not None else None

    o = torch.empty(batch, num_heads, seq_q, head_dim, dtype=q.dtype, device=dev)
    sink_mass = torch.empty(batch, num_heads, seq_q, dtype=torch.float32, device=dev)
    for i0 in range(0, seq_q, chunk_size):
        i1 = min(seq_q, i0 + chunk_size)
        rows = i1 - i0
        qc = q[:, :, i0:i1].float().reshape(batch, num_kv_heads, group * rows, head_dim)
        # In-place from here on: one [B, Hq, rows, Tk] buffer holds scores, then probabilities.
        s = torch.matmul(qc, k_t).view(batch, num_heads, rows, seq_k).mul_(scale)
        if softcap is not None:
            s.div_(softcap).tanh_().mul_(softcap)

        visible = _visible(i0, i1, seq_q, seq_k, causal, sliding_window, key_padding_mask, dev)
        if attn_mask is not None:
            visible = visible & (attn_mask[:, :, i0:i1] if attn_mask.shape[2] == seq_q else attn_mask)
        s.masked_fill_(~visible, float("-inf"))

        row_max = s.amax(dim=-1, keepdim=True)
        if sink is not None:
            row_max = torch.maximum(row_max, sink)
        # Only a row that sees no key gets max 0 (then o = 0, mass 0). A row that sees keys
        # whose scores are all -inf (q.k or scale overflowed) keeps -inf, and -inf - -inf
        # makes it NaN, as softmax does; a NaN score makes the max NaN, and the row NaN.
        row_max.masked_fill_((row_max == float("-inf")) & ~visible.any(dim=-1, keepdim=True), 0.0)
        p = s.sub_(row_max).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        if sink is not None:
            denom += torch.exp(sink - row_max)
        p.div_(denom.masked_fill_(denom == 0, 1.0))

        oc = torch.matmul(p.view(batch, num_kv_heads, group * rows, seq_k), v_f)
        o[:, :, i0:i1] = oc.view(batch, num_heads, rows, head_dim)
        sink_mass[:, :, i0:i1] = p[..., :num_sink_tokens].sum(dim=-1)
    return o, sink_mass
