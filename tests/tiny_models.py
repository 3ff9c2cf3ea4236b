"""Tiny real transformers MoE models for integration tests, and a brute-force oracle.

Models are built from configs, given deterministic random weights, saved with
`save_pretrained` (safetensors) and loaded back through `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

VOCAB = 96


def config_for(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=256)
    if family == "qwen3_moe":
        cfg = dict(intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=2,
                   head_dim=8, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)
        cls = transformers.Qwen3MoeConfig
    elif family == "mixtral":
        cfg = dict(intermediate_size=16, num_hidden_layers=3, num_key_value_heads=2, num_local_experts=8,
                   num_experts_per_tok=2, sliding_window=None)
        cls = transformers.MixtralConfig
    elif family == "deepseek_v3":
        cfg = dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4,
                   n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
                   n_group=4, topk_group=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                   qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=1.5)
        cls = transformers.DeepseekV3Config
    elif family == "gpt_oss":
        cfg = dict(intermediate_size=16, num_hidden_layers=3, num_key_value_heads=2, head_dim=8, num_local_experts=8,
                   num_experts_per_tok=2, sliding_window=6,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        cls = transformers.GptOssConfig
    elif family == "qwen2_moe":
        cfg = dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                   num_hidden_layers=3, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)
        cls = transformers.Qwen2MoeConfig
    elif family == "olmoe":
        cfg = dict(intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4, num_experts=8,
                   num_experts_per_tok=2)
        cls = transformers.OlmoeConfig
    elif family == "qwen3_next":  # hybrid: gated-delta-net (linear) and full attention layers
        cfg = dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                   num_hidden_layers=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
                   layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                   linear_conv_kernel_dim=4)
        cls = transformers.Qwen3NextConfig
    # Families whose experts bypass the ExpertsInterface (superexperts.adapters).
    elif family == "llama4":
        cfg = dict(intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=3, num_key_value_heads=2,
                   head_dim=8, num_local_experts=8, num_experts_per_tok=2, moe_layers=[0, 2])
        cls = transformers.Llama4TextConfig
    elif family == "dbrx":
        # transformers 5.23's DBRX reads attn_config.rope_theta (not a declared field) and calls
        # clamp(None, None) when clip_qkv is unset: real DBRX configs set both.
        return transformers.DbrxConfig(**{
            **dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=3, max_seq_len=256,
                   attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                   ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2)),
            **overrides,
        })
    elif family == "longcat_flash":
        cfg = dict(num_layers=2, num_key_value_heads=4, ffn_hidden_size=48, q_lora_rank=16, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=3, n_routed_experts=8,
                   zero_expert_num=2, expert_ffn_hidden_size=16)
        cls = transformers.LongcatFlashConfig
    elif family == "jetmoe":
        cfg = dict(num_hidden_layers=3, num_key_value_heads=2, kv_channels=8, intermediate_size=16,
                   num_local_experts=8, num_experts_per_tok=2)
        cls = transformers.JetMoeConfig
    elif family == "step3p7":
        from transformers.models.step3p7.configuration_step3p7 import Step3p7Config

        text = dict(**common, intermediate_size=48, num_hidden_layers=3, num_key_value_heads=2, head_dim=8,
                    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, share_expert_dim=16,
                    sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    mlp_layer_types=["dense", "sparse", "sparse"], swiglu_limits=[0.0, 0.0, 0.05])
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        return Step3p7Config(text_config={**text, **overrides}, vision_config=vision)
    else:
        raise ValueError(family)
    return cls(**{**common, **cfg, **overrides})


def model_class(family: str):
    """The Auto class that loads `family` (Step3p7 has only a vision-language head)."""
    return transformers.AutoModelForImageTextToText if family == "step3p7" else transformers.AutoModelForCausalLM


FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def build_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialized tiny model in fp32, eval mode. Every parameter gets a
    deterministic N(0, 0.1) (biases, router bias and learned sinks included)."""
    torch.manual_seed(seed)
    model = model_class(family).from_config(config_for(family, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def experts_module(model, layer: int):
    from superexperts.layers import find_layers

    return find_layers(model)[layer].experts


def plant(model, layer: int, expert: int | str, scale: float = 300.0) -> None:
    """Scale one expert's down_proj so its outputs are `scale` times larger."""
    from superexperts.layers import find_layers

    parts = find_layers(model)[layer]
    with torch.no_grad():
        if isinstance(expert, str):
            parts.shared[0][1].weight.mul_(scale)
        else:
            parts.experts.down_proj[expert].mul_(scale)
            if getattr(parts.experts, "down_proj_bias", None) is not None:
                parts.experts.down_proj_bias[expert].mul_(scale)


def save_and_load(model, path: Path, **load_kwargs):
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file() or any(path.glob("*.safetensors"))
    loaded = type(model).from_pretrained(path, **load_kwargs)
    return loaded.eval()


OURS = dict(experts_implementation="superexperts", attn_implementation="superexperts_sink")
EAGER = dict(experts_implementation="eager", attn_implementation="eager")


def saved_family(family: str, tmp_path_factory) -> tuple[str, Path]:
    """(family, checkpoint dir) of a tiny random model of `family`, saved as safetensors (for
    module-scoped fixtures; registers our implementations first)."""
    import superexperts

    superexperts.register()
    path = tmp_path_factory.mktemp(family)
    build_model(family).save_pretrained(path)
    return family, path


def load_saved(path: Path, impl: dict) -> nn.Module:
    """The checkpoint at `path` through transformers' loading, with the implementations `impl`."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, **impl).eval()


def tokens(num: int = 4, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (num, seq_len), generator=g)


# ----------------------------------------------------------------------------- oracle


def _per_expert_forward(module, hidden_states, top_k_index, top_k_weights, record):
    """The experts loop written out per expert (like transformers' eager path), recording
    each expert's down_proj output before the routing weight."""
    out = torch.zeros_like(hidden_states)
    for e in range(module.num_experts):
        pos, token = torch.where(top_k_index.T == e)
        if token.numel() == 0:
            continue
        x = hidden_states[token]
        w_up = module.gate_up_proj[e] if module.has_gate else module.up_proj[e]
        up = x @ w_up if module.is_transposed else x @ w_up.T
        if module.has_bias:
            up = up + (module.gate_up_proj_bias[e] if module.has_gate else module.up_proj_bias[e])
        act = module._apply_gate(up) if module.has_gate else module.act_fn(up)
        down = act @ module.down_proj[e] if module.is_transposed else act @ module.down_proj[e].T
        if module.has_bias:
            down = down + module.down_proj_bias[e]
        record(e, token, act, down)
        out.index_add_(0, token, down * top_k_weights[token, pos, None])
    return out


def oracle_profile(model, ids: torch.Tensor, num_sink_tokens: int = 1, *, routed_forward=None,
                   attentions_per_layer: int = 1) -> dict:
    """Brute-force statistics of `model` (loaded with eager attention) on ``ids [N, L]``,
    one sequence at a time. Locations are global token ids ``n * L + position``.

    routed_forward(parts, record) -> (module, forward): the per-expert loop that replaces a
    module's forward in MoE layer `parts`, calling ``record(expert, token_idx, down_input,
    down_output)``; default: the loop of transformers' fused experts. attentions_per_layer:
    attention modules per decoder layer (their heads are concatenated per layer)."""
    from superexperts.layers import find_layers

    parts = find_layers(model)
    seq_len = ids.shape[1]
    found: dict = {"routed": {}, "shared": {}, "dense": {}, "hidden": {}, "sink": {}}

    def keep(table, key, value, token, channel, in_max, rows):
        old = table.get(key)
        if old is None:
            table[key] = [value, token, channel, in_max, rows]
            return
        if value > old[0]:
            old[0], old[1], old[2] = value, token, channel
        old[3] = max(old[3], in_max)
        old[4] += rows

    originals = {}
    handles = []
    offset = [0]
    for p in parts:
        if p.is_moe:

            def record(e, token, act, down, layer=p.index):
                a = down.abs()
                flat = int(a.argmax())
                keep(found["routed"], (layer, e), float(a.view(-1)[flat]),
                     offset[0] + int(token[flat // a.shape[1]]), flat % a.shape[1], float(act.abs().max()), token.numel())

            if routed_forward is None:
                module = p.experts

                def fwd(hidden_states, top_k_index, top_k_weights, module=module, record=record):
                    return _per_expert_forward(module, hidden_states, top_k_index, top_k_weights, record)
            else:
                module, fwd = routed_forward(p, record)
            originals[module] = module.forward
            module.forward = fwd
        for kind, units in (("shared", p.shared), ("dense", p.dense)):
            for i, (_, down) in enumerate(units):

                def hook(m, inputs, output, kind=kind, key=(p.index, i)):
                    a = output.reshape(-1, output.shape[-1]).abs()
                    flat = int(a.argmax())
                    keep(found[kind], key, float(a.view(-1)[flat]), offset[0] + flat // a.shape[1], flat % a.shape[1],
                         float(inputs[0].abs().max()), a.shape[0])

                handles.append(down.register_forward_hook(hook))

        # output_hidden_states gives the last layer after the final norm, so hook the layers.
        def layer_hook(m, inputs, output, layer=p.index):
            h = output[0] if isinstance(output, tuple) else output
            a = h[0].abs()
            flat = int(a.argmax())
            keep(found["hidden"], layer, float(a.view(-1)[flat]), offset[0] + flat // a.shape[1], flat % a.shape[1], 0.0, 0)

        handles.append(p.layer.register_forward_hook(layer_hook))
    sink_sum: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for n in range(ids.shape[0]):
                offset[0] = n * seq_len
                out = model(ids[n : n + 1], output_attentions=True, use_cache=False)
                masses = [att[0, :, 1:, :num_sink_tokens].sum(-1).double().sum(-1) for att in out.attentions]
                for layer in range(len(masses) // attentions_per_layer):
                    group = masses[layer * attentions_per_layer : (layer + 1) * attentions_per_layer]
                    sink_sum[layer] = sink_sum.get(layer, 0) + torch.cat(group)
    finally:
        for module, f in originals.items():
            module.forward = f
        for h in handles:
            h.remove()
    count = ids.shape[0] * (seq_len - 1)
    found["sink"] = {layer: s / count for layer, s in sink_sum.items()}
    return found


def assert_matches_oracle(result, want: dict, ids: torch.Tensor) -> None:
    """Every statistic of a `ProfileResult` on ``ids`` equals `oracle_profile`'s."""
    got_routed = {(u["layer"], u["expert"]): u for u in result.units() if u["kind"] == "routed" and u["rows"]}
    assert set(got_routed) == set(want["routed"])
    for key, (value, token, channel, in_max, rows) in want["routed"].items():
        u = got_routed[key]
        assert u["rows"] == rows
        assert u["output_max"] == pytest.approx(value, rel=1e-5)
        assert u["input_max"] == pytest.approx(in_max, rel=1e-5)
        assert (u["sample"] * ids.shape[1] + u["position"], u["channel"]) == (token, channel)
    for kind in ("shared", "dense"):
        got = {(u["layer"], int(str(u["expert"]).split(":")[1]) if ":" in str(u["expert"]) else 0): u
               for u in result.units() if u["kind"] == kind}
        assert set(got) == set(want[kind])
        for key, (value, token, channel, in_max, rows) in want[kind].items():
            u = got[key]
            assert u["output_max"] == pytest.approx(value, rel=1e-5)
            assert u["input_max"] == pytest.approx(in_max, rel=1e-5)
            assert (u["sample"] * ids.shape[1] + u["position"], u["channel"], u["rows"]) == (token, channel, rows)
    for row in result.massive_activations():
        value, token, channel, _, _ = want["hidden"][row["layer"]]
        assert row["max"] == pytest.approx(value, rel=1e-5)
        assert (row["top"][0]["sample"] * ids.shape[1] + row["position"], row["channel"]) == (token, channel)
    sink = result.sink_mass()
    assert set(sink) == set(want["sink"])
    for layer, mass in want["sink"].items():
        torch.testing.assert_close(sink[layer], mass, rtol=1e-5, atol=1e-6)


def record_op_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """``(with_stats, check_offsets)`` of every call the experts make to the op from now on."""
    from superexperts import experts

    calls = []
    op = experts.moe_down_proj_profile

    def recording(*args, **kwargs):
        calls.append((kwargs["with_stats"], kwargs["check_offsets"]))
        return op(*args, **kwargs)

    monkeypatch.setattr(experts, "moe_down_proj_profile", recording)
    return calls


def force_unrouted(model, experts: dict[int, list[int]], channel: int = 0, carrier: float = 1.0, weight: float = 50.0) -> None:
    """Make ``experts[layer]`` never chosen by the router: every token embedding carries
    `carrier` in `channel`, which nothing reads (its input columns in every linear layer,
    fused expert and router are zeroed) except those experts' router rows, set to ``-weight``
    there (a router logit of about ``-weight * 5`` after the RMSNorm)."""
    from superexperts.layers import find_layers

    parts = {p.index: p for p in find_layers(model)}
    hidden = model.get_input_embeddings().weight.shape[1]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, channel] = carrier
        for p in parts.values():
            for m in p.layer.modules():
                if isinstance(m, nn.Linear) and m.in_features == hidden:
                    m.weight[:, channel] = 0.0
            if p.is_moe:
                up = p.experts.gate_up_proj if p.experts.has_gate else p.experts.up_proj
                up[..., channel] = 0.0
                p.layer.get_submodule(p.experts_name.rpartition(".")[0]).gate.weight[:, channel] = 0.0
        for layer, ids in experts.items():
            p = parts[layer]
            router = p.layer.get_submodule(p.experts_name.rpartition(".")[0]).gate.weight
            router[ids] = 0.0
            router[ids, channel] = -weight
