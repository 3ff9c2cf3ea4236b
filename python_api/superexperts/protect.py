"""Keep Super Experts in high precision through quantization: ignore lists for the tools.

A routed expert of a transformers 5 model has no module of its own: the experts of a layer
are two fused 3-D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) of one
module, e.g. ``model.layers.1.mlp.experts``. Whether one expert of it can stay unquantized
depends on the tool:

- llm-compressor linearizes each fused experts module into per-expert ``Linear`` modules
  (``<experts>.<e>.gate_proj / up_proj / down_proj``, ``llmcompressor.modeling.moe``) before
  it quantizes, so an ``ignore`` entry can name one expert. The checkpoint it writes then
  mixes precisions inside one layer's experts.
- NVIDIA ModelOpt quantizes fused experts (its ``_QuantFusedExperts``) with one weight
  quantizer per expert (``<experts>.gate_up_proj_weight_quantizers.<e>``,
  ``<experts>.down_proj_weight_quantizers.<e>``) but one input quantizer per layer for all
  its experts (``<experts>.gate_up_proj_input_quantizer``, ``...down_proj_input_quantizer``).
  A ``quant_cfg`` pattern can keep one expert's weights apart, not its activations.
- Serving (vLLM's ``FusedMoE``, for compressed-tensors and ModelOpt checkpoints alike) runs
  one quantization scheme per layer: it serves a layer's experts unquantized only when the
  whole layer is ignored.

`protection` writes, per tool, the patterns that keep exactly the Super Experts apart where
the tool can, the whole-layer patterns where it can't, and says which is which in ``notes``
rather than emitting a pattern that would match nothing. Shared experts and dense MLPs are
ordinary ``Linear`` modules: every tool can name them.
"""

from __future__ import annotations

import re

from .ablation import ExpertRef
from .result import shared_label

FORMATS = ("json", "llmcompressor", "modelopt")

NOTE_LLMC_SERVING = (
    "ignore keeps exactly the Super Experts' linear layers in high precision (llm-compressor linearizes fused "
    "experts into one Linear per expert projection). vLLM serves a fused MoE layer with one quantization scheme, so "
    "a checkpoint that ignores some experts of a layer does not load there: to serve with vLLM, use "
    "ignore_whole_layers, which keeps every expert of the Super Experts' layers in high precision."
)
NOTE_MODELOPT_INPUTS = (
    "quant_cfg disables the Super Experts' own weight quantizers. ModelOpt's fused-experts wrapper has one input "
    "quantizer per layer for all its experts, so a Super Expert's activations cannot be kept apart: with "
    "activation quantization (FP8, NVFP4, INT8 SmoothQuant) use quant_cfg_whole_layers, which keeps the whole layer "
    "(its weights and the shared input quantizers) in high precision. Put these entries after the general "
    "'*weight_quantizer' / '*input_quantizer' entries: later quant_cfg entries win."
)


def module_names(model_meta: dict) -> dict:
    """``{"layers": "model.layers", "experts": {l: "mlp.experts"}, "shared": {l: [...]},
    "adapter": None or the family}`` from a report's model metadata (`ProfileResult.metadata`:
    its ``structure`` and ``shared_names``)."""
    structure = model_meta.get("structure") or {}
    routed = structure.get("routed_experts") or {}
    if not structure.get("decoder_layers") or not routed.get("path"):
        raise ValueError("the report does not name the model's modules (made before they were recorded): pass --model")
    runs_through = routed.get("runs_through", "ExpertsInterface")
    return {
        "layers": structure["decoder_layers"],
        "experts": {i: routed["path"] for i, kind in enumerate(model_meta.get("layer_kinds", [])) if kind == "moe"},
        "shared": {int(k): v for k, v in (model_meta.get("shared_names") or {}).items()},
        "adapter": None if runs_through == "ExpertsInterface" else runs_through,
    }


def names_from_model(model) -> dict:
    """The same names read from a model (a meta-device skeleton is enough)."""
    from .integration import describe_model
    from .layers import find_layers

    return module_names(describe_model(model, find_layers(model)))


def protection(experts: list[ExpertRef], names: dict) -> dict:
    """Module lists and per-tool patterns keeping `experts` (``(layer, expert id | "shared")``)
    in high precision; see the module docstring for what each tool can keep apart."""
    if names.get("adapter"):
        raise ValueError(
            f"this family's routed experts run outside transformers' ExpertsInterface ({names['adapter']}): the "
            "quantization tools' names for them are not known here"
        )
    modules, llmc, llmc_layers, mo, mo_layers = [], [], [], {}, {}
    for layer, expert in experts:
        prefix = f"{names['layers']}.{layer}"
        if isinstance(expert, str):
            shared = names["shared"].get(layer, [])
            index = 0 if expert == "shared" else int(expert.split(":")[1])
            if index >= len(shared):
                raise ValueError(f"layer {layer} has no shared expert {expert!r} in the report's model")
            module = f"{prefix}.{shared[index]}"
            modules.append({"layer": layer, "expert": shared_label(index, len(shared)), "kind": "shared", "module": module,
                            "fused": False})
            llmc.append(f"re:^{re.escape(module)}\\..+$")
            mo[f"*{module}.*"] = {"enable": False}
            continue
        if layer not in names["experts"]:
            raise ValueError(f"layer {layer} has no routed experts in the report's model")
        experts_module = f"{prefix}.{names['experts'][layer]}"
        modules.append({
            "layer": layer, "expert": expert, "kind": "routed", "module": experts_module, "fused": True, "index": expert,
            "tensors": [f"{experts_module}.gate_up_proj[{expert}]", f"{experts_module}.down_proj[{expert}]"],
        })
        llmc.append(f"re:^{re.escape(experts_module)}\\.{expert}\\.(gate_proj|up_proj|down_proj)$")
        layer_pattern = f"re:^{re.escape(experts_module)}\\.\\d+\\.(gate_proj|up_proj|down_proj)$"
        if layer_pattern not in llmc_layers:
            llmc_layers.append(layer_pattern)
        for proj in ("gate_up_proj", "down_proj"):
            mo[f"*{experts_module}.{proj}_weight_quantizers.{expert}"] = {"enable": False}
        mo_layers[f"*{experts_module}.*"] = {"enable": False}
    shared_only_llmc = [p for p in llmc if not p.endswith("(gate_proj|up_proj|down_proj)$")]
    shared_only_mo = {k: v for k, v in mo.items() if "_weight_quantizers." not in k}
    return {
        "super_experts": [[layer, expert] for layer, expert in experts],
        "modules": modules,
        "llmcompressor": {
            "ignore": llmc,
            "ignore_whole_layers": shared_only_llmc + llmc_layers,
            "notes": [NOTE_LLMC_SERVING] if llmc_layers else [],
        },
        "modelopt": {
            "quant_cfg": mo,
            "quant_cfg_whole_layers": {**shared_only_mo, **mo_layers},
            "notes": [NOTE_MODELOPT_INPUTS] if mo_layers else [],
        },
    }


def render(spec: dict, fmt: str) -> dict:
    """The part of `protection`'s output for one `FORMATS` entry."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "json":
        return spec
    return {"super_experts": spec["super_experts"], **spec[fmt]}
