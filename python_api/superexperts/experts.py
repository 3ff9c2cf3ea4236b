"""``experts_implementation="superexperts"``: transformers' fused experts run on our op.

The forward mirrors transformers' ``grouped_mm`` implementation: rows sorted by expert,
one grouped GEMM for ``gate_up_proj``, the model's own gate/activation, one grouped GEMM
for ``down_proj``. Both GEMMs run through ``torch.ops.superexperts.moe_down_proj_profile``,
the first without statistics; the down projection's per-expert statistics (max |output|
before the routing weight and the token/channel where it happened, max |input|, rows) go
to the active collector. The offsets are a cumulative sum of row counts, valid by
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


def _grouped_linear(x, weight, offsets, bias, transposed, row_token=None, *, with_stats=True):
    return moe_down_proj_profile(
        x.to(weight.dtype), weight, offsets, bias, row_token, w_transposed=transposed, with_stats=with_stats,
        check_offsets=False,
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
    row_token = token_of_row + (stats.token_offset if stats is not None else 0)
    down_bias = getattr(self, "down_proj_bias", None) if self.has_bias else None
    prof = _grouped_linear(act, self.down_proj, offsets, down_bias, self.is_transposed, row_token)
    if stats is not None and layer is not None:
        stats.record_grouped(layer, *_in_global_ids(prof, first, num_global))

    out = prof.y
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    routed = sorted_ids < num_experts
    weights = torch.where(routed, top_k_weights.reshape(-1)[perm], 0).unsqueeze(-1)
    weighted = torch.where(routed.unsqueeze(-1), out * weights, 0)

    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)
    weighted = weighted[inv_perm]
    if shard is not None:
        torch.distributed.all_reduce(weighted, group=shard.group)
    final = weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final.to(hidden_states.dtype)


def _in_global_ids(prof, first: int, num_global: int):
    """The op's per-expert stats of this process's experts, placed at their global ids."""
    out_absmax, out_argmax, in_absmax, rows = prof.out_absmax, prof.out_argmax, prof.in_absmax, prof.rows
    if first == 0 and out_absmax.numel() == num_global:
        return out_absmax, out_argmax, in_absmax, rows
    held = slice(first, first + out_absmax.numel())
    g_absmax = out_absmax.new_zeros(num_global)
    g_argmax = out_argmax.new_full((num_global, 2), -1)
    g_in = in_absmax.new_zeros(num_global)
    g_rows = rows.new_zeros(num_global)
    g_absmax[held], g_argmax[held], g_in[held], g_rows[held] = out_absmax, out_argmax, in_absmax, rows
    return g_absmax, g_argmax, g_in, g_rows


def register() -> None:
    """Make ``experts_implementation="superexperts"`` available to every transformers model."""
    ExpertsInterface.register(NAME, superexperts_experts_forward)
