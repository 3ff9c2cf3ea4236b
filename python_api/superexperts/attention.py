"""``attn_implementation="superexperts_sink"``: attention that also measures attention sinks.

Attention runs on ``torch.ops.superexperts.attention_with_sink`` (flash-attention cost,
O(T) memory) and the per-query probability mass on the first ``num_sink_tokens`` keys
goes to the active collector, per layer and head.

The mask function registered beside it returns what the fused kernels express: ``None``
or a 2-D key-padding mask ``[B, Tk]`` when the layer's pattern is causal, or causal with
the layer's sliding window (checked by evaluating the model's mask function on probe
rows). Any other pattern (packed sequences, chunked or bidirectional attention, custom
mask functions, static-cache offsets) comes as the 4-D boolean mask transformers builds
for sdpa and goes to the op's ``attn_mask``, as a model's soft cap goes to its
``softcap``: the op runs them on a backend that honours them (and warns once when that is
slower than the device's default), never a silently wrong score.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask

from superexperts_kernels import attention_with_sink

from . import collector as _collector
from .layers import tag_of

NAME = "superexperts_sink"
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _pattern_is_expressible(mask_function, q_length, kv_length, q_offset, kv_offset, local_size, device) -> bool:
    """Does `mask_function` equal the op's causal (+ window `local_size`) pattern on probe rows?

    The op places query i at key position ``kv_length - q_length + i`` (bottom-right); the
    mask function sees absolute indices ``q_offset + i`` and ``kv_offset + j``.
    """
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False
    rows = sorted({0, 1, q_length // 2, q_length - 2, q_length - 1} & set(range(q_length)))
    q = torch.tensor(rows, device=device)
    kv = torch.arange(kv_length, device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    try:
        got = mask_function(zero[:, None, None, None], zero[None, :, None, None], (q + q_offset)[None, None, :, None], (kv + kv_offset)[None, None, None, :])
    except Exception:  # a function that only works under vmap
        return False
    got = torch.as_tensor(got, device=device).expand(1, 1, len(rows), kv_length)[0, 0]
    pos = (kv_length - q_length + q)[:, None]
    want = kv[None, :] <= pos
    if local_size is not None:
        want &= pos - kv[None, :] < local_size
    return bool(torch.equal(got.bool(), want))


def superexperts_sink_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
):
    """AttentionMaskInterface function: ``None``, a 2-D key-padding mask, or a 4-D sdpa mask."""
    if mask_function is not None and allow_is_causal_skip and not use_vmap:
        if _pattern_is_expressible(mask_function, q_length, kv_length, q_offset, kv_offset, local_size, device):
            padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
            if padding is None:
                return None
            padding = padding[:, kv_offset : kv_offset + kv_length].bool()
            return None if bool(padding.all()) else padding
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        use_vmap=use_vmap,
        device=device,
    )


def superexperts_sink_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: query ``[B, Hq, T, D]``, key/value ``[B, Hkv, Tk, D]``
    -> (output ``[B, T, Hq, D]``, None)."""
    if dropout:
        raise ValueError(
            f"{NAME} attention is for inference and does not implement dropout (got dropout={dropout}); "
            "call model.eval() first"
        )
    stats = _collector.active()
    num_sink = stats.num_sink_tokens if stats is not None else 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = sliding_window if causal else None
    sink_logits = s_aux.float() if s_aux is not None else None

    head_dim_v = value.shape[-1]
    if head_dim_v != query.shape[-1]:
        # MLA (DeepSeek-V2/V3) has wider q/k heads than v heads: zero-pad the narrower side
        # (zeros change no score and no output column) and cut the output back.
        width = max(head_dim_v, query.shape[-1])
        query, key = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (query, key))
        value = torch.nn.functional.pad(value, (0, width - head_dim_v))

    key_padding = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
    full_mask = attention_mask if attention_mask is not None and attention_mask.dim() != 2 else None
    if full_mask is not None:  # it already holds the causal, window and padding pattern
        causal, window = False, None
    o, mass = attention_with_sink(
        query, key, value, scale, causal=causal, num_sink_tokens=num_sink, sliding_window=window,
        key_padding_mask=key_padding, sink_logits=sink_logits, softcap=softcap or None, attn_mask=full_mask,
    )

    tag = tag_of(module)
    layer = tag.layer if tag is not None else getattr(module, "layer_idx", None)
    if stats is not None and layer is not None:
        query_valid = None
        if key_padding is not None:
            query_valid = key_padding[:, -query.shape[2] :]
            sink_present = key_padding[:, :num_sink].all(dim=1, keepdim=True)
            if not bool(sink_present.all()):
                _warn_once(
                    "left-padding",
                    f"{NAME}: sequences whose first {num_sink} key position(s) are padding (left padding) are left "
                    "out of the sink statistics: their sink tokens are not at the start",
                )
            query_valid = query_valid & sink_present
        stats.record_sink(layer, mass, query_valid, tag.heads if tag is not None else None)
    return o[..., :head_dim_v].transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="superexperts_sink"`` available to every transformers model."""
    AttentionInterface.register(NAME, superexperts_sink_attention)
    AttentionMaskInterface.register(NAME, superexperts_sink_mask)
