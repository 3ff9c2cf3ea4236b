"""The routed experts of one vLLM MoE layer computed with our ops, recording statistics.

`profiled_moe` is the whole layer for one call (both GEMMs through
``torch.ops.superexperts.moe_down_proj_profile``, the gated activation, the routing
weights and the top-k sum); `sort_rows` and `record_down_proj` are the pieces the CUDA
experts reuse around vLLM's own first GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from superexperts_kernels import moe_down_proj_profile

from .stats import LayerStats

# vLLM's MoEActivation values whose gate/up halves we know how to apply: w13 rows are
# [gate; up] and the output is act(gate) * up, as vLLM's *_and_mul kernels compute it.
GATED = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class SortedRows(NamedTuple):
    """Rows ``(token, k)`` of one call grouped by local expert.

    perm ``[M*k]``: sorted position -> flat ``token * k + slot`` index; token ``[M*k]``:
    the token of each sorted row; offsets ``[E]`` int32 cumulative row ends (rows past
    ``offsets[-1]`` are not computed: other ranks' experts and padding rows); row_ref
    ``[M*k]``: token reference of each sorted row; valid ``[M*k]`` bool. The offsets are a
    cumulative sum of counts, so the op's host-syncing value check is skipped.
    """

    perm: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    row_ref: torch.Tensor
    valid: torch.Tensor


def sort_rows(topk_ids: torch.Tensor, num_local: int, expert_map: torch.Tensor | None,
              token_ref: torch.Tensor) -> SortedRows:
    """topk_ids ``[M, k]`` global expert ids; expert_map ``[E_global]`` (-1 where another rank
    holds the expert) or None; token_ref ``[M]`` int64, -1 for padding rows."""
    num_tokens, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = expert_map[ids].long()
    ref = token_ref.repeat_interleave(top_k)
    valid = (ids >= 0) & (ref >= 0)
    ids = torch.where(valid, ids, num_local)
    sorted_ids, perm = torch.sort(ids, stable=True)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=ids.device)
    counts.index_add_(0, sorted_ids, torch.ones_like(sorted_ids))
    offsets = torch.cumsum(counts[:num_local], 0).to(torch.int32)
    return SortedRows(perm, perm // top_k, offsets, ref[perm], valid[perm])


def record_down_proj(act: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, rows: SortedRows,
                     stats: LayerStats, expert_ids: torch.Tensor) -> torch.Tensor:
    """The down projection of the sorted rows ``act [M*k, I]`` -> ``[M*k, H]`` (unweighted;
    zero where not `valid`), folding its per-expert stats into `stats` at the global ids
    `expert_ids` ``[E_local]``."""
    prof = moe_down_proj_profile(act, w2, rows.offsets, b2, rows.row_ref, check_offsets=False)
    stats.record(prof.out_absmax, prof.out_argmax, prof.in_absmax, prof.rows, expert_ids)
    return prof.y


def unsort_weighted_sum(y: torch.Tensor, rows: SortedRows, topk_weights: torch.Tensor | None,
                        num_tokens: int, top_k: int) -> torch.Tensor:
    """Sorted rows ``y [M*k, H]`` times their routing weight (None: already applied to the
    input), summed over the top-k slots of each token: ``[M, H]`` in fp32."""
    y = y.float()
    if topk_weights is not None:
        y = y * topk_weights.reshape(-1)[rows.perm].float().unsqueeze(-1)
    y = torch.where(rows.valid.unsqueeze(-1), y, 0.0)
    flat = torch.empty_like(y)
    flat[rows.perm] = y
    return flat.view(num_tokens, top_k, -1).sum(dim=1)


def profiled_moe(x, w13, w2, b13, b2, topk_weights, topk_ids, expert_map, token_ref, activation: str,
                 weights_on_input: bool, stats: LayerStats, expert_ids: torch.Tensor) -> torch.Tensor:
    """One MoE layer call: x ``[M, H]``, w13 ``[E, 2I, H]``, w2 ``[E, H, I]`` (checkpoint
    layouts), optional biases ``[E, 2I]`` / ``[E, H]``, topk_weights / topk_ids ``[M, k]``,
    token_ref ``[M]`` -> ``[M, H]`` in x.dtype."""
    if activation not in GATED:
        raise ValueError(f"superexperts.vllm: activation {activation!r} is not supported (supported: {sorted(GATED)})")
    num_tokens, top_k = topk_ids.shape
    rows = sort_rows(topk_ids, w13.shape[0], expert_map, token_ref)
    up = moe_down_proj_profile(x[rows.token], w13, rows.offsets, b13, with_stats=False, check_offsets=False).y
    gate, lin = up.chunk(2, dim=-1)
    act = GATED[activation](gate) * lin
    y = record_down_proj(act, w2, b2, rows, stats, expert_ids)
    return unsort_weighted_sum(y, rows, None if weights_on_input else topk_weights, num_tokens, top_k).to(x.dtype)
