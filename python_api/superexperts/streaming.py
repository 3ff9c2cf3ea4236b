"""Layer-wise streaming: profile checkpoints larger than device memory, on one or many ranks.

The model skeleton is built on the meta device from its config. Each decoder layer is read
from the memory-mapped safetensors shards and written once into the model's layout by
transformers' own conversion mapping (per-expert checkpoint tensors fused into
``gate_up_proj`` / ``down_proj``, FP8 block-scaled weights dequantized; `superexperts.loading`),
placed on the device, run on every calibration batch, and freed (back to meta). Layer l+1 is
read on a background thread while layer l computes, so at most two layers are held at once; on
CPU the last part of its experts (``hold_back``, about one batch's working memory) is read only
once layer l is freed, so that two layers and the computation fit in two layers of memory. The
hidden states between layers stay on the device or, with ``offload_hidden``, in CPU memory.

Each layer's other inputs (masks, rotary tables, positions) come from one pass per batch of
the model's own forward with stand-ins for the decoder layers that record their arguments,
so every architecture (sliding-window and hybrid layer types included) gets what it computes
itself; they are kept for the run, one copy per distinct value.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .calibration import check_sink_tokens, check_token_ids
from .collector import collecting
from .dense import fast_dense_linears
from .distributed import ExpertShard
from .integration import describe_model, hook_layer
from .layers import LayerParts, decoder_layers, find_layers, text_config
from .loading import LayerLoader, build_skeleton, resolve_dtype
from .result import ProfileResult
from .sweep import ProfileRun, checkpoint_identity

@dataclass
class StreamStats:
    """Memory of a streamed run, for the memory bound (filled by `stream_profile`).

    base_param_bytes: parameters outside the decoder layers (embeddings, norms).
    peak_param_bytes: most parameter bytes resident in the model at once.
    layer_param_bytes: each layer's tensor bytes (parameters and buffers), in load order.
    peak_held_bytes: most bytes of layer tensors held at once, the model's and those of the
        read in flight on the background thread (one layer without prefetch, at most two with).
    base_rss_bytes: the process's resident set size before the first layer was read (Linux;
        None elsewhere).
    read_seconds / wait_seconds: per layer, how long reading it took, and how long the
        computation waited for it (reading that computing the previous layer did not hide).
    hold_back_bytes: bytes of each layer's experts read only once the layer before was freed.
    tail_wait_seconds: per layer, how long its experts waited for those bytes.
    """

    base_param_bytes: int = 0
    peak_param_bytes: int = 0
    layer_param_bytes: list[int] = field(default_factory=list)
    peak_held_bytes: int = 0
    base_rss_bytes: int | None = None
    read_seconds: list[float] = field(default_factory=list)
    wait_seconds: list[float] = field(default_factory=list)
    hold_back_bytes: int = 0
    tail_wait_seconds: list[float] = field(default_factory=list)


HOLD_BACK_FLOOR = 96 << 20
HOLD_BACK_ACTIVATIONS = 12


def default_hold_back(config, tokens_per_batch: int, dtype: torch.dtype) -> int:
    """Bytes of each layer's experts that a streamed run on CPU reads only once the layer before
    is freed, so that two layers and the computation fit in two layers of memory: an estimate of
    one batch's working memory through one layer, `HOLD_BACK_ACTIVATIONS` rows of ``hidden +
    top_k * 2 * expert_intermediate`` values per token (about 7 were measured at Qwen3-30B-A3B
    shapes), plus `HOLD_BACK_FLOOR` (the reader's two windows, the first call's allocations)."""
    cfg = text_config(config)
    hidden = getattr(cfg, "hidden_size", 0) or 0
    top_k = next((v for v in (getattr(cfg, a, None) for a in ("num_experts_per_tok", "moe_topk", "top_k")) if isinstance(v, int)), 1)
    inter = next((v for v in (getattr(cfg, a, None) for a in ("moe_intermediate_size", "intermediate_size")) if isinstance(v, int)), 0)
    per_token = (hidden + top_k * 2 * inter) * dtype.itemsize
    return HOLD_BACK_FLOOR + HOLD_BACK_ACTIVATIONS * tokens_per_batch * per_token


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LayerArguments:
    """What the model's own forward passes to each decoder layer for one batch besides the
    hidden states: ``per_layer[i] = (args, kwargs)`` (masks, rotary tables, positions). Layers
    of one attention type share the same objects, as the model builds each once."""

    per_layer: list[tuple[tuple, dict]]


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


def layer_arguments(model, input_ids: torch.Tensor, shared: list | None = None) -> tuple[torch.Tensor, LayerArguments]:
    """One pass of the model's forward with its layers stood in for: the embeddings
    ``[B, T, H]`` of ``input_ids [B, T]`` and every layer's other arguments.

    `shared`: a list kept across batches; a tensor equal to one an earlier batch gave (same
    shape, dtype, device and values) is replaced by that one, so batches of one shape hold one
    copy of their masks and rotary tables.
    """
    store: dict[int, tuple] = {}
    with _layer_inputs(model, store), torch.inference_mode():
        model.base_model(input_ids=input_ids, use_cache=False)
    missing = [i for i in range(len(decoder_layers(model))) if i not in store]
    if missing:
        raise ValueError(f"{type(model).__name__}'s forward did not call decoder layers {missing[:4]}")
    embeddings = store[0][0]
    per_layer = [(store[i][1], store[i][2]) for i in range(len(store))]
    if shared is not None:
        per_layer = _share_equal(per_layer, shared, {})
    return embeddings, LayerArguments(per_layer)


def _share_equal(value, pool: list, seen: dict):
    """`value` (nested tuples, lists and dicts) with each tensor replaced by an equal one of
    `pool` when there is one (else added to it); `seen` maps ids already resolved."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            same = next((t for t in pool if t.shape == value.shape and t.dtype == value.dtype and t.device == value.device
                         and torch.equal(t, value)), None)
            if same is None:
                pool.append(value)
            seen[id(value)] = (value, same if same is not None else value)
        return seen[id(value)][1]
    if isinstance(value, dict):
        return {k: _share_equal(v, pool, seen) for k, v in value.items()}
    if type(value) in (tuple, list):  # plain containers (a named tuple is kept as it is)
        return type(value)(_share_equal(v, pool, seen) for v in value)
    return value


def run_layer_major(
    model: nn.Module,
    tokens: torch.Tensor,
    stats,
    *,
    batch_size: int,
    max_hidden_bytes: int,
    progress: bool = True,
) -> int:
    """Run the first batches of ``tokens [N, L]`` int64 through `model`'s decoder layers layer by
    layer: every batch through layer 0, then every batch through layer 1, and so on, with
    `stats` collecting (for a model whose layers are still being read: computing layer l hides
    the reading of the layers after it). As many batches are run as their hidden states
    ``[B, L, H]`` fit in `max_hidden_bytes` (at least one). The token offsets are those of a
    batch-by-batch run.

    Returns the number of batches run.
    """
    device = next(model.parameters()).device
    seq_len = tokens.shape[1]
    shared: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    arguments: list[LayerArguments] = []
    for batch in tokens.split(batch_size):
        if hidden and (len(hidden) + 1) * hidden[0].nbytes > max_hidden_bytes:
            break
        embeddings, args = layer_arguments(model, batch.to(device), shared)
        hidden.append(embeddings)
        arguments.append(args)
    layers = decoder_layers(model)
    offsets = [b * batch_size * seq_len for b in range(len(hidden))]
    rows = sum(h.shape[0] for h in hidden)
    bar = tqdm(total=len(layers) * rows * seq_len, desc="profile, layer by layer while loading", unit="tok",
               unit_scale=True, disable=not progress, dynamic_ncols=True)
    with collecting(stats), torch.inference_mode():
        for index, layer in enumerate(layers):
            _run_layer(layer, index, hidden, arguments, stats, offsets, device=device, home=device, bar=bar)
    bar.close()
    return len(hidden)


def _run_layer(layer: nn.Module, index: int, hidden: list[torch.Tensor], arguments: list[LayerArguments], stats,
               token_offsets: list[int], *, device: torch.device, home: torch.device, bar) -> None:
    """Decoder layer `index` on every batch: ``hidden[b] [B, L, H]`` (kept on `home`, run on
    `device`) replaced by the layer's output, batch b's statistics at ``token_offsets[b]``."""
    for b in range(len(hidden)):
        stats.token_offset = token_offsets[b]
        args, kwargs = arguments[b].per_layer[index]
        out = layer(hidden[b].to(device), *args, **kwargs)
        hidden[b] = (out[0] if isinstance(out, tuple) else out).to(home)
        bar.update(hidden[b].shape[0] * hidden[b].shape[1])


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
    prefetch: bool = True,
    hold_back: int | None = None,
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
        prefetch: read layer l+1 on a background thread while layer l computes (False: read
            each layer when it is needed).
        hold_back: with `prefetch` on CPU, bytes of each layer's expert tensors read only once
            the layer before is freed (the experts' first forward waits for them), so that the
            resident memory stays within two layers; None: `default_hold_back`, 0: none.
        memory: filled with the run's memory figures (`StreamStats`).

    Returns:
        The merged `ProfileResult` on rank 0 (and in a single process); None on other ranks.
    """
    check_token_ids(calibration)
    check_sink_tokens(num_sink_tokens, calibration.shape[1])
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if hold_back is not None and not hold_back >= 0:
        raise ValueError(f"hold_back must be >= 0 bytes, got {hold_back}")
    device = torch.device(_dist.local_device(str(device)))
    par = _dist.init(parallel, device, dist_timeout_s) if parallel else None
    rank, world = (par.rank, par.world) if par else (0, 1)
    dtype = resolve_dtype(model_dir, dtype)
    model = build_skeleton(model_dir, dtype=dtype, device=device)
    check_token_ids(calibration, model.get_input_embeddings().num_embeddings)
    parts = find_layers(model)
    adapted = sorted({type(p.experts).__name__ for p in parts if p.adapter is not None})
    if par and par.mode == "expert" and adapted:
        raise ValueError(
            f"--parallel expert: the experts of {model.config.model_type} ({', '.join(adapted)}) are run through an "
            "adapter (outside transformers' ExpertsInterface), which cannot hold a share of a layer's experts; "
            "use --parallel data"
        )
    shards = [_expert_shard(p, par) for p in parts]

    seq_len = calibration.shape[1]
    first_row, last_row = (0, calibration.shape[0])
    if par and par.mode == "data":
        if calibration.shape[0] < world:
            raise ValueError(f"--parallel data needs at least {world} sequences, got {calibration.shape[0]}")
        first_row, last_row = _dist.split_range(calibration.shape[0], rank, world)
    tokens = calibration[first_row:last_row]
    batches = list(tokens.split(batch_size))
    offsets = [(first_row + b * batch_size) * seq_len for b in range(len(batches))]
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
    if hold_back is None:
        hold_back = default_hold_back(model.config, batch_size * seq_len, dtype) if prefetch and device.type == "cpu" else 0
    memory = memory if memory is not None else StreamStats()
    memory.hold_back_bytes = hold_back
    stats = run.stats
    with LayerLoader(model, model_dir, dtype=dtype, device=device, background=prefetch) as loader:
        loader.load_base()
        memory.base_param_bytes = memory.peak_param_bytes = _param_bytes(model)
        resumed = run.start(device, resume)
        shared: list[torch.Tensor] = []
        arguments: list[LayerArguments] = []
        hidden: list[torch.Tensor] = []
        for batch in batches:
            embeddings, args = layer_arguments(model, batch.to(device), shared)
            arguments.append(args)
            if resumed is None:
                hidden.append(embeddings.to(hidden_home))
            del embeddings
        hidden = resumed if resumed is not None else hidden
        memory.base_rss_bytes = _rss_bytes()
        if run.done < len(parts):
            loader.prefetch(run.done, parts[run.done], shards[run.done], hold_back=hold_back)
            if run.done + 1 < len(parts):
                loader.reserve(run.done + 1, parts[run.done + 1], shards[run.done + 1], hold_back=hold_back)
        bar = tqdm(total=(len(parts) - run.done) * tokens.numel(), desc=f"stream rank {rank}" if par else "stream",
                   unit="tok", unit_scale=True, disable=not progress or rank != 0, dynamic_ncols=True)
        with run.timed():
            for index in range(run.done, len(parts)):
                p = parts[index]
                layer = loader.load_layer(index, p, shards[index])
                handles = []
                try:
                    if index + 1 < len(parts):
                        loader.prefetch(index + 1, parts[index + 1], shards[index + 1], hold_back=hold_back)
                    memory.layer_param_bytes.append(loader.layer_bytes(layer))
                    memory.peak_param_bytes = max(memory.peak_param_bytes, _param_bytes(model))
                    handles = hook_layer(p, stats)
                    with collecting(stats), torch.inference_mode(), fast_dense_linears(layer):
                        _run_layer(layer, index, hidden, arguments, stats, offsets, device=device, home=hidden_home,
                                   bar=bar)
                finally:
                    for h in handles:
                        h.remove()
                    loader.free_layer(layer)
                run.step_done(index + 1, hidden)
        bar.close()
        memory.peak_held_bytes = loader.held.peak
        layers_read = [f"layer {i}" for i in range(run.done, len(parts))]
        memory.read_seconds = [loader.read_seconds[w] for w in layers_read]
        memory.wait_seconds = [loader.wait_seconds[w] for w in layers_read]
        memory.tail_wait_seconds = [loader.tail_wait_seconds.get(w, 0.0) for w in layers_read]

    if par is not None:
        _dist.reduce_stats(stats, par)
    if rank != 0:
        return None
    return run.result(**describe_model(model, parts))


def _expert_shard(p: LayerParts, par) -> ExpertShard | None:
    """The experts of layer `p` this rank holds under expert parallel (None: all)."""
    if not (par and par.mode == "expert" and p.experts is not None):
        return None
    num_global = p.experts.num_experts
    start, end = _dist.split_range(num_global, par.rank, par.world)
    return ExpertShard(start, end - start, num_global)
