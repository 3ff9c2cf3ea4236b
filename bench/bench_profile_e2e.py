"""Whole-model profiling: superexperts against the authors' method, same model, same tokens.

Model: Qwen3-30B-A3B layer shapes (hidden 2048, 128 experts of 768, top-8, 32 q / 4 kv
heads of 128) with fewer layers, random bf16 weights, and two planted Super Experts.

- ``ours``: ``superexperts.profile`` (fused experts through the profiling op, sink
  attention, massive activations): everything the toolkit reports.
- ``authors``: the experts as one ``nn.Linear`` per expert projection (as transformers 4.x
  had them; weights shared with the fused tensors, not copied), a Python loop over the hit
  experts, and a forward hook on every expert ``down_proj`` that records
  ``input[0].abs().max()`` and ``output.abs().max()`` per call into Python lists, then the
  same rule on the per-expert maxima. Attention: sdpa; no sink or massive-activation stats.
  ``--authors-row0`` records ``output[0].abs().max()`` instead, as their released hook does
  (the first routed token's row only).

Each method runs in a fresh subprocess so its peak memory (CUDA max allocated, or the
process's max RSS on CPU) is its own. Prints a table, writes JSON.

    python -m bench.bench_profile_e2e --layers 2 --tokens 512          # CPU-sized
    python -m bench.bench_profile_e2e --layers 8 --tokens 8192         # GPU
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from ._common import write_json
from ._compare import add_args, calibration_ids, compare, measure, resolve

PLANTED = [(0, 68), (1, 92)]


def build_model(layers: int, dtype: torch.dtype, device: str, seed: int = 0):
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
    )
    model = random_model(cfg, dtype, device, seed)
    with torch.no_grad():
        for layer, expert in PLANTED:
            model.model.layers[layer].mlp.experts.down_proj[expert].mul_(100.0)
    return model


def random_model(cfg, dtype: torch.dtype, device: str, seed: int = 0):
    """The causal LM of `cfg` with random weights (norms 1, the rest N(0, 1 / fan_in)), in
    eval mode; built on the meta device and filled in place, so no second copy is made."""
    import transformers

    from superexperts.streaming import materialize_buffers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    materialize_buffers(model, torch.device(device))
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            fan_in = p.shape[-1]
            for chunk in p.view(-1, fan_in).split(max(1, (1 << 22) // fan_in)):
                chunk.copy_(torch.randn(chunk.shape, generator=g) / fan_in**0.5)
    return model.eval()


class HookedExperts(nn.Module):
    """transformers-4.x-style experts: ModuleLists of nn.Linear, looped in Python."""

    def __init__(self, fused, records, row0: bool):
        super().__init__()
        self.num_experts = fused.num_experts
        self.act_fn = fused.act_fn
        inter = fused.down_proj.shape[2]
        self.gate, self.up, self.down = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for e in range(self.num_experts):
            for lst, w in ((self.gate, fused.gate_up_proj[e, :inter]), (self.up, fused.gate_up_proj[e, inter:]), (self.down, fused.down_proj[e])):
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                lin.weight = nn.Parameter(w, requires_grad=False)
                lst.append(lin)
            self.down[e].register_forward_hook(self._recorder(records, e, row0))

    @staticmethod
    def _recorder(records, expert, row0):
        def hook(module, inputs, output):
            records.setdefault(expert, []).append(
                (inputs[0].abs().max(), (output[0] if row0 else output).abs().max())
            )

        return hook

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for e in torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            pos, token = torch.where(expert_mask[e])
            x = hidden_states[token]
            y = self.down[e](self.act_fn(self.gate[e](x)) * self.up[e](x))
            out.index_add_(0, token, (y * top_k_weights[token, pos, None]).to(out.dtype))
        return out


def run_authors(model, ids, batch_size, row0):
    from superexperts.rules import detect

    per_layer = []
    for layer in model.model.layers:
        records: dict[int, list] = {}
        layer.mlp.experts = HookedExperts(layer.mlp.experts, records, row0)
        per_layer.append(records)
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        for batch in ids.split(batch_size):
            model.model(input_ids=batch.to(model.device), use_cache=False)
    candidates = [
        (layer, e, float(max(o for _, o in rows)))
        for layer, records in enumerate(per_layer)
        for e, rows in records.items()
    ]
    return detect(candidates, len(per_layer))


def run_ours(model, ids, batch_size):
    import superexperts

    result = superexperts.profile(model, ids, batch_size=batch_size, progress=False)
    return result.super_experts()


def child(args) -> dict:
    model = build_model(args.layers, getattr(torch, args.dtype), args.device)
    ids = calibration_ids(args)
    if args.method == "ours":
        return measure("ours", lambda: run_ours(model, ids, args.batch_size), args)
    name = "authors_row0" if args.authors_row0 else "authors"
    return measure(name, lambda: run_authors(model, ids, args.batch_size, args.authors_row0), args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, cuda_tokens=8192, cuda_batch=8)
    p.add_argument("--authors-row0", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    resolve(args)
    if args.method:  # child process
        print(json.dumps(child(args)))
        return
    rows = compare(__spec__.name, [("ours", []), ("authors", []), ("authors", ["--authors-row0"])], args, [])
    write_json(
        "profile_e2e",
        {"layers": args.layers, "tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
         "dtype": args.dtype, "planted": PLANTED, "results": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
