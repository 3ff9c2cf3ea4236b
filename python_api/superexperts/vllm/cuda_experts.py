"""vLLM CUDA experts that profile: ``ProfilingTritonExperts`` replaces ``TritonExperts``.

The first GEMM, the block alignment and the activation are vLLM's own (Triton kernel
reading rows through ``sorted_token_ids``); the second GEMM runs through
``moe_down_proj_profile`` on the *unweighted* rows grouped by expert (`profiled_w2`), so
its statistics are those of the down projection before the routing weight; the routing
weights and the top-k sum follow. Unquantized weights only, no LoRA. It runs inside
vLLM's opaque ``moe_forward`` op on CUDA, with no host sync, so CUDA graphs capture it.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
from vllm.model_executor.layers.fused_moe.fused_moe import (
    _prepare_expert_assignment,
    invoke_fused_moe_triton_kernel,
    try_get_optimal_moe_config,
)
from vllm.model_executor.layers.fused_moe.utils import _resize_cache
from vllm.triton_utils import tl

from . import routed
from .layer_setup import LayerProfile, attach_stats

_COMPUTE_TYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def profiled_w2(act: torch.Tensor, w2: torch.Tensor, w2_bias: torch.Tensor | None, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, expert_map: torch.Tensor | None, profile: LayerProfile,
                weights_on_input: bool) -> torch.Tensor:
    """The second GEMM with statistics: act ``[M*k, I]`` rows in ``token * k + slot`` order,
    w2 ``[E_local, H, I]`` -> the top-k weighted sum ``[M, H]`` in act.dtype."""
    num_tokens, top_k = topk_ids.shape
    rows = routed.sort_rows(topk_ids, w2.shape[0], expert_map, profile.token_ref[:num_tokens])
    y = routed.record_down_proj(act[rows.perm], w2, w2_bias, rows, profile.stats, profile.expert_ids)
    weights = None if weights_on_input else topk_weights
    return routed.unsort_weighted_sum(y, rows, weights, num_tokens, top_k).to(act.dtype)


class ProfilingTritonExperts(TritonExperts):
    """`TritonExperts` whose down projection records Super-Expert statistics."""

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return (weight_key, activation_key) == (None, None)

    @staticmethod
    def supports_lora() -> bool:
        return False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        self.profile = attach_stats(layer, self.moe_config)

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        num_experts, num_tokens, n, _, top_k = self.moe_problem_size(hidden_states, w1, w2, topk_ids)
        if global_num_experts == -1:
            global_num_experts = num_experts
        config = try_get_optimal_moe_config(
            w1.size(), w2.size(), top_k, self.quant_config.config_name(hidden_states.dtype), num_tokens
        )
        cache1 = _resize_cache(workspace2, (num_tokens, top_k, n))
        cache2 = _resize_cache(workspace13, (num_tokens * top_k, self.adjust_N_for_activation(n, activation)))
        sorted_token_ids, block_experts, num_post_padded = _prepare_expert_assignment(
            topk_ids, config, num_tokens, top_k,
            num_experts if expert_map is None else global_num_experts, expert_map,
            ignore_invalid_experts=expert_map is not None,
        )
        invoke_fused_moe_triton_kernel(
            hidden_states, w1, cache1, None, None, None, sorted_token_ids, block_experts, num_post_padded,
            False, top_k, config, compute_type=getattr(tl, _COMPUTE_TYPE[hidden_states.dtype]),
            use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
            per_channel_quant=False, block_shape=None, B_bias=self.w1_bias,
        )
        self.activation(activation, cache2, cache1.view(-1, n))
        output.copy_(profiled_w2(cache2, w2, self.w2_bias, topk_weights, topk_ids, expert_map, self.profile,
                                 apply_router_weight_on_input))
