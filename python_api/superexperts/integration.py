"""The plumbing between a transformers model and the statistics, shared by every kind of run
(`profile`, layer streaming, ablations).

- `register`: make ``experts_implementation="superexperts"`` and
  ``attn_implementation="superexperts_sink"`` known to transformers;
- `our_implementations`: run a model on them inside a block, whatever it used before
  (families of `superexperts.adapters`: their experts module's forward is replaced inside
  the block, as transformers cannot dispatch it; the decoder layers' dense projections go
  through the native GEMMs where those are faster, `superexperts.dense`);
- `hook_layer`: forward hooks recording one layer's shared/dense down_proj and its output
  hidden states (the routed experts and attention record from inside their implementations;
  an adapter family's experts forward is installed for the layer too);
- `moe_layers`: the decoder layers of a model the toolkit can profile, or a clear error;
- `run_batches`: calibration tokens through the model with a collector active;
- `describe_model`: the model's metadata in a `ProfileResult`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from . import adapters as _adapters
from . import attention as _attention
from . import experts as _experts
from .collector import DENSE, SHARED, StatsCollector, collecting
from .dense import fast_dense_linears
from .layers import LayerParts, decoder_layers, describe_structure, find_layers, tag, text_config


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
    adapted = []
    if any(_adapters.adapter_for(m) is not None for m in model.modules()):
        adapted = [AdapterHandle(p) for p in find_layers(model) if p.adapter is not None]
    try:
        with fast_dense_linears(decoder_layers(model)):
            yield
    finally:
        for handle in adapted:
            handle.remove()
        if old_experts is not None and old_experts != _experts.NAME:
            model.set_experts_implementation(old_experts)
        if attention and old_attn is not None and old_attn != _attention.NAME:
            model.set_attn_implementation(old_attn)


class AdapterHandle:
    """Runs the experts module of an adapter family's layer on the generic forward of its
    calling convention until `remove()` (a no-op when it already did: nested installs).

    The forward replaced is accelerate's inner ``_old_forward`` when the module carries an
    accelerate hook (offloaded models), so the hook still moves its weights."""

    def __init__(self, parts: LayerParts):
        adapter, module = parts.adapter, parts.experts
        self.module = module
        self.attr = "_old_forward" if hasattr(module, "_hf_hook") else "forward"
        current = module.__dict__.get(self.attr)
        self.installed = getattr(current, "func", None) not in _experts.ADAPTER_FORWARDS.values()
        self.hooks = []
        if not self.installed:
            return
        self.previous = current
        setattr(module, self.attr, _experts.adapter_forward(adapter, module))
        if adapter.call == "expert_major":
            router = parts.experts_block.get_submodule(adapter.router)

            def keep_routing(m, inputs, output, module=module):
                tag(module).routing = _experts.adapter_routing(adapter, m, output)

            self.hooks.append(router.register_forward_hook(keep_routing))

    def remove(self) -> None:
        if not self.installed:
            return
        for h in self.hooks:
            h.remove()
        if self.previous is None:
            delattr(self.module, self.attr)
        else:
            setattr(self.module, self.attr, self.previous)
        tag(self.module).routing = None
        self.installed = False


def moe_layers(model: torch.nn.Module) -> list[LayerParts]:
    """`find_layers` of a model the toolkit profiles; a clear error for a refused family
    (`superexperts.adapters.REFUSED`) or a model without routed experts."""
    reason = _adapters.refusal(model)
    if reason is not None:
        raise ValueError(reason)
    parts = find_layers(model)
    if not any(p.is_moe for p in parts):
        raise ValueError(
            f"{type(model).__name__} has no routed experts module: superexperts profiles MoE models whose experts "
            "transformers runs through its ExpertsInterface (fused 3-D parameters, transformers >= 5) or that "
            "superexperts.adapters declares (`superexperts families` lists them)"
        )
    return parts


def hook_layer(parts: LayerParts, stats: StatsCollector) -> list:
    """Forward hooks recording one layer's shared/dense down_proj outputs and its output
    hidden states into `stats` (and, for an adapter family, its experts forward); returns
    the handles.

    A shared expert ``<name>`` with a sibling ``<name>_gate`` (a ``Linear`` to one output:
    the Qwen2-MoE family scales the shared expert's output by ``sigmoid(gate(h))``) records
    that sigmoid as its routing weight g; other shared experts and dense MLPs have g = 1.
    """
    handles = [AdapterHandle(parts)] if parts.adapter is not None else []
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
    """The model's fields of a `ProfileResult`: type, layer count and kinds, shared/dense
    names, and its structure (`superexperts.layers.describe_structure`)."""
    cfg = text_config(model.config)
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_layers": len(parts),
        "layer_kinds": ["moe" if p.is_moe else "dense" for p in parts],
        "shared_names": {p.index: [n for n, _ in p.shared] for p in parts if p.shared},
        "dense_names": {p.index: [n for n, _ in p.dense] for p in parts if p.dense},
        "structure": describe_structure(model, parts),
    }
