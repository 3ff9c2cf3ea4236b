"""Layer-wise streaming: profile checkpoints larger than device memory, on one or many ranks.

The model skeleton is built on the meta device from its config. Each decoder layer is read
from the safetensors shards (`CheckpointReader`), converted to the model's layout by
transformers' own weight conversions (per-expert checkpoint tensors fused into
``gate_up_proj`` / ``down_proj``, FP8 block-scaled weights dequantized), placed on the
device, run on every calibration batch, and freed (back to meta) before the next layer.
Only one layer's parameters are resident at a time; the hidden states between layers stay
on the device or, with ``offload_hidden``, in CPU memory.

Each layer's positional inputs and masks come from one pass of the model's own forward
with stand-ins for the decoder layers that record their arguments, so every architecture
gets the masks and rotary embeddings it computes itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .calibration import check_sink_tokens, check_token_ids
from .checkpoint import CheckpointReader
from .collector import collecting
from .distributed import ExpertShard
from .integration import describe_model, hook_layer, register
from .layers import LayerParts, decoder_layers, find_layers, tag
from .result import ProfileResult
from .sweep import ProfileRun, checkpoint_identity

_FUSED_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


@dataclass
class StreamStats:
    """Resident parameter bytes seen while streaming (for the memory bound)."""

    base_param_bytes: int = 0
    peak_param_bytes: int = 0
    layer_param_bytes: list[int] = field(default_factory=list)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


def build_skeleton(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device):
    """The model on the meta device, but for its non-persistent buffers (rotary tables), which
    are computed on `device` as transformers' own init does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    config = AutoConfig.from_pretrained(model_dir)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if str(method) not in ("fp8", "QuantizationMethod.FP8"):
            raise ValueError(f"--model: quantization {method!r} is not supported by layer streaming (FP8 block scales are)")
        del config.quantization_config  # dequantized on load by CheckpointReader
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, experts_implementation="superexperts", attn_implementation="superexperts_sink"
        )
    materialize_buffers(model, device)
    return model.eval()


def materialize_buffers(model, device: torch.device) -> None:
    """Put the non-persistent buffers (rotary tables: computed, never in a checkpoint) of a
    meta-built model on `device`, computed by transformers' own init."""
    owners = set()
    for name, buf in model.named_non_persistent_buffers():
        module_path, _, buf_name = name.rpartition(".")
        owner = model.get_submodule(module_path)
        owner._buffers[buf_name] = torch.empty_like(buf, device=device)
        owners.add(owner)
    with torch.no_grad():
        for owner in owners:
            model._init_weights(owner)


class LayerLoader:
    """Loads and frees decoder layers of a meta skeleton from a checkpoint directory."""

    def __init__(self, model, model_dir: str | Path, *, dtype: torch.dtype, device: torch.device):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model = model
        self.reader = CheckpointReader(model_dir)
        self.dtype = dtype
        self.device = device
        self.mapping = get_model_conversion_mapping(model)
        self.layers = decoder_layers(model)

    def _load(self, tensors: dict[str, torch.Tensor], what: str, module: nn.Module) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        config = LoadStateDictConfig(device_map={"": str(self.device)}, dtype=self.dtype, weight_mapping=self.mapping)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, config)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys:
            raise ValueError(f"{what}: checkpoint tensors do not match the model: {sorted(info.mismatched_keys)[:4]}")
        still_meta = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if still_meta:
            raise ValueError(f"{what}: no checkpoint tensor for {still_meta[:4]} in {self.reader.dir}")

    def load_base(self) -> None:
        """Everything outside the decoder layers (embeddings, final norm; lm_head is not needed)."""
        tensors = self.reader.read([k for k in self.reader.other_keys if "lm_head" not in k], dtype=self.dtype)
        base = self.model.base_model
        self._load(tensors, "embeddings and norms", base.get_input_embeddings())

    def load_layer(self, index: int, parts: LayerParts, shard: ExpertShard | None = None) -> nn.Module:
        """Read decoder layer `index` onto the device; with `shard`, only those experts."""
        layer = self.layers[index]
        expert_range, num_global = None, None
        if shard is not None and parts.experts is not None:
            _resize_meta_experts(parts.experts, shard.count)
            tag(parts.experts).shard = shard
            expert_range, num_global = (shard.start, shard.start + shard.count), shard.num_global
        keys = self.reader.layer_keys.get(index, [])
        tensors = self.reader.read(keys, dtype=self.dtype, expert_range=expert_range, num_experts=num_global)
        self._load(tensors, f"layer {index}", layer)
        return layer

    @staticmethod
    def free_layer(layer: nn.Module) -> None:
        layer.to("meta")


def _resize_meta_experts(experts: nn.Module, count: int) -> None:
    for name in _FUSED_EXPERT_PARAMS:
        p = getattr(experts, name, None)
        if isinstance(p, torch.Tensor):
            setattr(experts, name, nn.Parameter(torch.empty((count, *p.shape[1:]), dtype=p.dtype, device="meta"), requires_grad=False))
    experts.num_experts = count


@contextmanager
def _layer_inputs(model, store: dict[int, tuple]) -> Iterator[None]:
    """Replace the decoder layers by stand-ins that record their inputs and pass the hidden
    states through, so one forward yields every layer's arguments (masks, rotary tables)."""

    class Recorder(nn.Module):
        def __init__(self, index: int, real: nn.Module):
            super().__init__()
            self.index = index
            self.attention_type = getattr(real, "attention_type", None)

        def forward(self, hidden_states, *args, **kwargs):
            store[self.index] = (hidden_states, args, kwargs)
            return hidden_states

    layers = decoder_layers(model)
    real = list(layers)
    for i, layer in enumerate(real):
        layers[i] = Recorder(i, layer)
    try:
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def layer_arguments(model, input_ids: torch.Tensor) -> dict[int, tuple]:
    """``{layer: (embeddings, args, kwargs)}`` for one batch of token ids."""
    store: dict[int, tuple] = {}
    with _layer_inputs(model, store), torch.inference_mode():
        model.base_model(input_ids=input_ids, use_cache=False)
    return store


def stream_profile(
    model_dir: str | Path,
    calibration: torch.Tensor,
    *,
    batch_size: int = 1,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    num_sink_tokens: int = 1,
    top_k_hidden: int = 8,
    offload_hidden: bool = False,
    parallel: str | None = None,
    dist_timeout_s: float = _dist.DEFAULT_TIMEOUT_S,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    memory: StreamStats | None = None,
) -> ProfileResult | None:
    """Profile a checkpoint directory one decoder layer at a time.

    Args:
        calibration: ``[N, L]`` int64 token ids (every rank passes the same tensor).
        parallel: None (one process), ``"expert"`` or ``"data"`` (see `superexperts.distributed`;
            launch with torchrun; the caller leaves the process group).
        dist_timeout_s: with `parallel`, how long a collective waits for the other ranks.
        checkpoint_dir / resume: save stats and hidden states after every layer; continue a
            run from its last finished layer.
        memory: filled with the resident parameter bytes (base and peak).

    Returns:
        The merged `ProfileResult` on rank 0 (and in a single process); None on other ranks.
    """
    check_token_ids(calibration)
    check_sink_tokens(num_sink_tokens, calibration.shape[1])
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(_dist.local_device(str(device)))
    par = _dist.init(parallel, device, dist_timeout_s) if parallel else None
    rank, world = (par.rank, par.world) if par else (0, 1)
    if isinstance(dtype, str):
        from transformers import AutoConfig

        dtype = AutoConfig.from_pretrained(model_dir).dtype if dtype == "auto" else getattr(torch, dtype)
        dtype = dtype or torch.float32
    model = build_skeleton(model_dir, dtype=dtype, device=device)
    check_token_ids(calibration, model.get_input_embeddings().num_embeddings)
    parts = find_layers(model)
    loader = LayerLoader(model, model_dir, dtype=dtype, device=device)
    loader.load_base()
    memory = memory if memory is not None else StreamStats()
    memory.base_param_bytes = memory.peak_param_bytes = _param_bytes(model)

    seq_len = calibration.shape[1]
    first_row, last_row = (0, calibration.shape[0])
    if par and par.mode == "data":
        if calibration.shape[0] < world:
            raise ValueError(f"--parallel data needs at least {world} sequences, got {calibration.shape[0]}")
        first_row, last_row = _dist.split_range(calibration.shape[0], rank, world)
    tokens = calibration[first_row:last_row]
    batches = list(tokens.split(batch_size))
    hidden_home = torch.device("cpu") if offload_hidden else device

    run = ProfileRun(
        calibration,
        steps=len(parts),
        num_sink_tokens=num_sink_tokens,
        top_k_hidden=top_k_hidden,
        checkpoint_dir=checkpoint_dir,
        rank=rank,
        ranks=par,
        **(checkpoint_identity(model_dir) if checkpoint_dir is not None else {}),
        streaming=True,
        batch_size=batch_size,
        parallel=parallel,
        world=world,
        dtype=str(dtype),
    )
    hidden = run.start(device, resume)
    if hidden is None:
        hidden = [layer_arguments(model, b.to(device))[0][0].to(hidden_home) for b in batches]
    bar = tqdm(total=(len(parts) - run.done) * tokens.numel(), desc=f"stream rank {rank}" if par else "stream",
               unit="tok", unit_scale=True, disable=not progress or rank != 0, dynamic_ncols=True)
    stats = run.stats
    with run.timed():
        for index in range(run.done, len(parts)):
            p = parts[index]
            layer_shard = None
            if par and par.mode == "expert" and p.experts is not None:
                num_global = p.experts.num_experts
                start, end = _dist.split_range(num_global, rank, world)
                layer_shard = ExpertShard(start, end - start, num_global)
            layer = loader.load_layer(index, p, layer_shard)
            resident = _param_bytes(model)
            memory.layer_param_bytes.append(resident - memory.base_param_bytes)
            memory.peak_param_bytes = max(memory.peak_param_bytes, resident)
            handles = hook_layer(p, stats)
            try:
                with collecting(stats), torch.inference_mode():
                    for b, batch in enumerate(batches):
                        stats.token_offset = (first_row + b * batch_size) * seq_len
                        _, args, kwargs = layer_arguments(model, batch.to(device))[index]
                        out = layer(hidden[b].to(device), *args, **kwargs)
                        hidden[b] = (out[0] if isinstance(out, tuple) else out).to(hidden_home)
                        bar.update(batch.numel())
            finally:
                for h in handles:
                    h.remove()
                loader.free_layer(layer)
            run.step_done(index + 1, hidden)
    bar.close()

    if par is not None:
        _dist.reduce_stats(stats, par)
    if rank != 0:
        return None
    return run.result(**describe_model(model, parts))
