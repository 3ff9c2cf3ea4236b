"""The toolkit on real transformers model classes, saved as safetensors and loaded back."""

import pytest
import torch
import transformers
from tiny_models import FAMILIES, assert_matches_oracle, build_model, oracle_profile, plant, record_op_calls, save_and_load, tokens

import superexperts
from superexperts.layers import find_layers

OURS = dict(experts_implementation="superexperts", attn_implementation="superexperts_sink")
EAGER = dict(experts_implementation="eager", attn_implementation="eager")


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, checkpoint dir) of a tiny random model of each family."""
    superexperts.register()
    path = tmp_path_factory.mktemp(request.param)
    build_model(request.param).save_pretrained(path)
    return request.param, path


def _load(path, impl):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **impl).eval()


def test_outputs_equal_eager(saved):
    family, path = saved
    ids = tokens(2, 20)
    with torch.no_grad():
        ours = _load(path, OURS)(ids).logits
        eager = _load(path, EAGER)(ids).logits
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-4)


def test_stats_equal_brute_force(saved):
    family, path = saved
    ids = tokens(3, 20, seed=1)
    result = superexperts.profile(_load(path, OURS), ids, progress=False)
    want = oracle_profile(_load(path, EAGER), ids)

    assert_matches_oracle(result, want, ids)


def test_planted_super_expert_found_exactly(saved, tmp_path):
    family, path = saved
    ids = tokens(4, 24, seed=2)
    model = _load(path, OURS)
    before = superexperts.profile(model, ids, progress=False)
    moe_layers = [i for i, kind in enumerate(before.layer_kinds) if kind == "moe"]
    layer = moe_layers[0]
    rows = before.routed[layer].rows
    expert = int(torch.argmax(rows))  # an expert that certainly sees tokens
    plant(model, layer, expert)
    planted = save_and_load(model, tmp_path / "planted", **OURS)
    result = superexperts.profile(planted, ids, progress=False)
    found = [(se.layer, se.expert) for se in result.super_experts()]
    assert found == [(layer, expert)]


def test_shared_expert_can_be_a_super_expert(tmp_path):
    superexperts.register()
    model = build_model("deepseek_v3")
    plant(model, 1, "shared", scale=500.0)
    loaded = save_and_load(model, tmp_path / "m", **OURS)
    result = superexperts.profile(loaded, tokens(3, 20), progress=False)
    assert [(se.layer, se.expert) for se in result.super_experts()] == [(1, "shared")]
    assert result.layer_kinds == ["dense", "moe", "moe"]
    assert any(u["kind"] == "dense" and u["layer"] == 0 for u in result.units())


def test_pruning_by_skipping_equals_zeroed_weights(saved):
    family, path = saved
    ids = tokens(2, 20, seed=3)
    model = _load(path, OURS)
    parts = find_layers(model)
    moe = [p for p in parts if p.is_moe]
    targets = [(moe[0].index, 1), (moe[-1].index, 0)]
    if moe[0].shared:
        targets.append((moe[0].index, "shared"))
    with torch.no_grad(), superexperts.prune_experts(model, targets):
        skipped = model(ids).logits

    zeroed = _load(path, EAGER)
    zparts = find_layers(zeroed)
    with torch.no_grad():
        for layer, expert in targets:
            p = zparts[layer]
            if expert == "shared":
                p.shared[0][1].weight.zero_()
                continue
            for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
                t = getattr(p.experts, name, None)
                if isinstance(t, torch.Tensor):
                    t[expert].zero_()
        reference = zeroed(ids).logits
    torch.testing.assert_close(skipped, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        restored = model(ids).logits
        original = _load(path, EAGER)(ids).logits
    torch.testing.assert_close(restored, original, rtol=1e-4, atol=1e-4)


def test_user_loaded_model_keeps_its_implementations(saved):
    family, path = saved
    model = _load(path, dict(experts_implementation="batched_mm", attn_implementation="eager"))
    superexperts.profile(model, tokens(1, 12), progress=False)
    assert model.config._experts_implementation == "batched_mm"
    assert model.config._attn_implementation == "eager"


def test_stats_memory_does_not_grow_with_batches(saved):
    family, path = saved
    model = _load(path, OURS)
    from superexperts.collector import StatsCollector
    from superexperts.integration import our_implementations, run_batches

    sizes = []
    for n in (2, 6):
        stats = StatsCollector()
        with our_implementations(model):
            run_batches(model, tokens(n, 16), stats, batch_size=1, progress=False)
        sizes.append(sum(t.numel() for t in stats.flat_tensors().values()))
    assert sizes[0] == sizes[1]


def test_experts_call_the_op_without_host_reads_and_gate_up_without_stats(saved, monkeypatch):
    """Per MoE layer call: gate_up with with_stats=False, down_proj with stats; neither asks the
    op to read `offsets` back (the integration builds them from counts)."""
    family, path = saved
    calls = record_op_calls(monkeypatch)
    model = _load(path, OURS)
    moe_layers = sum(p.is_moe for p in find_layers(model))
    with torch.no_grad():
        model(tokens(1, 9))
    assert calls == [(False, False), (True, False)] * moe_layers


def test_several_super_experts_in_a_large_pool(tmp_path):
    """With ~3 x 128 candidates the paper's P99.5 admits two planted experts (with n routed
    candidates, P99.5 falls below the second largest only when n > 201)."""
    superexperts.register()
    model = build_model("qwen3_moe", num_hidden_layers=4, num_experts=128, num_experts_per_tok=8)
    ids = tokens(8, 64, seed=5)
    before = superexperts.profile(model, ids, progress=False)
    assert len(before.candidates()) > 300
    plant(model, 0, 17)
    plant(model, 2, 101, scale=150.0)
    loaded = save_and_load(model, tmp_path / "m", **OURS)
    result = superexperts.profile(loaded, ids, progress=False)
    assert [(se.layer, se.expert) for se in result.super_experts()] == [(0, 17), (2, 101)]
