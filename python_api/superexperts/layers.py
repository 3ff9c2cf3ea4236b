"""Find the parts of a transformers decoder that the profiler measures, by structure, without
per-model code.

- routed experts: a module whose class transformers decorated with
  ``@use_experts_implementation`` (3-D ``down_proj`` parameter, dispatched through the
  ExpertsInterface; ~60 families), or an experts module of a family declared in
  `superexperts.adapters` (its experts bypass the ExpertsInterface);
- attention: the modules whose class calls transformers' AttentionInterface
  (``ALL_ATTENTION_FUNCTIONS``);
- decoder layers: the `nn.ModuleList` whose entries hold the routed experts (else the
  attention), whatever the config calls its layer count (LongCat-Flash's
  ``num_hidden_layers`` counts attention sublayers: two per entry);
- shared experts: any other module with a linear ``down_proj`` inside the same MoE block;
- dense MLPs: the other modules with a linear ``down_proj`` of a layer.

The toolkit's state on a transformers module is one `ModuleTag`, under one attribute.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import adapters as _adapters

if TYPE_CHECKING:
    from .distributed import ExpertShard

DOWN_PROJ_NAMES = ("down_proj", "w2", "fc2")
_TAG = "_superexperts"
# Config fields that count layers of some kind; the structure report quotes those a config has.
_LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "num_nextn_predict_layers", "first_k_dense_replace")


@dataclass
class ModuleTag:
    """What the toolkit keeps on a transformers module.

    layer: decoder layer index of an experts, attention or down_proj module (`find_layers`).
    heads: ``(first, total)`` for an attention module that shares its decoder layer with
        others: its heads are ``first ..`` of the layer's ``total`` sink-mass heads.
    shard: the experts an experts module holds under expert parallel (None: all of them).
    pruned: bool ``[E]`` of an experts module, the routed experts skipped while a
        `superexperts.ablation.Pruning` is active (None: none).
    routing: an adapter family's routing of the current call, left by its router's hook
        for the experts module (`superexperts.adapters`).
    """

    layer: int | None = None
    heads: tuple[int, int] | None = None
    shard: ExpertShard | None = None
    pruned: torch.Tensor | None = None
    routing: Any = None


def tag(module: nn.Module) -> ModuleTag:
    """The module's tag, created on first use."""
    t = getattr(module, _TAG, None)
    if t is None:
        t = ModuleTag()
        setattr(module, _TAG, t)
    return t


def tag_of(module: nn.Module) -> ModuleTag | None:
    """The module's tag, or None when the toolkit never tagged it."""
    return getattr(module, _TAG, None)


@dataclass
class LayerParts:
    """The measurable parts of one decoder layer.

    experts: the routed experts module; adapter: its family's `superexperts.adapters.Adapter`
    when its experts bypass transformers' ExpertsInterface (None: they go through it).
    """

    index: int
    layer: nn.Module
    experts: nn.Module | None = None
    experts_name: str | None = None
    adapter: _adapters.Adapter | None = None
    shared: list[tuple[str, nn.Linear]] = field(default_factory=list)  # (module name, its down_proj)
    dense: list[tuple[str, nn.Linear]] = field(default_factory=list)
    attention: list[nn.Module] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    @property
    def num_experts(self) -> int:
        """Routed experts of the layer (0 for a dense layer)."""
        if self.experts is None:
            return 0
        return self.adapter.num_experts(self.experts) if self.adapter else self.experts.num_experts

    @property
    def experts_block(self) -> nn.Module:
        """The module holding the experts module (the MoE block; the layer when it holds them directly)."""
        parent = self.experts_name.rpartition(".")[0]
        return self.layer.get_submodule(parent) if parent else self.layer


def is_fused_experts(module: nn.Module) -> bool:
    """True for an experts module dispatched through transformers' ExpertsInterface."""
    down = getattr(module, "down_proj", None)
    return (
        hasattr(module, "_is_expert_parallel")
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
        and hasattr(module, "num_experts")
    )


def experts_kind(module: nn.Module) -> tuple[bool, _adapters.Adapter | None]:
    """(is a routed experts module, its adapter or None for the ExpertsInterface)."""
    if is_fused_experts(module):
        return True, None
    adapter = _adapters.adapter_for(module)
    return adapter is not None, adapter


@functools.lru_cache(maxsize=None)
def _class_calls_attention_interface(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch."):
            break
        try:
            if "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            continue
    return False


def is_attention(module: nn.Module) -> bool:
    """True for a module whose class calls transformers' AttentionInterface."""
    return not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and _class_calls_attention_interface(type(module))


def _down_proj_of(module: nn.Module) -> nn.Linear | None:
    for name in DOWN_PROJ_NAMES:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child
    return None


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _holds(entry: nn.Module, predicate) -> bool:
    return any(predicate(m) for m in entry.modules())


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder layers, found by structure: of the ModuleLists whose
    entries hold routed experts, the one where most entries do (then: the one of the text
    config's ``num_hidden_layers`` entries, then the outermost); for a model without routed
    experts, the same over entries that hold attention. Vision towers and per-layer sublists
    (LongCat-Flash's two attention sublayers) lose to the decoder.
    """
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    declared = getattr(text_config(model.config), "num_hidden_layers", None)
    for predicate in (lambda m: experts_kind(m)[0], is_attention):
        scored = [((sum(_holds(e, predicate) for e in m), len(m) == declared), name, m) for name, m in lists]
        best = max((s for s, _, _ in scored), default=(0, False))
        if best[0] > 0:
            # The first of equal scores: named_modules lists outer lists before inner ones.
            return next((name, m) for s, name, m in scored if s == best)
    raise ValueError(
        f"could not find the decoder layers of {type(model).__name__}: no nn.ModuleList whose entries hold "
        "routed experts or attention modules"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (`find_decoder_layers`)."""
    return find_decoder_layers(model)[1]


def find_layers(model: nn.Module) -> list[LayerParts]:
    """Describe every decoder layer of `model` and tag its experts, attention and down_proj
    modules with their layer index (`ModuleTag.layer`), so the experts/attention
    implementations know which layer they serve. Layers are numbered by their index in the
    decoder ModuleList (`describe_structure` says how the config's counts map onto it).
    """
    parts = []
    for index, layer in enumerate(decoder_layers(model)):
        p = LayerParts(index=index, layer=layer)
        experts_parent = None
        for name, m in layer.named_modules():
            found, adapter = experts_kind(m) if p.experts is None else (False, None)
            if found:
                p.experts, p.experts_name, p.adapter = m, name, adapter
                experts_parent = name.rpartition(".")[0]
                tag(m).layer = index
            if is_attention(m):
                p.attention.append(m)
        for m in p.attention:
            tag(m).layer = index
        if len(p.attention) > 1:
            _split_sink_heads(p.attention)
        for name, m in layer.named_modules():
            down = _down_proj_of(m)
            if down is None or (p.experts is not None and (name == p.experts_name or name.startswith(p.experts_name + "."))):
                continue
            inside_moe_block = p.is_moe and (experts_parent == "" or name.startswith(experts_parent + "."))
            (p.shared if inside_moe_block else p.dense).append((name, down))
            tag(down).layer = index
        parts.append(p)
    return parts


def _num_heads(attention: nn.Module) -> int:
    for source in (attention, getattr(attention, "config", None)):
        for name in ("num_heads", "num_attention_heads"):
            n = getattr(source, name, None)
            if isinstance(n, int):
                return n
    raise ValueError(
        f"{type(attention).__name__} shares its decoder layer with other attention modules but states no head "
        "count (num_heads / config.num_attention_heads): cannot lay out the layer's sink-mass heads"
    )


def _split_sink_heads(attention: list[nn.Module]) -> None:
    """Several attention modules in one decoder layer: their sink masses are one row of heads,
    in module order."""
    counts = [_num_heads(m) for m in attention]
    first = 0
    for m, n in zip(attention, counts):
        tag(m).heads = (first, sum(counts))
        first += n


def describe_structure(model: nn.Module, parts: list[LayerParts]) -> dict:
    """How the config's layer counts map onto the decoder layers the toolkit reports, what
    runs the routed experts, and where their routing weight is applied."""
    path, layers = find_decoder_layers(model)
    cfg = text_config(model.config)
    counts = {k: getattr(cfg, k) for k in _LAYER_COUNT_KEYS if isinstance(getattr(cfg, k, None), int)}
    attention = sorted({len(p.attention) for p in parts})
    notes = [f"layer i is entry i of {path} ({len(layers)} entries)"]
    declared = counts.get("num_hidden_layers")
    if declared is not None and declared != len(layers):
        if attention == [declared // len(layers)] and declared % len(layers) == 0:
            notes.append(
                f"config num_hidden_layers={declared} counts attention sublayers: each decoder layer holds "
                f"{attention[0]} attention modules (their sink-mass heads are concatenated per layer, in order)"
            )
        else:
            notes.append(f"config num_hidden_layers={declared} differs from the {len(layers)} decoder layers")
    moe = [p for p in parts if p.is_moe]
    adapter = next((p.adapter for p in moe if p.adapter is not None), None)
    experts = None
    if moe:
        experts = {
            "class": type(moe[0].experts).__name__,
            "path": moe[0].experts_name,
            "runs_through": f"adapter {adapter.family}" if adapter else "ExpertsInterface",
            "routing_weight": adapter.routing_weight if adapter else "output",
        }
        if adapter is not None:
            experts["down_proj"] = adapter.down.describe()
            experts["note"] = adapter.note
    return {
        "decoder_layers": path,
        "num_decoder_layers": len(layers),
        "config_layer_counts": counts,
        "attention_modules_per_layer": attention,
        "routed_experts": experts,
        "notes": notes,
    }
