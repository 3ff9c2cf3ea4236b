"""vLLM CPU experts that profile: ``ProfilingCPUExperts`` replaces ``CPUUnquantizedExperts``.

vLLM's CPU kernel runs both GEMMs, the activation and the weighted sum in one C++ call,
so the down projection cannot be observed from outside it; this class computes the whole
layer with our ops instead (`routed.profiled_moe`), inside one opaque custom op
(``superexperts_vllm::cpu_moe``) so torch.compile keeps it in the graph without tracing
into it. Weights stay in the checkpoint layout (no vLLM prepacking).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

from . import routed
from .layer_setup import attach_stats
from .stats import FIELDS, LayerStats

_MUTATED = ("output", *FIELDS)


@torch.library.custom_op("superexperts_vllm::cpu_moe", mutates_args=_MUTATED)
def cpu_moe(
    output: torch.Tensor,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    token_ref: torch.Tensor,
    expert_ids: torch.Tensor,
    out_absmax: torch.Tensor,
    out_token: torch.Tensor,
    out_channel: torch.Tensor,
    in_absmax: torch.Tensor,
    rows: torch.Tensor,
    activation: str,
    weights_on_input: bool,
) -> None:
    """output ``[M, H]`` <- the MoE layer of x ``[M, H]``; the stat buffers ``[E_global]``
    are updated in place (see `superexperts.vllm.stats`)."""
    stats = LayerStats(out_absmax, out_token, out_channel, in_absmax, rows)
    output.copy_(
        routed.profiled_moe(x, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, expert_map, token_ref,
                            activation, weights_on_input, stats, expert_ids)
    )


@cpu_moe.register_fake
def _(output, x, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, expert_map, token_ref, expert_ids,
      out_absmax, out_token, out_channel, in_absmax, rows, activation, weights_on_input):
    return None


class ProfilingCPUExperts(CPUUnquantizedExperts):
    """`CPUUnquantizedExperts` whose layer call records Super-Expert statistics."""

    @staticmethod
    def is_supported_config(cls, moe_config, weight_key, activation_key, activation_format):
        # No grouped-GEMM alignment needed: only the generic checks.
        return mk.FusedMoEExperts.is_supported_config(cls, moe_config, weight_key, activation_key, activation_format)

    @staticmethod
    def _supports_activation(activation) -> bool:
        return activation.value in routed.GATED

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._use_zentorch = False
        self.profile = attach_stats(layer, self.moe_config)

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        p = self.profile
        num_tokens = hidden_states.shape[0]
        torch.ops.superexperts_vllm.cpu_moe(
            output, hidden_states, w1, w2, self.w1_bias, self.w2_bias, topk_weights, topk_ids, expert_map,
            p.token_ref[:num_tokens], p.expert_ids, *p.stats.tensors().values(),
            activation.value, apply_router_weight_on_input,
        )
