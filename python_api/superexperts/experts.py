"""``experts_implementation="superexperts"``: transformers' fused experts run on our op.

The forward mirrors transformers' ``grouped_mm`` implementation: rows sorted by expert,
one grouped GEMM for ``gate_up_proj``, the model's own gate/activation, one grouped GEMM
for ``down_proj``. Both GEMMs run through ``torch.ops.superexperts.moe_down_proj_profile``;
the down projection's per-expert statistics (max |output| before the routing weight and
the token/channel where it happened, max |input|, rows) go to the active collector.

Experts listed in ``module._superexperts_pruned`` (bool ``[E]``) are skipped when routed:
their rows are sent past ``offsets[-1]`` like expert-parallel sentinels, so they cost no
GEMM and contribute zero. Nothing in the weights changes.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface

from superexperts_kernels import moe_down_proj_profile

from . import collector as _collector

NAME = "superexperts"


def _grouped_linear(x, weight, offsets, bias, transposed, row_token=None):
    return moe_down_proj_profile(
        x.to(weight.dtype), weight, offsets, bias, row_token, w_transposed=transposed
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
    num_experts = self.num_experts
    device = hidden_states.device

    expert_ids = top_k_index.reshape(-1).clamp(max=num_experts)  # ids >= E: EP sentinels
    pruned = getattr(self, "_superexperts_pruned", None)
    if pruned is not None:
        is_pruned = torch.cat([pruned.to(device), pruned.new_zeros(1).to(device)])[expert_ids]
        expert_ids = torch.where(is_pruned, num_experts, expert_ids)
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
    up = _grouped_linear(x, up_weight, offsets, up_bias if self.has_bias else None, self.is_transposed).y
    act = self._apply_gate(up) if self.has_gate else self.act_fn(up)

    stats = _collector.active()
    layer = getattr(self, "_superexperts_layer", None)
    row_token = token_of_row + (stats.token_offset if stats is not None else 0)
    down_bias = getattr(self, "down_proj_bias", None) if self.has_bias else None
    prof = _grouped_linear(act, self.down_proj, offsets, down_bias, self.is_transposed, row_token)
    if stats is not None and layer is not None:
        stats.record_grouped(layer, prof.out_absmax, prof.out_argmax, prof.in_absmax, prof.rows)

    out = prof.y
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    routed = sorted_ids < num_experts
    weights = torch.where(routed, top_k_weights.reshape(-1)[perm], 0).unsqueeze(-1)
    weighted = torch.where(routed.unsqueeze(-1), out * weights, 0)

    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)
    final = weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final.to(hidden_states.dtype)


def register() -> None:
    """Make ``experts_implementation="superexperts"`` available to every transformers model."""
    ExpertsInterface.register(NAME, superexperts_experts_forward)
