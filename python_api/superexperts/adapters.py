"""Families whose experts transformers runs outside its ExpertsInterface, declared: which
parameter is down_proj, its layout, how the module is called, where the routing weight is
applied; and the families refused, with the reason.

An `Adapter` names the experts class of one family. While the toolkit runs a model
(`superexperts.integration`), that module's forward is replaced by the generic one of its
calling convention (`superexperts.experts.ADAPTER_FORWARDS`), which runs the same grouped
path as the ExpertsInterface implementation (our op, same statistics, pruning by skip).

Calling conventions (``call``):

- ``"top_k"``: ``forward(hidden [..., H], top_k_index [T, k], top_k_weights [T, k]) -> [..., H]``,
  the ExpertsInterface signature (DBRX, LongCat-Flash, Step3p7).
- ``"expert_major"``: ``forward(x [E * T, H]) -> [E * T, H]``: every expert gets every token,
  row ``e * T + t`` is token t already scaled by its router score for expert e (0 off its
  top-k), and the block sums the E outputs of each token (Llama 4). Which experts a token
  was routed to comes from the router (``router``: a sibling module), read by a hook.
- ``"sorted_rows"``: the experts module is the whole MoE block, ``forward(x [B, T, H])``; its
  ``router`` returns rows sorted by expert: ``(sort index, row token [R], row gate [R],
  rows per expert, logits)``; the block adds ``output_bias`` to the weighted sum (JetMoE).

Layouts (`Weight.layout`): ``"out_in"``: expert e's matrix is ``[out, in]`` (``F.linear``);
``"in_out"``: ``[in, out]`` (``x @ w``). ``flat``: stored ``[E * rows, cols]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class Weight:
    """One per-expert weight of an experts module."""

    path: str  # attribute path from the experts module
    layout: Literal["out_in", "in_out"]
    flat: bool = False

    @property
    def transposed(self) -> bool:
        """True for ``[E, in, out]`` (the op's ``w_transposed``)."""
        return self.layout == "in_out"

    def get(self, module: nn.Module, num_experts: int) -> torch.Tensor:
        """The weight ``[E, out, in]`` (``[E, in, out]`` when transposed) of the first `num_experts` experts."""
        w = operator.attrgetter(self.path)(module)
        if self.flat:
            w = w.view(num_experts, -1, w.shape[-1])
        return w[:num_experts] if w.shape[0] != num_experts else w

    def describe(self) -> str:
        shape = "[E, in, out]" if self.transposed else "[E, out, in]"
        return f"{self.path} {shape}" + (" (stored flat [E * rows, cols])" if self.flat else "")


@dataclass(frozen=True)
class Adapter:
    """How one family's experts module runs (see the module docstring for ``call``).

    up: the fused ``[gate; up]`` weight, or the (gate, up) pair, or one up weight.
    activation: attribute path of the activation; the down input is ``act(gate) * up``.
    gate: a method of the experts module mapping the fused up output to the down input,
        used instead of ``activation`` (Step3p7 clamps).
    identity_experts: attribute holding the total expert count when ids ``num_experts ..
        total - 1`` are identity ("zero-computation") experts: output = input, no down_proj.
    """

    family: str  # transformers.models.<family>
    experts_class: str
    call: Literal["top_k", "expert_major", "sorted_rows"]
    num_experts_attr: str
    up: tuple[Weight, ...]
    down: Weight
    activation: str
    routing_weight: Literal["output", "input"] = "output"
    gate: str | None = None
    router: str | None = None
    identity_experts: str | None = None
    output_bias: str | None = None
    note: str = ""

    def num_experts(self, module: nn.Module) -> int:
        return int(operator.attrgetter(self.num_experts_attr)(module))

    def describe(self) -> str:
        where = "scales the expert's input" if self.routing_weight == "input" else "scales the expert's output"
        return f"{self.experts_class}: down_proj is {self.down.describe()}; the routing weight {where}" + (
            f"; {self.note}" if self.note else ""
        )


# transformers' usual fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn.
_FUSED = dict(up=(Weight("gate_up_proj", "out_in"),), down=Weight("down_proj", "out_in"), activation="act_fn")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama4", "Llama4TextExperts", "expert_major", "num_experts", up=(Weight("gate_up_proj", "in_out"),),
            down=Weight("down_proj", "in_out"), activation="act_fn", routing_weight="input", router="router",
            note="the router's sigmoid score multiplies the expert's input: stats are the down_proj output of the "
            "scaled input, as the model computes it"),
    Adapter("dbrx", "DbrxExperts", "top_k", "num_experts",
            up=(Weight("mlp.w1", "out_in", flat=True), Weight("mlp.v1", "out_in", flat=True)),
            down=Weight("mlp.w2", "in_out", flat=True), activation="mlp.activation_fn"),
    Adapter("longcat_flash", "LongcatFlashExperts", "top_k", "num_routed_experts", **_FUSED,
            identity_experts="total_experts",
            note="ids n_routed_experts.. are identity (zero-computation) experts: no down_proj, not measured, "
            "not prunable"),
    Adapter("step3p7", "Step3p7Experts", "top_k", "num_experts", **_FUSED, gate="_apply_gate"),
    Adapter("jetmoe", "JetMoeMoE", "sorted_rows", "input_linear.num_experts",
            up=(Weight("input_linear.weight", "out_in"),), down=Weight("output_linear.weight", "out_in"),
            activation="activation", router="router", output_bias="bias",
            note="the MLP experts; the mixture-of-attention experts (JetMoeMoA) are part of attention and not "
            "measured"),
)

_ENCODER_DECODER = (
    "encoder-decoder model ({what}): superexperts profiles decoder-only language models, one decoder stack "
    "run on calibration windows with a next-token loss and first-token attention sinks; an encoder-decoder "
    "needs source/target pairs and has two expert stacks"
)

# transformers.models.<family> -> why its MoE experts are not profiled.
REFUSED: dict[str, str] = {
    "nllb_moe": _ENCODER_DECODER.format(what="NLLB-MoE translation, capacity-limited top-2 routing"),
    "switch_transformers": _ENCODER_DECODER.format(what="Switch Transformers, T5-style, capacity-limited top-1 routing"),
    "doge": "Doge's CDMoE experts are single neurons retrieved by product keys (rows of down_embed/up_embed, a "
    "PEER-style layer), not expert MLPs: there is no per-expert down_proj matrix to measure",
    "pi05": "PI0.5 is a vision-language-action model: its action expert (PI05ActionExpertModel) is a second "
    "transformer that denoises robot actions beside the vision-language one, not routed MoE experts: there is no "
    "router and no per-expert down_proj to measure",
    "vitpose_backbone": "vision pose backbone: its experts are picked per dataset (dataset_index), not routed per "
    "token, and there is no language model to run calibration text through",
}

_BY_CLASS = {a.experts_class: a for a in ADAPTERS}


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter whose experts class `module` is an instance of, or None."""
    cls = type(module)
    adapter = _BY_CLASS.get(cls.__name__)
    if adapter is None or not cls.__module__.startswith(f"transformers.models.{adapter.family}."):
        return None
    return adapter


def family_of(model: nn.Module) -> str | None:
    """``transformers.models.<family>`` of a transformers model, or None for another class."""
    parts = type(model).__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["transformers", "models"] else None


def refusal(model: nn.Module) -> str | None:
    """Why the model's family is refused, naming it; None when it is not."""
    family = family_of(model)
    if family in REFUSED:
        return f"{type(model).__name__} ({family}) is not supported: {REFUSED[family]}"
    return None
