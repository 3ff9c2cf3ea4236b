"""`profile(model, calibration)`: run calibration tokens and collect Super-Expert statistics.

The model runs on our experts implementation (``"superexperts"``) and sink attention
(``"superexperts_sink"``), switched on for the run and restored after it, so a model the
user loaded with any implementation works. Shared experts and dense MLPs are measured by
one forward hook on their ``down_proj``; massive activations by one hook per decoder
layer. All statistics stream into a `StatsCollector` on the model's device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import attention as _attention
from . import experts as _experts
from .collector import DENSE, SHARED, StatsCollector, collecting
from .layers import LayerParts, find_layers, text_config
from .result import ProfileResult
from .sweep import SweepCheckpoint, fingerprint


def register() -> None:
    """Register both implementations with transformers (idempotent)."""
    _experts.register()
    _attention.register()


@contextlib.contextmanager
def our_implementations(model: torch.nn.Module, *, attention: bool = True) -> Iterator[None]:
    """Run `model` on the superexperts experts (and sink attention) inside the block."""
    register()
    config = model.config
    old_experts = getattr(config, "_experts_implementation", None)
    old_attn = getattr(config, "_attn_implementation", None)
    model.set_experts_implementation(_experts.NAME)
    if attention:
        model.set_attn_implementation(_attention.NAME)
    try:
        yield
    finally:
        if old_experts is not None and old_experts != _experts.NAME:
            model.set_experts_implementation(old_experts)
        if attention and old_attn is not None and old_attn != _attention.NAME:
            model.set_attn_implementation(old_attn)


def hook_layer(parts: LayerParts, stats: StatsCollector) -> list:
    """Forward hooks recording one layer's shared/dense down_proj outputs and its output
    hidden states into `stats`; returns the handles."""
    handles = []
    for kind, units in ((SHARED, parts.shared), (DENSE, parts.dense)):
        for i, (_, down) in enumerate(units):

            def hook(module, inputs, output, kind=kind, i=i, n=len(units)):
                stats.record_linear(kind, parts.index, i, n, inputs[0], output)

            handles.append(down.register_forward_hook(hook))

    def layer_hook(module, inputs, output):
        stats.record_hidden(parts.index, output[0] if isinstance(output, tuple) else output)

    handles.append(parts.layer.register_forward_hook(layer_hook))
    return handles


def as_batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if tokens.dim() != 2:
        raise ValueError(f"calibration tokens must be 2-D [num_sequences, seq_len], got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(tokens.split(batch_size))


def run_batches(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    stats: StatsCollector,
    *,
    batch_size: int,
    with_loss: bool = False,
    progress: bool = True,
    desc: str = "profile",
    token_offset: int = 0,
    skip_batches: int = 0,
    on_batch_done=None,
) -> tuple[float, int]:
    """Run ``tokens [N, L]`` through `model` with `stats` collecting, from batch `skip_batches`;
    ``on_batch_done(batches_done)`` after each batch.

    Returns (summed next-token NLL, number of predicted tokens) when `with_loss`, else (0, 0).
    Without loss only the decoder runs (no lm_head).
    """
    device = next(model.parameters()).device
    forward = model if with_loss else model.base_model
    nll, count = 0.0, 0
    seq_len = tokens.shape[1]
    batches = as_batches(tokens, batch_size)
    bar = tqdm(total=tokens.numel(), desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    bar.update(sum(b.numel() for b in batches[:skip_batches]))
    with collecting(stats), torch.inference_mode():
        for b in range(skip_batches, len(batches)):
            batch = batches[b]
            stats.token_offset = token_offset + b * batch_size * seq_len
            ids = batch.to(device)
            out = forward(input_ids=ids, use_cache=False)
            if with_loss:
                logits = out.logits[:, :-1].float()
                nll += float(
                    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                )
                count += ids[:, 1:].numel()
            bar.update(batch.numel())
            if on_batch_done is not None:
                on_batch_done(b + 1)
    bar.close()
    return nll, count


def describe_model(model: torch.nn.Module, parts: list[LayerParts]) -> dict:
    cfg = text_config(model.config)
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_layers": len(parts),
        "layer_kinds": ["moe" if p.is_moe else "dense" for p in parts],
        "shared_names": {p.index: [n for n, _ in p.shared] for p in parts if p.shared},
        "dense_names": {p.index: [n for n, _ in p.dense] for p in parts if p.dense},
    }


def profile(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    *,
    batch_size: int = 1,
    num_sink_tokens: int = 1,
    top_k_hidden: int = 8,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
) -> ProfileResult:
    """Profile `model` on calibration tokens ``[num_sequences, seq_len]`` int64.

    Returns a `ProfileResult` with, per layer: routed/shared/dense down_proj output and
    input maxima with their locations and row counts, hidden-state massive activations,
    and the mean sink mass per head.

    With `checkpoint_dir`, the stats are saved every `checkpoint_every` batches (and at
    the end); `resume` continues from the last save, skipping the batches it covers.
    """
    if num_sink_tokens < 1:
        raise ValueError(f"num_sink_tokens must be >= 1, got {num_sink_tokens}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    parts = find_layers(model)
    if not any(p.is_moe for p in parts):
        raise ValueError(
            f"{type(model).__name__} has no experts module dispatched through transformers' ExpertsInterface; "
            "superexperts profiles MoE models whose experts are fused 3-D parameters (transformers >= 5)"
        )
    stats = StatsCollector(top_k_hidden=top_k_hidden, num_sink_tokens=num_sink_tokens)
    meta = describe_model(model, parts)
    ckpt, done = None, 0
    if checkpoint_dir is not None:
        ckpt = SweepCheckpoint(
            checkpoint_dir,
            fingerprint(calibration, model=meta["model_type"], num_layers=meta["num_layers"], streaming=False,
                        batch_size=batch_size, num_sink_tokens=num_sink_tokens, top_k_hidden=top_k_hidden),
        )
        if resume and ckpt.progress() is not None:
            done, _ = ckpt.load(stats, next(model.parameters()).device)

    def batch_done(batches_done: int) -> None:
        if ckpt is not None and (batches_done % checkpoint_every == 0 or batches_done * batch_size >= len(calibration)):
            ckpt.save(stats, batches_done)

    model.eval()
    handles = [h for p in parts for h in hook_layer(p, stats)]
    start = time.perf_counter()
    try:
        with our_implementations(model):
            run_batches(model, calibration, stats, batch_size=batch_size, progress=progress,
                        skip_batches=done, on_batch_done=batch_done)
    finally:
        for h in handles:
            h.remove()
    elapsed = time.perf_counter() - start
    num_batches = len(as_batches(calibration, batch_size))
    return ProfileResult.from_collector(
        stats,
        **meta,
        seq_len=calibration.shape[1],
        num_sequences=calibration.shape[0],
        num_sink_tokens=num_sink_tokens,
        elapsed_s=elapsed,
        work_fraction=(num_batches - done) / num_batches,
    )
