"""The plumbing between a transformers model and the statistics, shared by every kind of run
(`profile`, layer streaming, ablations).

- `register`: make ``experts_implementation="superexperts"`` and
  ``attn_implementation="superexperts_sink"`` known to transformers;
- `our_implementations`: run a model on them inside a block, whatever it used before;
- `hook_layer`: forward hooks recording one layer's shared/dense down_proj and its output
  hidden states (the routed experts and attention record from inside their implementations);
- `run_batches`: calibration tokens through the model with a collector active;
- `describe_model`: the model's metadata in a `ProfileResult`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from . import attention as _attention
from . import experts as _experts
from .collector import DENSE, SHARED, StatsCollector, collecting
from .layers import LayerParts, decoder_layers, text_config


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
    hidden states into `stats`; returns the handles.

    A shared expert ``<name>`` with a sibling ``<name>_gate`` (a ``Linear`` to one output:
    the Qwen2-MoE family scales the shared expert's output by ``sigmoid(gate(h))``) records
    that sigmoid as its routing weight g; other shared experts and dense MLPs have g = 1.
    """
    handles = []
    for kind, units in ((SHARED, parts.shared), (DENSE, parts.dense)):
        for i, (name, down) in enumerate(units):
            record = functools.partial(stats.record_linear, kind, parts.index, i, len(units))
            gate = _shared_expert_gate(parts.layer, name) if kind == SHARED else None
            if gate is None:
                handles.append(down.register_forward_hook(lambda m, inputs, output, record=record: record(inputs[0], output)))
                continue
            pending: dict = {}

            def flush(pending=pending, record=record):
                if "y" in pending and "g" in pending:
                    record(*pending.pop("y"), gate=pending.pop("g"))

            def down_hook(module, inputs, output, pending=pending, flush=flush):
                pending["y"] = (inputs[0], output)
                flush()

            def gate_hook(module, inputs, output, pending=pending, flush=flush):
                pending["g"] = torch.sigmoid(output.float())
                flush()

            handles += [down.register_forward_hook(down_hook), gate.register_forward_hook(gate_hook)]

    def layer_hook(module, inputs, output):
        stats.record_hidden(parts.index, output[0] if isinstance(output, tuple) else output)

    handles.append(parts.layer.register_forward_hook(layer_hook))
    return handles


def _shared_expert_gate(layer: torch.nn.Module, name: str) -> torch.nn.Linear | None:
    """The ``<name>_gate`` sibling of shared expert `name` in `layer` (a Linear to one output), or None."""
    try:
        gate = layer.get_submodule(f"{name}_gate")
    except AttributeError:
        return None
    return gate if isinstance(gate, torch.nn.Linear) and gate.out_features == 1 else None


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
    """The model's fields of a `ProfileResult`: type, layer count and kinds, shared/dense names."""
    cfg = text_config(model.config)
    layers = decoder_layers(model)
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_layers": len(parts),
        "layer_kinds": ["moe" if p.is_moe else "dense" for p in parts],
        "shared_names": {p.index: [n for n, _ in p.shared] for p in parts if p.shared},
        "dense_names": {p.index: [n for n, _ in p.dense] for p in parts if p.dense},
        "layers_name": next(name for name, m in model.named_modules() if m is layers),
        "experts_names": {p.index: p.experts_name for p in parts if p.is_moe},
    }
