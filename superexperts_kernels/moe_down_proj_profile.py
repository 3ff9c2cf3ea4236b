"""``torch.ops.superexperts.moe_down_proj_profile``: grouped expert down_proj + per-expert stats.

The op is a `torch.library.custom_op` with an explicit fake implementation, so
`torch.compile(fullgraph=True)` and CUDA graphs trace through it; the real
implementation validates its inputs and dispatches to the backend chosen by
`superexperts_kernels._backend` (CUDA: Triton; CPU: native or the torch reference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend
from ._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_offsets_values,
    check_same_dtype,
    check_tensor,
)
from .reference.down_proj import moe_down_proj_profile_reference

OP = "moe_down_proj_profile"
_NAME = f"superexperts.{OP}"


class DownProjProfile(NamedTuple):
    """Result of `moe_down_proj_profile`.

    y: ``[S, H]`` in x.dtype. out_absmax: ``[E]`` fp32 max |y| per expert.
    out_argmax: ``[E, 2]`` int64 (row, or token position when `row_token` is given;
    channel) of that max, -1 for experts without rows. in_absmax: ``[E]`` fp32 max |x|.
    rows: ``[E]`` int64 rows routed to each expert. channel_absmax: ``[E, H]`` fp32
    (``[E, 0]`` unless `channel_stats`).
    """

    y: torch.Tensor
    out_absmax: torch.Tensor
    out_argmax: torch.Tensor
    in_absmax: torch.Tensor
    rows: torch.Tensor
    channel_absmax: torch.Tensor


def _validate(x, w_down, offsets, bias, row_token, w_transposed) -> int:
    """Check shapes, dtypes and devices; return H."""
    check_tensor(_NAME, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_tensor(_NAME, "w_down", w_down, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check_same_dtype(_NAME, "w_down", w_down, "x", x)
    num_experts = w_down.shape[0]
    if num_experts == 0:
        raise ValueError(f"{_NAME}: `w_down` must hold at least one expert, got shape {tuple(w_down.shape)}")
    in_dim, hidden = (1, 2) if w_transposed else (2, 1)
    layout = "[E, I, H] (w_transposed=True)" if w_transposed else "[E, H, I]"
    check_dim(_NAME, "w_down", w_down, in_dim, x.shape[1], f"x.shape[1] (I) for layout {layout}")
    hidden_size = w_down.shape[hidden]
    check_tensor(_NAME, "offsets", offsets, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_dim(_NAME, "offsets", offsets, 0, num_experts, "the number of experts w_down.shape[0]")
    if bias is not None:
        check_tensor(_NAME, "bias", bias, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
        check_same_dtype(_NAME, "bias", bias, "x", x)
        check_dim(_NAME, "bias", bias, 0, num_experts, "the number of experts w_down.shape[0]")
        check_dim(_NAME, "bias", bias, 1, hidden_size, "the output size H of w_down")
    if row_token is not None:
        check_tensor(_NAME, "row_token", row_token, ndim=1, dtypes=INDEX_DTYPES, device=dev)
        check_dim(_NAME, "row_token", row_token, 0, x.shape[0], "the number of rows x.shape[0]")
    if not isinstance(w_transposed, bool):
        raise TypeError(f"{_NAME}: `w_transposed` must be a bool, got {type(w_transposed).__name__}")
    return hidden_size


@torch.library.custom_op("superexperts::moe_down_proj_profile", mutates_args=())
def _moe_down_proj_profile_op(
    x: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    row_token: torch.Tensor | None = None,
    w_transposed: bool = False,
    channel_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate(x, w_down, offsets, bias, row_token, w_transposed)
    check_offsets_values(_NAME, offsets, x.shape[0])
    impl = _backend.get_impl(OP, x.device.type)
    return tuple(impl(x, w_down, offsets, bias, row_token, w_transposed, channel_stats))


def fake_outputs(x, w_down, offsets, bias=None, row_token=None, w_transposed=False, channel_stats=False):
    """Validated empty outputs of the right shapes (the fake implementation)."""
    hidden = _validate(x, w_down, offsets, bias, row_token, w_transposed)
    num_experts = w_down.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (
        x.new_empty(x.shape[0], hidden),
        torch.empty(num_experts, **f32),
        torch.empty(num_experts, 2, dtype=torch.int64, device=x.device),
        torch.empty(num_experts, **f32),
        torch.empty(num_experts, dtype=torch.int64, device=x.device),
        torch.empty(num_experts, hidden if channel_stats else 0, **f32),
    )


_moe_down_proj_profile_op.register_fake(fake_outputs)


def moe_down_proj_profile(
    x: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    row_token: torch.Tensor | None = None,
    *,
    w_transposed: bool = False,
    channel_stats: bool = False,
) -> DownProjProfile:
    """Grouped expert down projection ``y[r] = x[r] @ w_down[e(r)].T (+ bias[e(r)])`` with the
    per-expert statistics of the written ``y`` reduced in the same pass.

    Args:
        x: ``[S, I]`` fp32/fp16/bf16, rows sorted by expert.
        w_down: ``[E, H, I]`` in x.dtype (transformers layout), or ``[E, I, H]`` with
            ``w_transposed=True``.
        offsets: ``[E]`` int32 (or int64) cumulative row ends, as `grouped_mm` takes them;
            rows past ``offsets[-1]`` belong to no expert and get ``y = 0``.
        bias: optional ``[E, H]`` in x.dtype.
        row_token: optional ``[S]`` int64/int32 token position of each row, reported in
            ``out_argmax[:, 0]`` instead of the row index.
        w_transposed: layout of `w_down`.
        channel_stats: also reduce max |y| per (expert, channel).

    Returns:
        `DownProjProfile`. The stats are exactly those of the values written to ``y``.
    """
    _validate(x, w_down, offsets, bias, row_token, w_transposed)
    return DownProjProfile(
        *torch.ops.superexperts.moe_down_proj_profile(
            x, w_down, offsets, bias, row_token, w_transposed, channel_stats
        )
    )


def _load_triton() -> None:
    from ._triton.down_proj import moe_down_proj_profile_triton

    _backend.register_impl(OP, "triton", moe_down_proj_profile_triton)


_backend.register_impl(OP, "reference", moe_down_proj_profile_reference)
_backend.register_loader("triton", _load_triton)
