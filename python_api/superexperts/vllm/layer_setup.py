"""Per-layer setup shared by the CPU and CUDA profiling experts, and the parallel-config checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import stats as _stats
from . import tokens as _tokens


@dataclass
class LayerProfile:
    """What one layer's experts need at run time: its stat buffers, the worker's token
    reference buffer ``[max_num_tokens]`` and the global id of each local expert ``[E_local]``."""

    layer: int
    stats: _stats.LayerStats
    token_ref: torch.Tensor
    expert_ids: torch.Tensor


def check_parallel(moe_config) -> None:
    """Refuse the parallel layouts whose statistics would be wrong or unattributable."""
    p = moe_config.moe_parallel_config
    if p.tp_size > 1 and not p.use_ep:
        raise ValueError(
            "superexperts.vllm: tensor parallelism without expert parallelism shards every expert's "
            "down_proj along its input dimension, so no rank sees a whole down_proj output and the "
            f"per-expert maxima would be wrong (tensor_parallel_size={p.tp_size}). Start vLLM with "
            "--enable-expert-parallel (LLM(enable_expert_parallel=True)), or tensor_parallel_size=1."
        )
    if p.dp_size > 1:
        raise ValueError(
            "superexperts.vllm: data parallelism sends tokens of other ranks through each rank's experts, "
            f"so token references could not be attributed (data_parallel_size={p.dp_size}); use "
            "tensor_parallel_size with --enable-expert-parallel instead."
        )
    if p.enable_eplb:
        raise ValueError("superexperts.vllm: expert load balancing (EPLB) moves experts between ranks at run time; turn it off to profile")


def check_engine(config) -> None:
    """Refuse engine settings the token references cannot follow; warn about prefix caching."""
    if config.speculative_config is not None:
        raise ValueError("superexperts.vllm: speculative decoding is not supported (draft tokens would be profiled as served tokens)")
    if getattr(config, "use_v2_model_runner", False):
        raise ValueError(
            "superexperts.vllm: the token references hook into the V1 model runner; set VLLM_USE_V2_MODEL_RUNNER=0 "
            "(superexperts.vllm.enable() and SUPEREXPERTS_VLLM=1 default it to 0)"
        )
    if config.cache_config.enable_prefix_caching and _tokens.current() is None:
        warnings.warn(
            "superexperts.vllm: prefix caching is on: tokens served from the prefix cache are not recomputed and so "
            "not profiled. Start vLLM with --no-enable-prefix-caching (LLM(enable_prefix_caching=False)) to profile "
            "every prompt token.",
            stacklevel=2,
        )


def attach_stats(layer: torch.nn.Module, moe_config) -> LayerProfile:
    """Create (or find) the buffers of `layer` (a vLLM ``RoutedExperts``) at weight-loading time."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.models.utils import extract_layer_index

    check_parallel(moe_config)
    config = get_current_vllm_config()
    check_engine(config)
    device = layer.w13_weight.device
    refs = _tokens.create(
        max_num_tokens=config.scheduler_config.max_num_batched_tokens,
        max_num_reqs=config.scheduler_config.max_num_seqs,
        span=config.model_config.max_model_len,
        device=device,
    )
    index = extract_layer_index(layer.layer_name)
    num_global = moe_config.num_experts
    expert_map = getattr(layer, "expert_map", None)
    if expert_map is None:
        expert_ids = torch.arange(num_global, device=device)
    else:
        held = torch.nonzero(expert_map >= 0).flatten()
        expert_ids = held[torch.argsort(expert_map[held])]
    return LayerProfile(index, _stats.register_layer(index, num_global, device), refs.token_ref, expert_ids)
