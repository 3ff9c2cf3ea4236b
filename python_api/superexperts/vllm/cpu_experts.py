"""vLLM CPU experts that profile: ``ProfilingCPUExperts`` replaces ``CPUUnquantizedExperts``.

vLLM's CPU kernel runs both GEMMs, the activation and the weighted sum in one C++ call,
so the down projection cannot be observed from outside it; this class computes the whole
layer with our kernels instead, inside one opaque custom op (``superexperts_vllm::cpu_moe``)
so torch.compile keeps it in the graph without tracing into it:

- ``fused``: ``superexperts.fused_moe_cpu_native`` (both GEMMs, activation, weights and
  statistics in one C++ op), with the weights packed once at load, replacing vLLM's
  parameters (`superexperts_kernels.fused_moe_cpu.pack_weights`). Used when the native
  extension is built, the layer has no biases, H % 16 == 0 and I % 8 == 0.
- ``ops``: otherwise, both grouped GEMMs through ``moe_down_proj_profile``
  (`routed.profiled_moe`) on the checkpoint layout.

``SUPEREXPERTS_VLLM_CPU_PATH=ops`` forces the second.
"""

from __future__ import annotations

import os

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
from vllm.model_executor.utils import replace_parameter

from superexperts_kernels import fused_moe_cpu

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
    if w13.dim() == 4:  # packed for the fused op
        output.copy_(_fused(x, w13, w2, topk_weights, topk_ids, expert_map, token_ref, activation, weights_on_input,
                            stats, expert_ids))
        return
    output.copy_(
        routed.profiled_moe(x, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, expert_map, token_ref,
                            activation, weights_on_input, stats, expert_ids)
    )


def _fused(x, w13p, w2p, topk_weights, topk_ids, expert_map, token_ref, activation, weights_on_input, stats,
           expert_ids) -> torch.Tensor:
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map[ids].long()
    ids = torch.where(token_ref.unsqueeze(-1) >= 0, ids, -1)  # padding rows: not computed, not counted
    r = fused_moe_cpu.fused_moe_cpu(x, w13p, w2p, topk_weights, ids, token_ref, activation, weights_on_input)
    stats.record(r.out_absmax, r.out_argmax, r.in_absmax, r.rows, expert_ids)
    return r.out


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
        w13, w2 = layer.w13_weight, layer.w2_weight
        self.fused = (
            os.environ.get("SUPEREXPERTS_VLLM_CPU_PATH", "fused") != "ops"
            and getattr(layer, "w13_bias", None) is None
            and getattr(layer, "w2_bias", None) is None
            and fused_moe_cpu.supports(w2.shape[1], w2.shape[2], w13.dtype)
        )
        if self.fused:
            w13p, w2p = fused_moe_cpu.pack_weights(w13.data, w2.data)
            replace_parameter(layer, "w13_weight", w13p)
            replace_parameter(layer, "w2_weight", w2p)

    def moe_problem_size(self, a1, w1, w2, topk_ids):
        if w1.dim() != 4:
            return super().moe_problem_size(a1, w1, w2, topk_ids)
        return w1.shape[0], a1.shape[0], w1.shape[1] * 16, a1.shape[-1], topk_ids.shape[1]

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
