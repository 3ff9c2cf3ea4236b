"""Pure-torch reference of `moe_down_proj_profile`: the test oracle, and the backend that serves
the op where no faster one runs.

One matmul per expert with rows, accumulated in fp32 and rounded once to `x.dtype`
(what the Triton kernel does), then the statistics of the rounded values.
"""

from __future__ import annotations

import torch


def moe_down_proj_profile_reference(
    x: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    row_token: torch.Tensor | None,
    w_transposed: bool,
    channel_stats: bool,
    *,
    with_stats: bool = True,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped down projection with per-expert statistics.

    Args:
        x: ``[S, I]`` rows sorted by expert; fp32, fp16 or bf16.
        w_down: ``[E, H, I]`` (or ``[E, I, H]`` when `w_transposed`), dtype of `x`.
        offsets: ``[E]`` int32/int64 cumulative row ends; rows ``offsets[-1]:`` belong
            to no expert and get ``y = 0``.
        bias: optional ``[E, H]``, dtype of `x`.
        row_token: optional ``[S]`` integer token position of each row; when given,
            ``out_argmax[:, 0]`` holds the token position instead of the row.
        w_transposed: weight layout flag, see `w_down`.
        channel_stats: also return the per-expert, per-channel max ``[E, H]``.
        with_stats: False computes ``y`` only: ``rows`` is still counted, the other stats
            stay 0 (``out_argmax`` -1).
        row_weight: optional ``[S]`` fp32 weight of each row.

    Returns:
        ``y [S, H]`` (x.dtype), ``out_absmax [E]`` fp32, ``out_argmax [E, 2]`` int64
        (row or token, channel; -1 for an expert without rows), ``in_absmax [E]`` fp32,
        ``rows [E]`` int64, ``channel_absmax`` fp32 ``[E, H]`` (``[E, 0]`` when off),
        ``norm_sum [E]`` fp32: sum over the expert's rows of ``row_weight[r] * ||y[r]||_2``
        (of y as written, in fp32; zeros without `row_weight` or stats).
    """
    num_rows = x.shape[0]
    num_experts = w_down.shape[0]
    hidden = w_down.shape[2] if w_transposed else w_down.shape[1]
    dev = x.device

    ends = offsets.to(torch.int64)
    rows = torch.diff(ends, prepend=ends.new_zeros(1))
    y = torch.zeros(num_rows, hidden, dtype=x.dtype, device=dev)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            we = w_down[e].float()
            acc = x[start:end].float() @ (we if w_transposed else we.t())
            if bias is not None:
                acc += bias[e].float()
            y[start:end] = acc.to(x.dtype)
        start = end

    out_absmax = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    out_argmax = torch.full((num_experts, 2), -1, dtype=torch.int64, device=dev)
    in_absmax = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    channel_absmax = torch.zeros(num_experts, hidden if channel_stats else 0, dtype=torch.float32, device=dev)
    norm_sum = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    routed = int(ends[-1]) if num_experts else 0
    if not with_stats or routed == 0:
        return y, out_absmax, out_argmax, in_absmax, rows, channel_absmax, norm_sum

    # Segment reductions over the routed rows; ties go to the first row, then the first channel.
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=dev), rows)
    a = y[:routed].float().abs()
    row_max, row_channel = a.max(dim=1)
    out_absmax.scatter_reduce_(0, expert_of_row, row_max, "amax")
    row_ids = torch.arange(routed, device=dev)
    first = torch.full((num_experts,), routed, dtype=torch.int64, device=dev)
    best = out_absmax[expert_of_row]
    is_max = (row_max == best) | (row_max.isnan() & best.isnan())
    first.scatter_reduce_(0, expert_of_row, torch.where(is_max, row_ids, routed), "amin")
    has_rows = rows > 0
    row = first.clamp(max=routed - 1)
    located = row_token.to(torch.int64)[row] if row_token is not None else row
    out_argmax[:, 0] = torch.where(has_rows, located, -1)
    out_argmax[:, 1] = torch.where(has_rows, row_channel[row], -1)
    in_absmax.scatter_reduce_(0, expert_of_row, x[:routed].float().abs().amax(dim=1), "amax")
    if channel_stats:
        channel_absmax.index_reduce_(0, expert_of_row, a, "amax")
    if row_weight is not None:
        norm_sum.index_add_(0, expert_of_row, row_weight[:routed] * torch.linalg.vector_norm(a, dim=1))
    return y, out_absmax, out_argmax, in_absmax, rows, channel_absmax, norm_sum
