"""``torch.ops.superexperts.moe_down_proj_profile``: grouped expert down_proj + per-expert stats.

The op is a `torch.library.custom_op` with an explicit fake implementation, so
`torch.compile(fullgraph=True)` and CUDA graphs trace through it. Its real implementation
checks the arguments and calls the implementation that `IMPLEMENTATIONS` (below) picks
for the device (`superexperts_kernels._backend`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import native
from ._backend import Impl, OpTable
from ._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    ArgumentTypes,
    check_dim,
    check_offsets_values,
    check_same_dtype,
    check_tensor,
)

OP = "moe_down_proj_profile"
_NAME = f"superexperts.{OP}"

# `row_weight` (the per-expert norm_sum) is honoured by the reference only so far; calls that
# pass it run there.
IMPLEMENTATIONS = OpTable(
    OP,
    defaults={"with_stats": True, "row_weight": None},
    reference=Impl(
        "superexperts_kernels.reference.down_proj:moe_down_proj_profile_reference", options=("with_stats", "row_weight")
    ),
    triton=Impl("superexperts_kernels._triton.down_proj:moe_down_proj_profile_triton", options=("with_stats",)),
    native=Impl("torch:ops.superexperts.moe_down_proj_profile_native", native.DEVICE_TYPES[OP], ("with_stats",)),
)


class DownProjProfile(NamedTuple):
    """Result of `moe_down_proj_profile`.

    y: ``[S, H]`` in x.dtype. out_absmax: ``[E]`` fp32 max |y| per expert.
    out_argmax: ``[E, 2]`` int64 (row, or token position when `row_token` is given;
    channel) of that max, -1 for experts without rows. in_absmax: ``[E]`` fp32 max |x|.
    rows: ``[E]`` int64 rows routed to each expert. channel_absmax: ``[E, H]`` fp32
    (``[E, 0]`` unless `channel_stats`). norm_sum: ``[E]`` fp32, the sum over the expert's
    rows r of ``row_weight[r] * ||y[r]||_2`` (y as written, upcast to fp32); zeros without
    `row_weight` or with ``with_stats=False``.
    """

    y: torch.Tensor
    out_absmax: torch.Tensor
    out_argmax: torch.Tensor
    in_absmax: torch.Tensor
    rows: torch.Tensor
    channel_absmax: torch.Tensor
    norm_sum: torch.Tensor


def _validate(x, w_down, offsets, bias, row_token, w_transposed, row_weight=None) -> int:
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
    if row_weight is not None:
        check_tensor(_NAME, "row_weight", row_weight, ndim=1, dtypes=(torch.float32,), device=dev)
        check_dim(_NAME, "row_weight", row_weight, 0, x.shape[0], "the number of rows x.shape[0]")
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
    with_stats: bool = True,
    check_offsets: bool = True,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate(x, w_down, offsets, bias, row_token, w_transposed, row_weight)
    if check_offsets:
        check_offsets_values(_NAME, offsets, x.shape[0])
    out = tuple(
        IMPLEMENTATIONS(
            x.device.type, x, w_down, offsets, bias, row_token, w_transposed, channel_stats,
            with_stats=with_stats, row_weight=row_weight,
        )
    )
    if len(out) == 6:  # a backend without row_weight: its norm_sum is zeros
        out = (*out, torch.zeros(w_down.shape[0], dtype=torch.float32, device=x.device))
    return out


@_moe_down_proj_profile_op.register_fake
def fake_outputs(
    x, w_down, offsets, bias=None, row_token=None, w_transposed=False, channel_stats=False, with_stats=True,
    check_offsets=True, row_weight=None,
):
    """Validated empty outputs of the right shapes."""
    hidden = _validate(x, w_down, offsets, bias, row_token, w_transposed, row_weight)
    num_experts = w_down.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (
        x.new_empty(x.shape[0], hidden),
        torch.empty(num_experts, **f32),
        torch.empty(num_experts, 2, dtype=torch.int64, device=x.device),
        torch.empty(num_experts, **f32),
        torch.empty(num_experts, dtype=torch.int64, device=x.device),
        torch.empty(num_experts, hidden if channel_stats else 0, **f32),
        torch.empty(num_experts, **f32),
    )


def _native_fake_outputs(*args, **kwargs):
    """The fake of the native op, which has no `row_weight` and no norm_sum output."""
    return fake_outputs(*args, **kwargs)[:6]


if native.BUILT:
    torch.library.register_fake("superexperts::moe_down_proj_profile_native")(_native_fake_outputs)

_ARGUMENT_TYPES = ArgumentTypes(_NAME, torch.ops.superexperts.moe_down_proj_profile.default._schema)


def moe_down_proj_profile(
    x: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    row_token: torch.Tensor | None = None,
    *,
    w_transposed: bool = False,
    channel_stats: bool = False,
    with_stats: bool = True,
    check_offsets: bool = True,
    row_weight: torch.Tensor | None = None,
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
        with_stats: False computes ``y`` only. The outputs keep their shapes: ``rows`` is
            still counted, ``out_absmax``, ``in_absmax`` and ``channel_absmax`` are 0 and
            ``out_argmax`` is -1, as for an expert without rows.
        check_offsets: check the values of `offsets` (see below). Callers that build
            `offsets` as a cumulative sum of row counts (the transformers integration does)
            pass False and keep the call free of host syncs.
        row_weight: optional ``[S]`` fp32 weight of each row (the routing weight g of the
            token-expert pair); ``norm_sum[e]`` sums ``row_weight[r] * ||y[r]||_2`` over
            expert e's rows. Rows past ``offsets[-1]`` are not counted.

    What is checked, and when: the Python types of the arguments here; the ranks, dtypes,
    devices and sizes on every call of the op (no device access); the values of `offsets`
    (non-negative, non-decreasing, ``offsets[-1] <= S``) with `check_offsets`, by one read
    on the host (a device sync on CUDA), skipped while tracing or capturing a CUDA graph.
    Every failed check raises `TypeError`/`ValueError` naming the argument.

    Returns:
        `DownProjProfile`. The stats are exactly those of the values written to ``y``.
    """
    args = (x, w_down, offsets, bias, row_token, w_transposed, channel_stats, with_stats, check_offsets, row_weight)
    _ARGUMENT_TYPES.check(args)
    return DownProjProfile(*torch.ops.superexperts.moe_down_proj_profile(*args))
