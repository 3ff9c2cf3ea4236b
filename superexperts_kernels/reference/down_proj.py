"""Pure-torch reference of `moe_down_proj_profile`: the test oracle and the CPU fallback.

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
        with_stats: False computes ``y`` only (stats stay zero; for benchmarks).

    Returns:
        ``y [S, H]`` (x.dtype), ``out_absmax [E]`` fp32, ``out_argmax [E, 2]`` int64
        (row or token, channel; -1 for an expert without rows), ``in_absmax [E]`` fp32,
        ``rows [E]`` int64, ``channel_absmax`` fp32 ``[E, H]`` (``[E, 0]`` when off).
    """
    num_rows = x.shape[0]
    num_experts = w_down.shape[0]
    hidden = w_down.shape[2] if w_transposed else w_down.shape[1]
    dev = x.device

    y = torch.zeros(num_rows, hidden, dtype=x.dtype, device=dev)
    out_absmax = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    out_argmax = torch.full((num_experts, 2), -1, dtype=torch.int64, device=dev)
    in_absmax = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    channel_absmax = torch.zeros(num_experts, hidden if channel_stats else 0, dtype=torch.float32, device=dev)

    ends = offsets.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    rows = ends - starts

    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            xe = x[start:end].float()
            we = w_down[e].float()
            acc = xe @ (we if w_transposed else we.t())
            if bias is not None:
                acc += bias[e].float()
            ye = acc.to(x.dtype)
            y[start:end] = ye
            if with_stats:
                a = ye.float().abs_()
                flat = int(a.argmax())
                out_absmax[e] = a.view(-1)[flat]
                row, channel = start + flat // hidden, flat % hidden
                out_argmax[e, 0] = int(row_token[row]) if row_token is not None else row
                out_argmax[e, 1] = channel
                in_absmax[e] = xe.abs().max()
                if channel_stats:
                    channel_absmax[e] = a.amax(dim=0)
        start = end
    return y, out_absmax, out_argmax, in_absmax, rows, channel_absmax
