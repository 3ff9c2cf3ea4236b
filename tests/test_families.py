"""MoE families whose experts bypass transformers' ExpertsInterface (superexperts.adapters), the
families refused, and the `superexperts families` inventory of the installed transformers.
(LongCat-Flash and Step3p7 run on the ExpertsInterface from transformers 5.24 on; the same tests
hold there.)

Each adapter family: a tiny model saved as safetensors and loaded back through its Auto class;
outputs equal the family's own forward, every statistic equals a per-expert loop written here in
plain torch (independent of the adapter declarations), a planted Super Expert is found, and
pruning by skip equals zeroed weights.
"""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_models import assert_matches_oracle, build_model, model_class, oracle_profile, record_op_calls, tokens

import superexperts
from superexperts import families as fam
from superexperts.cli import main
from superexperts.integration import our_implementations
from superexperts.layers import find_layers

ROOT = Path(__file__).resolve().parents[1]
EAGER = dict(attn_implementation="eager")
ADAPTED = ["llama4", "dbrx", "longcat_flash", "jetmoe", "step3p7"]


def _through_interface(family: str) -> bool:
    """Whether the installed transformers runs `family`'s experts through its ExpertsInterface
    (LongCat-Flash and Step3p7 from transformers 5.24 on) rather than their own forward."""
    return fam.classify(family, fam.scan_family(family))[0] == fam.INTERFACE


# ----------------------------------------------------------------------------- per family, in plain torch


def _expert_weights(family: str, experts, e: int) -> list[torch.Tensor]:
    """Views of every weight of routed expert `e` (the down projection last)."""
    if family == "dbrx":
        mlp = experts.mlp
        n = experts.num_experts
        return [mlp.w1.view(n, -1, mlp.w1.shape[-1])[e], mlp.v1.view(n, -1, mlp.v1.shape[-1])[e],
                mlp.w2.view(n, -1, mlp.w2.shape[-1])[e]]
    if family == "jetmoe":
        return [experts.input_linear.weight[e], experts.output_linear.weight[e]]
    return [experts.gate_up_proj[e], experts.down_proj[e]]


def _loop(num_experts, top_k_index, run, record):
    """Call ``run(e, token_idx, slot_idx) -> (down_input, down_output)`` for every routed expert."""
    for e in range(num_experts):
        token, slot = torch.where(top_k_index == e)
        if token.numel():
            act, y = run(e, token, slot)
            record(e, token, act, y)
            yield e, token, slot, y


def _llama4(p, record):
    block = p.layer.feed_forward
    ex = block.experts

    def forward(hidden_states):
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = h @ block.router.weight.T
        top_value, top_index = torch.topk(logits, block.router.top_k, dim=1)
        score = torch.sigmoid(top_value.float()).to(h.dtype)
        out = block.shared_expert(h)

        def run(e, token, slot):
            x = h[token] * score[token, slot, None]  # the score scales the expert's input
            gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            act = up * F.silu(gate)
            return act, act @ ex.down_proj[e]

        for _, token, _, y in _loop(ex.num_experts, top_index, run, record):
            out = out.index_add(0, token, y)
        return out, logits

    return block, forward


def _top_k_family(family):
    def oracle(p, record):
        ex = p.experts

        def forward(hidden_states, top_k_index, top_k_weights):
            h = hidden_states.reshape(-1, hidden_states.shape[-1])
            out = torch.zeros_like(h)
            routed = getattr(ex, "num_routed_experts", ex.num_experts)
            # A slot of weight 0 adds nothing: LongCat-Flash on the ExpertsInterface sends its identity
            # experts' slots to real experts with weight 0.
            top_k_index = torch.where(top_k_weights == 0, -1, top_k_index)

            def run(e, token, slot):
                x = h[token]
                if family == "dbrx":
                    w1, v1, w2 = _expert_weights(family, ex, e)
                    act = F.silu(x @ w1.T) * (x @ v1.T)
                    return act, act @ w2
                gate, up = (x @ ex.gate_up_proj[e].T).chunk(2, dim=-1)
                if family == "step3p7" and ex.limit is not None:
                    act = F.silu(gate).clamp(max=ex.limit) * up.clamp(min=-ex.limit, max=ex.limit)
                else:
                    act = F.silu(gate) * up
                return act, act @ ex.down_proj[e].T

            for _, token, slot, y in _loop(routed, top_k_index, run, record):
                out.index_add_(0, token, y * top_k_weights[token, slot, None])
            if hasattr(ex, "total_experts"):  # LongCat's identity experts in its own forward: output = input
                for e in range(routed, ex.total_experts):
                    token, slot = torch.where(top_k_index == e)
                    out.index_add_(0, token, h[token] * top_k_weights[token, slot, None])
            return out.to(hidden_states.dtype).reshape(hidden_states.shape)

        return ex, forward

    return oracle


def _jetmoe(p, record):
    block = p.layer.mlp

    def forward(layer_input):
        x = layer_input.reshape(-1, layer_input.shape[-1])
        logits = (x @ block.router.layer.weight.T).float()
        top_value, top_index = logits.topk(block.router.top_k, dim=1)
        gates = torch.softmax(top_value, dim=1).type_as(x)
        out = torch.zeros_like(x)

        def run(e, token, slot):
            a, b = (x[token] @ block.input_linear.weight[e].T).chunk(2, dim=-1)
            act = F.silu(a) * b
            return act, act @ block.output_linear.weight[e].T

        for _, token, slot, y in _loop(block.input_linear.num_experts, top_index, run, record):
            out.index_add_(0, token, y * gates[token, slot, None])
        return out.view(layer_input.shape) + block.bias

    return block, forward


ORACLES = {"llama4": _llama4, "dbrx": _top_k_family("dbrx"), "longcat_flash": _top_k_family("longcat_flash"),
           "jetmoe": _jetmoe, "step3p7": _top_k_family("step3p7")}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=ADAPTED)
def saved(request, tmp_path_factory):
    """(family, checkpoint dir) of a tiny random model of each adapter family."""
    superexperts.register()
    path = tmp_path_factory.mktemp(request.param)
    build_model(request.param).save_pretrained(path)
    assert any(path.glob("*.safetensors"))
    return request.param, path


def _load(family, path, **kwargs):
    return model_class(family).from_pretrained(path, **{**EAGER, **kwargs}).eval()


def test_discovery_and_structure(saved):
    family, path = saved
    model = _load(family, path)
    parts = find_layers(model)
    moe = [p for p in parts if p.is_moe]
    interface = _through_interface(family)
    assert moe and all(p.adapter is None if interface else p.adapter.family == family for p in moe)
    assert all(len(p.attention) == (2 if family == "longcat_flash" else 1) for p in parts)
    structure = superexperts.integration.describe_model(model, parts)["structure"]
    assert structure["routed_experts"]["runs_through"] == ("ExpertsInterface" if interface else f"adapter {family}")
    assert structure["routed_experts"]["routing_weight"] == ("input" if family == "llama4" else "output")
    if family == "longcat_flash":  # num_hidden_layers counts the two attention sublayers of each layer
        assert model.config.num_hidden_layers == 2 * len(parts) == 4
        assert structure["config_layer_counts"] == {"num_hidden_layers": 4, "num_layers": 2}
        assert "counts attention sublayers" in structure["notes"][1]
    if family == "step3p7":
        assert structure["decoder_layers"] == "model.language_model.layers"
        assert [p.is_moe for p in parts] == [False, True, True] and parts[0].dense and parts[1].shared


def test_outputs_equal_eager_through_the_op(saved, monkeypatch):
    """Inside our implementations each MoE layer runs its up GEMM(s) without statistics and its
    down_proj with them, never asking the op to read offsets back; the logits equal the family's
    own forward."""
    family, path = saved
    model = _load(family, path)
    ids = tokens(2, 12)
    calls = record_op_calls(monkeypatch)
    with torch.no_grad():
        eager = model(ids).logits
        assert calls == []
        with our_implementations(model):
            ours = model(ids).logits
        again = model(ids).logits
    parts = [p for p in find_layers(model) if p.is_moe]
    ups = 1 if parts[0].adapter is None else len(parts[0].adapter.up)
    assert calls == ([(False, False)] * ups + [(True, False)]) * len(parts)
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)  # the family's forward is back


def test_stats_equal_brute_force(saved):
    family, path = saved
    ids = tokens(3, 16, seed=4)  # no sequence starts with a repeated token: its two hidden states would tie
    result = superexperts.profile(_load(family, path), ids, progress=False)
    want = oracle_profile(_load(family, path), ids, routed_forward=ORACLES[family],
                          attentions_per_layer=2 if family == "longcat_flash" else 1)

    assert want["routed"]
    assert_matches_oracle(result, want, ids)


def test_planted_super_expert_found(saved, tmp_path):
    family, path = saved
    ids = tokens(3, 16, seed=2)
    model = _load(family, path)
    before = superexperts.profile(model, ids, progress=False)
    layer = before.layer_kinds.index("moe")
    expert = int(torch.argmax(before.routed[layer].rows))  # an expert that certainly sees tokens
    with torch.no_grad():
        _expert_weights(family, find_layers(model)[layer].experts, expert)[-1].mul_(300.0)
    model.save_pretrained(tmp_path / "planted")
    result = superexperts.profile(_load(family, tmp_path / "planted"), ids, progress=False)
    assert [(se.layer, se.expert) for se in result.super_experts()] == [(layer, expert)]


def test_pruning_by_skipping_equals_zeroed_weights(saved):
    family, path = saved
    ids = tokens(2, 12, seed=3)
    model = _load(family, path)
    moe = [p for p in find_layers(model) if p.is_moe]
    rows = superexperts.profile(model, ids, progress=False).routed
    targets = [(p.index, int(torch.argmax(rows[p.index].rows))) for p in (moe[0], moe[-1])]  # experts that see tokens
    if moe[0].shared:
        targets.append((moe[0].index, "shared"))
    with torch.no_grad():
        original = model(ids).logits
        with superexperts.prune_experts(model, targets):
            skipped = model(ids).logits
        restored = model(ids).logits

    zeroed = _load(family, path)
    zparts = find_layers(zeroed)
    with torch.no_grad():
        for layer, expert in targets:
            if expert == "shared":
                zparts[layer].shared[0][1].weight.zero_()
            else:
                for w in _expert_weights(family, zparts[layer].experts, expert):
                    w.zero_()
        reference = zeroed(ids).logits
    assert not torch.allclose(skipped, original, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(skipped, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restored, original, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama4", "longcat_flash", "jetmoe", "dbrx", "step3p7"])
def test_streaming_equals_in_memory(family, tmp_path):
    """Layer streaming finds the same layers and runs the adapter, one layer resident at a time
    (DBRX: its checkpoint names the layers ``transformer.blocks.N``; Step3p7: an
    image-text-to-text class)."""
    from superexperts.streaming import StreamStats, stream_profile

    superexperts.register()
    model = build_model(family)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    ids = tokens(2, 12, seed=4)
    memory = StreamStats()
    streamed = stream_profile(tmp_path, ids, dtype="float32", progress=False, memory=memory)
    in_memory = superexperts.profile(model, ids, progress=False)
    a, b = streamed.tensors(), in_memory.tensors()
    assert set(a) == set(b) and any(k.startswith("routed.") for k in a)
    for key in a:  # GEMMs on differently laid out inputs may differ in the last bit
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert streamed.structure == in_memory.structure
    assert memory.peak_param_bytes < sum(p.numel() * p.element_size() for p in model.parameters())


def test_expert_parallel_is_refused_for_adapter_families_before_loading(tmp_path, monkeypatch):
    """An adapter cannot hold a share of a layer's experts: `--parallel expert` on such a family
    is refused, naming the way that works, before any layer is read."""
    from superexperts import distributed, loading
    from superexperts.streaming import stream_profile

    superexperts.register()
    build_model("jetmoe").save_pretrained(tmp_path)
    monkeypatch.setattr(distributed, "init", lambda mode, device, timeout_s: distributed.Parallel(mode, 0, 2))
    monkeypatch.setattr(loading.LayerLoader, "load_layer", lambda *a, **k: pytest.fail("a layer was read"))
    with pytest.raises(ValueError, match=r"--parallel expert: .*adapter.*use --parallel data"):
        stream_profile(tmp_path, tokens(2, 12), dtype="float32", parallel="expert", progress=False)


def test_longcat_identity_experts_are_not_prunable(tmp_path):
    model = build_model("longcat_flash")
    with pytest.raises(ValueError, match=r"expert 8 does not exist in layer 0 \(8 routed experts\)"):
        superexperts.prune_experts(model, [(0, 8)])


# ----------------------------------------------------------------------------- refused families


def _switch():
    cfg = transformers.SwitchTransformersConfig(vocab_size=96, d_model=16, d_kv=4, d_ff=16, num_layers=2,
                                                num_decoder_layers=2, num_heads=2, num_experts=4, num_sparse_encoder_layers=1,
                                                num_sparse_decoder_layers=1)
    return transformers.AutoModelForSeq2SeqLM.from_config(cfg)


def _nllb_moe():
    cfg = transformers.NllbMoeConfig(vocab_size=96, d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
                                     num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1)
    return transformers.AutoModelForSeq2SeqLM.from_config(cfg)


@pytest.mark.parametrize("build, family", [(_switch, "switch_transformers"), (_nllb_moe, "nllb_moe")])
def test_encoder_decoder_families_are_refused_with_the_reason(build, family, tmp_path, capsys):
    model = build()
    with pytest.raises(ValueError, match=rf"\({family}\) is not supported: encoder-decoder model"):
        superexperts.profile(model, tokens(1, 8), progress=False)
    model.save_pretrained(tmp_path)
    assert main(["profile", "--model", str(tmp_path), "--calib", str(tmp_path / "config.json")]) == 2
    assert f"({family}) is not supported: encoder-decoder model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the inventory


def test_every_moe_family_of_the_installed_transformers_is_classified():
    rows = fam.families()
    assert fam.unclassified() == []
    state = {f.model_type: f.state for f in rows}
    for model_type in ("llama4", "llama4_text", "dbrx", "jetmoe"):
        assert state[model_type] == fam.ADAPTER
    for model_type in ("longcat_flash", "step3p7"):
        assert state[model_type] == (fam.INTERFACE if _through_interface(model_type) else fam.ADAPTER)
    for model_type in ("nllb-moe", "switch_transformers", "doge"):
        assert state[model_type] == fam.REFUSED
    for model_type in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe"):
        assert state[model_type] == fam.INTERFACE
    # The flagged-by-grep families that hold no routed MoE experts (Bamba: num_experts is fixed
    # to 1; Cosmos3: modality experts, not routed) are not listed; vision sub-configs neither.
    for model_type in ("bamba", "cosmos3_omni", "cosmos3_edge", "seamless_m4t", "llama4_vision_model"):
        assert model_type not in state
    assert set(fam.supported_model_types()) >= {"llama4_text", "dbrx", "qwen3_moe"}


def test_one_model_types_check_agrees_with_the_inventory():
    """`is_supported` (what loading checks, reading one family's files) supports exactly the
    families the inventory (every models folder scanned) lists as ExpertsInterface or adapter."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    listed = {f.family for f in fam.families() if f.state in (fam.INTERFACE, fam.ADAPTER)}
    assert {model_type_to_module_name(t) for t in fam.supported_model_types()} == listed
    assert all(fam.is_supported(f.model_type) == (f.family in listed) for f in fam.families())
    assert not fam.is_supported("no_such_model")


def test_a_new_moe_family_is_unclassified():
    """What a transformers upgrade adding a family would look like: found, and in no state."""
    source = (
        "class FooExperts(nn.Module):\n    def __init__(self):\n        self.down = None\n"
        "class FooBlock(nn.Module):\n    def __init__(self, config):\n        self.num_experts = 4\n"
    )
    scan = fam.scan_source(source)
    assert scan.moe == ("FooExperts", "FooBlock") and scan.decorated == ()
    assert fam.classify("foo", scan)[0] == fam.UNCLASSIFIED
    decorated = fam.scan_source("@use_experts_implementation\nclass FooExperts(nn.Module):\n    pass\n")
    assert fam.classify("foo", decorated) == (fam.INTERFACE, "FooExperts")
    # An adapter whose class this transformers lacks is no support either.
    assert fam.classify("llama4", fam.scan_source("class Llama4Other(nn.Module):\n    pass\n"))[0] == fam.UNCLASSIFIED
    assert fam.scan_source("class Dense(nn.Module):\n    def __init__(self):\n        self.w = 1\n").moe == ()


def test_families_cli(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^llama4_text +supported: adapter +Llama4TextExperts: down_proj is down_proj \[E, in, out\]; "
                     r"the routing weight scales the expert's input", out, re.M)
    assert re.search(r"^switch_transformers +refused +encoder-decoder model", out, re.M)
    assert re.search(r"^qwen3_moe +supported: ExpertsInterface +Qwen3MoeExperts$", out, re.M)
    assert f"transformers {transformers.__version__}: " in out


def test_readme_table_is_the_installed_transformers_one():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Supported model families", 1)[1].split("\n## ", 1)[0]
    version = re.search(r"transformers (\d+\.\d+\.\d+)", section).group(1)
    if version != transformers.__version__:
        pytest.skip(f"README's table is for transformers {version}, {transformers.__version__} is installed")
    table = fam.format_table(fam.families(), markdown=True)
    assert table in section
