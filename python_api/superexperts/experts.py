"""``experts_implementation="superexperts"``: transformers' fused experts run on our op.

The forward mirrors transformers' ``grouped_mm`` implementation: rows sorted by expert,
one grouped GEMM for ``gate_up_proj``, the model's own gate/activation, one grouped GEMM
for ``down_proj``. Both GEMMs run through ``torch.ops.superexperts.moe_down_proj_profile``,
the first without statistics; the down projection's per-expert statistics (max |output|
before the routing weight and the token/channel where it happened, max |input|, rows) go
to the active collector, with the importance sums of `superexperts.importance`: the op
also sums ``g * ||y||_2`` with the rows' routing weights g (``row_weight``), and the routing
weights and top-1 choices are counted here. The offsets are a cumulative sum of row counts, valid by
construction, so the op is told not to read them back (no host sync per call).

The module's `superexperts.layers.ModuleTag` carries the rest:

- ``pruned`` (bool ``[E]``): experts skipped when routed; their rows are sent past
  ``offsets[-1]`` like expert-parallel sentinels, so they cost no GEMM and contribute zero.
  Nothing in the weights changes.
- ``shard`` (`superexperts.distributed.ExpertShard`, expert parallel): the module holds
  experts ``start .. start + num_experts`` of ``num_global``; rows of the other experts are
  sentinels here, and one ``all_reduce`` of the ``[T * k, H]`` weighted rows completes
  them before the top-k sum.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface

from superexperts_kernels import moe_down_proj_profile

from . import collector as _collector
from .layers import tag_of

NAME = "superexperts"


def _grouped_linear(x, weight, offsets, bias, transposed, row_token=None, *, with_stats=True, row_weight=None):
    return moe_down_proj_profile(
        x.to(weight.dtype), weight, offsets, bias, row_token, w_transposed=transposed, with_stats=with_stats,
        check_offsets=False, row_weight=row_weight,
    )


def superexperts_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """ExpertsInterface function: hidden_states ``[T, H]``, top_k_index / top_k_weights
    ``[T, k]`` -> ``[T, H]`` in hidden_states.dtype."""
    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.shape[-1]
    num_experts = self.num_experts  # held by this process
    device = hidden_states.device
    tag = tag_of(self)
    shard = tag.shard if tag is not None else None
    first, num_global = (shard.start, shard.num_global) if shard is not None else (0, num_experts)

    # Ids outside this process's experts (EP sentinels, other ranks' experts) and pruned
    # experts go to the sentinel id `num_experts`: sorted last, past offsets[-1], y = 0.
    ids = top_k_index.reshape(-1)
    held = (ids >= first) & (ids < first + num_experts)
    pruned = tag.pruned if tag is not None else None
    if pruned is not None:
        held &= ~pruned.to(device)[ids.clamp(0, num_global - 1)]
    expert_ids = torch.where(held, ids - first, num_experts)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    token_of_row = perm // num_top_k
    x = hidden_states[token_of_row]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, sorted_ids, torch.ones_like(sorted_ids))
    offsets = torch.cumsum(counts[:num_experts], 0).to(torch.int32)

    if self.has_gate:
        up_weight, up_bias = self.gate_up_proj, getattr(self, "gate_up_proj_bias", None)
    else:
        up_weight, up_bias = self.up_proj, getattr(self, "up_proj_bias", None)
    up = _grouped_linear(x, up_weight, offsets, up_bias if self.has_bias else None, self.is_transposed, with_stats=False).y
    act = self._apply_gate(up) if self.has_gate else self.act_fn(up)

    stats = _collector.active()
    layer = tag.layer if tag is not None else None
    recording = stats is not None and layer is not None
    row_token = token_of_row + (stats.token_offset if stats is not None else 0)
    routed = sorted_ids < num_experts
    row_weight = torch.where(routed, top_k_weights.reshape(-1)[perm], 0)
    down_bias = getattr(self, "down_proj_bias", None) if self.has_bias else None
    prof = _grouped_linear(act, self.down_proj, offsets, down_bias, self.is_transposed, row_token,
                           row_weight=row_weight.float() if recording else None)
    if recording:
        per_expert = _per_expert_stats(prof, sorted_ids, row_weight, expert_ids, top_k_weights, num_experts)
        stats.record_grouped(layer, **_in_global_ids(per_expert, first, num_global))

    out = prof.y
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    weighted = torch.where(routed.unsqueeze(-1), out * row_weight.unsqueeze(-1), 0)

    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)
    weighted = weighted[inv_perm]
    if shard is not None:
        torch.distributed.all_reduce(weighted, group=shard.group)
    final = weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final.to(hidden_states.dtype)


def _per_expert_stats(prof, sorted_ids, row_weight, expert_ids, top_k_weights, num_experts: int) -> dict:
    """The op's per-expert stats ``[E]`` and the call's importance sums: the routing weights
    of each expert's rows, and the tokens whose largest routing weight (first on ties) went to
    each expert. Ids equal to `num_experts` (rows this process does not run) count nowhere."""
    weight_sum = torch.zeros(num_experts + 1, device=row_weight.device).index_add_(0, sorted_ids, row_weight.float())
    top1_id = expert_ids.view_as(top_k_weights).gather(1, top_k_weights.argmax(dim=-1, keepdim=True))
    top1 = torch.bincount(top1_id.view(-1), minlength=num_experts + 1)
    return dict(
        out_absmax=prof.out_absmax, out_argmax=prof.out_argmax, in_absmax=prof.in_absmax, rows=prof.rows,
        norm_sum=prof.norm_sum, weight_sum=weight_sum[:num_experts], top1=top1[:num_experts],
    )


def _in_global_ids(stats: dict[str, torch.Tensor], first: int, num_global: int) -> dict[str, torch.Tensor]:
    """Per-expert stats ``[E_held, ...]`` of this process's experts, placed at their global ids
    (the others: -1 locations, zeros)."""
    held = next(iter(stats.values())).shape[0]
    if first == 0 and held == num_global:
        return stats
    placed = {}
    for name, t in stats.items():
        g = t.new_full((num_global, *t.shape[1:]), -1 if name == "out_argmax" else 0)
        g[first : first + held] = t
        placed[name] = g
    return placed


def register() -> None:
    """Make ``experts_implementation="superexperts"`` available to every transformers model."""
    ExpertsInterface.register(NAME, superexperts_experts_forward)
