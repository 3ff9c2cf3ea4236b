"""Find the parts of a transformers decoder that the profiler measures, without per-model code.

- decoder layers: the `nn.ModuleList` holding ``num_hidden_layers`` blocks;
- routed experts: a module whose class transformers decorated with
  ``@use_experts_implementation`` (3-D ``down_proj`` parameter, dispatched through the
  ExpertsInterface), found in ~60 model families;
- shared experts: any other module with a linear ``down_proj`` inside the same MoE block;
- dense MLPs: modules with a linear ``down_proj`` in a layer without routed experts;
- attention: the modules that call the AttentionInterface (they carry ``layer_idx``).

The toolkit's state on a transformers module is one `ModuleTag`, under one attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .distributed import ExpertShard

DOWN_PROJ_NAMES = ("down_proj", "w2", "fc2")
_TAG = "_superexperts"


@dataclass
class ModuleTag:
    """What the toolkit keeps on a transformers module.

    layer: decoder layer index of an experts, attention or down_proj module (`find_layers`).
    shard: the experts an experts module holds under expert parallel (None: all of them).
    pruned: bool ``[E]`` of an experts module, the routed experts skipped while a
        `superexperts.ablation.Pruning` is active (None: none).
    """

    layer: int | None = None
    shard: ExpertShard | None = None
    pruned: torch.Tensor | None = None


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
    """The measurable parts of one decoder layer."""

    index: int
    layer: nn.Module
    experts: nn.Module | None = None
    experts_name: str | None = None
    shared: list[tuple[str, nn.Linear]] = field(default_factory=list)  # (module name, its down_proj)
    dense: list[tuple[str, nn.Linear]] = field(default_factory=list)
    attention: list[nn.Module] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


def is_fused_experts(module: nn.Module) -> bool:
    """True for an experts module dispatched through transformers' ExpertsInterface."""
    down = getattr(module, "down_proj", None)
    return (
        hasattr(module, "_is_expert_parallel")
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
        and hasattr(module, "num_experts")
    )


def _down_proj_of(module: nn.Module) -> nn.Linear | None:
    for name in DOWN_PROJ_NAMES:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child
    return None


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (the longest one of ``num_hidden_layers`` entries)."""
    num_layers = getattr(text_config(model.config), "num_hidden_layers", None)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (num_layers is None or len(m) == num_layers)
    ]
    if not candidates:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: no nn.ModuleList with "
            f"num_hidden_layers={num_layers} entries"
        )
    # Prefer the text decoder ("...layers") over vision towers of the same length.
    candidates.sort(key=lambda nm: (not nm[0].endswith("layers"), "vision" in nm[0] or "visual" in nm[0]))
    return candidates[0][1]


def find_layers(model: nn.Module) -> list[LayerParts]:
    """Describe every decoder layer of `model` and tag its experts, attention and down_proj
    modules with their layer index (`ModuleTag.layer`), so the experts/attention
    implementations know which layer they serve.
    """
    parts = []
    for index, layer in enumerate(decoder_layers(model)):
        p = LayerParts(index=index, layer=layer)
        experts_parent = None
        for name, m in layer.named_modules():
            if is_fused_experts(m) and p.experts is None:
                p.experts, p.experts_name = m, name
                experts_parent = name.rsplit(".", 1)[0] if "." in name else ""
                tag(m).layer = index
            if hasattr(m, "layer_idx") and any(hasattr(m, a) for a in ("q_proj", "qkv_proj", "q_a_proj", "query_key_value")):
                p.attention.append(m)
                tag(m).layer = index
        for name, m in layer.named_modules():
            down = _down_proj_of(m)
            if down is None or (p.experts is not None and name.startswith(p.experts_name)):
                continue
            inside_moe_block = p.is_moe and (experts_parent == "" or name.startswith(experts_parent + "."))
            (p.shared if inside_moe_block else p.dense).append((name, down))
            tag(down).layer = index
        parts.append(p)
    return parts
