"""The authors' profiling method, as a transformers-4.x user runs it, for the whole-model and
streaming comparisons. Imports torch, transformers and safetensors only (not superexperts or
its kernels), as their tool does.

- Experts: one ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` per expert (transformers
  4.x modules), a Python loop over the experts a batch hits, and a forward hook on every expert
  ``down_proj`` that records ``input[0].abs().max()`` and ``output.abs().max()`` per call into
  Python lists (``row0``: ``output[0]``, the first routed token's row, as their released hook
  does). Their rule on the per-expert maxima: above the 99.5th percentile and above a tenth
  of the largest (floored), in the first 75% of the layers, experts that saw no token counted
  as 0. Attention: sdpa; no sink or massive-activation statistics.
- Loading, as transformers 4.x with safetensors does it at best: the checkpoint's per-expert
  tensors become those modules' weights as views of the memory-mapped shards (no copy, no
  fusing); pages are read when first touched.
- Streaming: the same, one decoder layer at a time, with the arguments layer 0 receives
  captured once per batch and reused for every layer (a "catcher", as GPTQ-style tools do),
  and the fixed pause after each layer that their tool takes.

Written for the Qwen3-MoE benchmark model (``model.model.layers[i].mlp.experts``).
"""

from __future__ import annotations

import json
import time
from collections import namedtuple
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

Found = namedtuple("Found", "layer expert value")


class HookedExperts(nn.ModuleList):
    """transformers-4.x-style experts of one layer: ``[e].gate_proj/up_proj/down_proj``
    ``nn.Linear`` modules (meta until loaded), looped in Python, with the recording hooks."""

    def __init__(self, fused, records: dict, row0: bool):
        inter, hidden = fused.down_proj.shape[2], fused.down_proj.shape[1]
        experts = []
        for e in range(fused.num_experts):
            mlp = nn.Module()
            for name, (n_in, n_out) in (("gate_proj", (hidden, inter)), ("up_proj", (hidden, inter)), ("down_proj", (inter, hidden))):
                setattr(mlp, name, nn.Linear(n_in, n_out, bias=False, device="meta", dtype=fused.down_proj.dtype))
            mlp.down_proj.register_forward_hook(self._recorder(records, e, row0))
            experts.append(mlp)
        super().__init__(experts)
        self.num_experts = fused.num_experts
        self.act_fn = fused.act_fn

    @staticmethod
    def _recorder(records, expert, row0):
        def hook(module, inputs, output):
            records.setdefault(expert, []).append((inputs[0].abs().max(), (output[0] if row0 else output).abs().max()))

        return hook

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for e in torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            pos, token = torch.where(expert_mask[e])
            x = hidden_states[token]
            mlp = self[e]
            y = mlp.down_proj(self.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, pos, None]).to(out.dtype))
        return out


def _model(model_dir, dtype: torch.dtype, row0: bool):
    """The model with meta weights, 4.x experts in every layer and its rotary tables computed;
    returns (model, per-layer records)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    records = []
    for layer in model.model.layers:
        records.append({})
        layer.mlp.experts = HookedExperts(layer.mlp.experts, records[-1], row0)
    return model.eval(), records


def _weight_map(model_dir) -> dict[str, str]:
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _views(model_dir, keys: list[str], weight_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` as views of the mapped shards."""
    handles = {s: safe_open(str(Path(model_dir) / s), "pt") for s in {weight_map[k] for k in keys}}
    return {k: handles[weight_map[k]].get_tensor(k) for k in keys}


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, *, later: str | None = None) -> None:
    """Make the views `tensors` (names under `prefix`) the module's parameters; those under
    `later` may stay missing (loaded afterwards)."""
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, _ = module.load_state_dict(own, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("lm_head") and not (later and k.startswith(later))]
    if missing:
        raise ValueError(f"{prefix or 'model'}: no checkpoint tensor for {missing[:4]}")


def their_rule(records: list[dict], num_experts: int) -> list[Found]:
    """The authors' selection on the per-expert output maxima (descending)."""
    scope = round(0.75 * len(records))
    a = torch.zeros(len(records), num_experts)
    for layer, rec in enumerate(records):
        for e, rows in rec.items():
            a[layer, e] = max(float(o) for _, o in rows)
    pool = a[:scope]
    keep = (a > torch.quantile(pool.flatten(), 0.995)) & (a > torch.floor(pool.max() / 10))
    keep[scope:] = False
    found = [Found(int(l), int(e), float(a[l, e])) for l, e in keep.nonzero().tolist()]
    return sorted(found, key=lambda f: -f.value)


def profile_in_memory(model_dir, ids: torch.Tensor, *, batch_size: int, dtype: torch.dtype, row0: bool = False) -> list[Found]:
    """Load the whole model (views of the mapped shards) and run every batch through it."""
    model, records = _model(model_dir, dtype, row0)
    weight_map = _weight_map(model_dir)
    _assign(model, _views(model_dir, list(weight_map), weight_map), "")
    with torch.inference_mode():
        for batch in ids.split(batch_size):
            model.model(input_ids=batch, use_cache=False)
    return their_rule(records, model.config.num_experts)


class _Caught(Exception):
    pass


def _layer0_inputs(model, input_ids):
    """(hidden states, args, kwargs) that layer 0 receives for `input_ids`."""
    layers = model.model.layers
    caught = {}

    class Catcher(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            caught["inputs"] = (hidden_states, args, kwargs)
            raise _Caught

    first = layers[0]
    layers[0] = Catcher()
    try:
        model.model(input_ids=input_ids, use_cache=False)
    except _Caught:
        pass
    finally:
        layers[0] = first
    return caught["inputs"]


def profile_streamed(model_dir, ids: torch.Tensor, *, batch_size: int, dtype: torch.dtype, sleep_s: float = 0.1) -> list[Found]:
    """One decoder layer at a time: load it (views of the mapped shards), run every batch, free
    it, pause `sleep_s`."""
    model, records = _model(model_dir, dtype, row0=False)
    weight_map = _weight_map(model_dir)
    base = [k for k in weight_map if not k.startswith("model.layers.")]
    _assign(model, _views(model_dir, base, weight_map), "", later="model.layers.")
    with torch.inference_mode():
        inputs = [_layer0_inputs(model, batch) for batch in ids.split(batch_size)]
        hidden = [h for h, _, _ in inputs]
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}."
            _assign(layer, _views(model_dir, [k for k in weight_map if k.startswith(prefix)], weight_map), prefix)
            for b, (_, args, kwargs) in enumerate(inputs):
                out = layer(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
            layer.to("meta")
            time.sleep(sleep_s)
    return their_rule(records, model.config.num_experts)
