"""Pruning ablations: skip experts when routed, measure perplexity and sink decay.

Pruning changes no weight: a pruned routed expert's rows are dropped from the grouped
GEMM in our experts implementation (it contributes zero, as if its weights were zero),
and a pruned shared expert's ``down_proj`` output is replaced by zeros by a forward
hook. `Pruning.restore()` (or leaving the ``with`` block) undoes it.

Sink decay (arXiv 2507.23279, Eq. 7), per layer:
``D_sink = 1 - (1/H) * sum_h mass'_h / mass_h`` with ``mass_h`` the mean sink mass of
head h over queries t >= 1, ``'`` the pruned model; heads with ``mass_h == 0`` are left
out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .collector import StatsCollector
from .integration import our_implementations, run_batches
from .layers import find_layers, tag
from .rules import SuperExpert
from .result import ProfileResult

ExpertRef = tuple[int, "int | str"]


def parse_experts(text: str) -> list[ExpertRef]:
    """``"1,68;2,92;8,shared"`` -> ``[(1, 68), (2, 92), (8, "shared")]``."""
    out: list[ExpertRef] = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        try:
            layer_s, expert_s = (x.strip() for x in item.split(","))
            out.append((int(layer_s), expert_s if expert_s.startswith("shared") else int(expert_s)))
        except ValueError:
            raise ValueError(
                f"cannot parse expert {item!r}: expected 'layer,expert' pairs separated by ';', "
                "e.g. '1,68;2,92' or '8,shared'"
            ) from None
    return out


def expert_refs(experts: Iterable) -> list[ExpertRef]:
    """``(layer, expert)`` pairs from pairs, `SuperExpert`s, or report rows (ours: ``layer`` /
    ``expert``; the authors': ``layer_index`` / ``expert_index``)."""
    refs = []
    for e in experts:
        if isinstance(e, SuperExpert):
            layer, expert = e.layer, e.expert
        elif isinstance(e, dict):
            layer, expert = e.get("layer_index", e.get("layer")), e.get("expert_index", e.get("expert"))
            if layer is None or expert is None:
                raise ValueError(f"expert entry {e} has no layer/expert (or layer_index/expert_index)")
        else:
            layer, expert = e
        refs.append((int(layer), expert if isinstance(expert, str) else int(expert)))
    return refs


class Pruning:
    """Experts skipped while this object is active (from creation until `restore()`)."""

    def __init__(self, model: torch.nn.Module, experts: Iterable):
        self.model = model
        self.experts = expert_refs(experts)
        parts = {p.index: p for p in find_layers(model)}
        routed: dict[int, list[int]] = {}
        shared: list[torch.nn.Module] = []
        for layer, expert in self.experts:
            if layer not in parts:
                raise ValueError(f"layer {layer} does not exist: the model has {len(parts)} decoder layers")
            p = parts[layer]
            if isinstance(expert, str):
                shared.append(_shared_down_proj(p, layer, expert))
            elif not p.is_moe:
                raise ValueError(f"layer {layer} is a dense layer: it has no routed experts to prune")
            elif not 0 <= expert < p.num_experts:
                raise ValueError(f"expert {expert} does not exist in layer {layer} ({p.num_experts} routed experts)")
            else:
                routed.setdefault(layer, []).append(expert)

        self._impl = our_implementations(model, attention=False)
        self._impl.__enter__()
        self._masked = []
        for layer, ids in routed.items():
            module = parts[layer].experts
            device = next(module.parameters()).device
            mask = torch.zeros(parts[layer].num_experts, dtype=torch.bool, device=device)
            mask[ids] = True
            tag(module).pruned = mask
            self._masked.append(module)
        self._hooks = [down.register_forward_hook(_zero_output) for down in shared]

    def restore(self) -> None:
        for module in self._masked:
            tag(module).pruned = None
        for h in self._hooks:
            h.remove()
        self._masked, self._hooks = [], []
        if self._impl is not None:
            self._impl.__exit__(None, None, None)
            self._impl = None

    def __enter__(self) -> Pruning:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _zero_output(module, inputs, output):
    return torch.zeros_like(output)


def _shared_down_proj(p, layer: int, label: str) -> torch.nn.Module:
    if not p.shared:
        raise ValueError(f"layer {layer} has no shared expert")
    index = 0 if label == "shared" else int(label.split(":")[1])
    if not 0 <= index < len(p.shared):
        raise ValueError(f"layer {layer} has {len(p.shared)} shared experts, no {label!r}")
    return p.shared[index][1]


def prune_experts(model: torch.nn.Module, experts: Iterable) -> Pruning:
    """Skip `experts` (``(layer, expert_id | "shared")`` pairs, `SuperExpert`s, or rows of
    the authors' report) until the returned handle's `restore()`; usable with ``with``."""
    return Pruning(model, experts)


def prune_super_experts(model: torch.nn.Module, result: ProfileResult | Iterable, rule=None) -> Pruning:
    """One line: prune the Super Experts of a `ProfileResult` (under `rule`) or of a given list."""
    experts = result.super_experts(rule) if isinstance(result, ProfileResult) else result
    return Pruning(model, experts)


@dataclass
class Evaluation:
    """Perplexity and per-layer mean sink mass per head on one token set."""

    perplexity: float
    nll: float
    tokens: int
    sink_mass: dict[int, torch.Tensor]


def evaluate(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    batch_size: int = 1,
    num_sink_tokens: int = 1,
    progress: bool = True,
) -> Evaluation:
    """Perplexity of `model` on ``tokens [N, L]`` and, in the same pass, its sink mass."""
    stats = StatsCollector(num_sink_tokens=num_sink_tokens)
    model.eval()
    with our_implementations(model):
        nll, count = run_batches(model, tokens, stats, batch_size=batch_size, with_loss=True, progress=progress, desc="eval")
    sink = {layer: s.mean().cpu() for layer, s in sorted(stats.sink.items())}
    return Evaluation(perplexity=math.exp(nll / count), nll=nll, tokens=count, sink_mass=sink)


def sink_decay(base: dict[int, torch.Tensor], pruned: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer D_sink from per-head mean sink masses of the base and the pruned model."""
    out = {}
    for layer, mass in base.items():
        if layer not in pruned:
            continue
        keep = mass > 0
        if not bool(keep.any()):
            out[layer] = float("nan")
            continue
        ratio = pruned[layer][keep] / mass[keep]
        out[layer] = float(1.0 - ratio.mean())
    return out


@dataclass
class AblationResult:
    experts: list[ExpertRef]
    base: Evaluation
    pruned: Evaluation
    sink_decay: dict[int, float]

    def to_dict(self) -> dict:
        return {
            "experts": [[layer, expert] for layer, expert in self.experts],
            "perplexity_before": self.base.perplexity,
            "perplexity_after": self.pruned.perplexity,
            "eval_tokens": self.base.tokens,
            "sink_decay": {str(k): v for k, v in self.sink_decay.items()},
            "sink_mass_before": {str(k): v.tolist() for k, v in self.base.sink_mass.items()},
            "sink_mass_after": {str(k): v.tolist() for k, v in self.pruned.sink_mass.items()},
        }


def ablate(
    model: torch.nn.Module,
    experts: Iterable,
    tokens: torch.Tensor,
    *,
    batch_size: int = 1,
    num_sink_tokens: int = 1,
    progress: bool = True,
) -> AblationResult:
    """Evaluate `model` on `tokens` as it is and with `experts` pruned; sink decay per layer."""
    refs = expert_refs(experts)
    base = evaluate(model, tokens, batch_size=batch_size, num_sink_tokens=num_sink_tokens, progress=progress)
    with prune_experts(model, refs):
        after = evaluate(model, tokens, batch_size=batch_size, num_sink_tokens=num_sink_tokens, progress=progress)
    return AblationResult(refs, base, after, sink_decay(base.sink_mass, after.sink_mass))
