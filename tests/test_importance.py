"""Expert importance sums (routing weight, g * ||y||, top-1) against a per-token oracle."""

import json

import pytest
import torch
from tiny_models import EAGER, OURS, build_model, load_saved, plant, saved_family, tokens

import superexperts
from superexperts.importance import CRITERIA, ranking, scores
from superexperts.layers import find_layers
from superexperts.result import ProfileResult

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, checkpoint dir) of a tiny random model of each family."""
    return saved_family(request.param, tmp_path_factory)


def importance_oracle(model, ids):
    """Per (layer, expert): [rows, sum g, sum g * ||y||_2, top-1 tokens], one token and one
    slot at a time in fp64; shared experts (layer, "shared") with g = 1, or sigmoid of the
    Qwen2-MoE shared_expert_gate computed here from the MoE block's input."""
    found: dict = {}
    originals, handles = {}, []

    def add(key, g, y, top1=0):
        entry = found.setdefault(key, [0, 0.0, 0.0, 0])
        entry[0] += 1
        entry[1] += float(g)
        entry[2] += float(g) * float(torch.linalg.vector_norm(y.double()))
        entry[3] += top1

    for p in find_layers(model):
        if p.is_moe:
            module = p.experts

            def fwd(hidden, top_k_index, top_k_weights, module=module, layer=p.index):
                out = torch.zeros_like(hidden)
                for t in range(hidden.shape[0]):
                    first = int(torch.argmax(top_k_weights[t]))
                    for slot in range(top_k_index.shape[1]):
                        e = int(top_k_index[t, slot])
                        x = hidden[t : t + 1]
                        up = x @ module.gate_up_proj[e].T if module.has_gate else x @ module.up_proj[e].T
                        y = (module._apply_gate(up) if module.has_gate else module.act_fn(up)) @ module.down_proj[e].T
                        add((layer, e), top_k_weights[t, slot], y[0], top1=int(slot == first))
                        out[t] += top_k_weights[t, slot] * y[0]
                return out

            originals[module] = module.forward
            module.forward = fwd
        for name, down in p.shared:
            block = p.layer.get_submodule(name.rsplit(".", 1)[0])
            gate = getattr(block, "shared_expert_gate", None)
            block_input: dict = {}
            handles.append(block.register_forward_pre_hook(lambda m, inputs, store=block_input: store.update(h=inputs[0])))

            def hook(m, inputs, output, layer=p.index, gate=gate, store=block_input):
                y = output.reshape(-1, output.shape[-1])
                g = torch.ones(y.shape[0]) if gate is None else torch.sigmoid(store["h"].reshape(-1, y.shape[1]) @ gate.weight[0])
                for t in range(y.shape[0]):
                    add((layer, "shared"), g[t], y[t])

            handles.append(down.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for module, f in originals.items():
            module.forward = f
        for h in handles:
            h.remove()
    return found


def test_importance_sums_equal_oracle(saved):
    family, path = saved
    ids = tokens(2, 12, seed=3)
    result = superexperts.profile(load_saved(path, OURS), ids, batch_size=2, progress=False)
    want = importance_oracle(load_saved(path, EAGER), ids)

    units = {(u["layer"], u["expert"]): u for u in result.units() if u["kind"] in ("routed", "shared")}
    routed_keys = {k for k in units if units[k]["kind"] == "routed" and units[k]["rows"]}
    assert routed_keys == {k for k in want if k[1] != "shared"}
    assert {k for k in units if units[k]["kind"] == "shared"} == {k for k in want if k[1] == "shared"}
    for key, (rows, weight, norm, top1) in want.items():
        u = units[key]
        assert (u["rows"], u["top1"]) == (rows, top1), key
        assert u["weight_sum"] == pytest.approx(weight, rel=1e-5), key
        assert u["norm_sum"] == pytest.approx(norm, rel=1e-5), key
        assert u["reap"] == pytest.approx(norm / rows, rel=1e-5), key
    # Each token has exactly one top-1 expert per MoE layer.
    for layer, s in result.routed.items():
        assert int(s.top1.sum()) == ids.numel()
    if family == "qwen2_moe":  # the gate is used: the sum of g is not the token count
        shared = [u for u in units.values() if u["kind"] == "shared"]
        assert all(0 < u["weight_sum"] < u["rows"] for u in shared)


def test_sums_merge_over_batches(saved):
    """Batch by batch or all at once: the same counts, and sums within fp32 rounding of a call."""
    _, path = saved
    ids = tokens(4, 10, seed=4)
    model = load_saved(path, OURS)
    one = superexperts.profile(model, ids, batch_size=4, progress=False)
    many = superexperts.profile(model, ids, batch_size=1, progress=False)
    for layer, s in one.routed.items():
        t = many.routed[layer]
        assert torch.equal(s.rows, t.rows) and torch.equal(s.top1, t.top1)
        torch.testing.assert_close(s.weight_sum, t.weight_sum, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.norm_sum, t.norm_sum, rtol=1e-6, atol=1e-6)


def test_ranking_and_saved_sums(tmp_path):
    """importance() ranks each layer's experts; a planted expert (outputs x300) leads under
    reap and ean; report.json and stats.safetensors hold the raw sums."""
    superexperts.register()
    model = build_model("qwen3_moe")
    ids = tokens(4, 16, seed=5)
    base = superexperts.profile(model, ids, progress=False)
    expert = int(torch.argmax(base.routed[1].rows))
    plant(model, 1, expert)
    result = superexperts.profile(model, ids, progress=False)
    for criterion in ("reap", "ean"):
        assert result.importance(criterion)[1][0][0] == expert
    freq = result.importance("frequency")
    assert freq[1][0] == (expert, float(result.routed[1].rows[expert]))
    for layer, ranked in result.importance("reap").items():
        s = result.routed[layer]
        want = (s.norm_sum / s.rows.clamp(min=1)).tolist()
        assert sorted(e for e, _ in ranked) == list(range(s.rows.numel()))
        assert [v for _, v in ranked] == sorted(want, reverse=True)
    with pytest.raises(ValueError, match="criterion must be one of"):
        result.importance("nope")

    paths = superexperts.write_report(result, tmp_path, plots=False)
    loaded = ProfileResult.load(tmp_path)
    for name in ("weight_sum", "norm_sum", "top1"):
        assert torch.equal(getattr(loaded.routed[1], name), getattr(result.routed[1], name))
    report = json.loads(paths["report"].read_text())
    row = next(u for u in report["experts"] if u["layer"] == 1 and u["expert"] == expert)
    assert row["norm_sum"] == pytest.approx(float(result.routed[1].norm_sum[expert]))


def test_scores_and_nan_first():
    from superexperts.collector import DownProjStats

    s = DownProjStats.empty(4, torch.device("cpu"))
    s.rows = torch.tensor([2, 0, 4, 1])
    s.norm_sum = torch.tensor([4.0, 0.0, float("nan"), 3.0], dtype=torch.float64)
    s.weight_sum = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    s.top1 = torch.tensor([1, 0, 3, 0])
    assert scores(s, "reap").tolist()[:2] == [2.0, 0.0] and scores(s, "reap")[3] == 3.0
    assert [e for e, _ in ranking(s, "ean")] == [2, 0, 3, 1]
    assert [e for e, _ in ranking(s, "frequency")] == [2, 0, 3, 1]
    assert [e for e, _ in ranking(s, "top1")] == [2, 0, 1, 3]
    assert set(CRITERIA) == {"reap", "ean", "frequency", "weight", "top1"}


def test_stats_saved_without_importance_sums_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    superexperts.register()
    result = superexperts.profile(build_model("mixtral"), tokens(1, 8), progress=False)
    result.save(tmp_path)
    old = {k: v for k, v in load_file(str(tmp_path / "stats.safetensors")).items() if not k.endswith(("norm_sum", "weight_sum", "top1"))}
    save_file(old, str(tmp_path / "stats.safetensors"))
    with pytest.raises(ValueError, match="lack norm_sum, top1, weight_sum: written by an older superexperts"):
        ProfileResult.load(tmp_path)


@pytest.mark.parametrize("family", ["dbrx", "jetmoe", "step3p7", "longcat_flash", "llama4"])
def test_adapter_families_record_the_sums_they_can(family):
    """Families outside the ExpertsInterface: those that weight the expert outputs (top_k,
    sorted_rows) record the sums, one top-1 per token (LongCat's identity experts take some
    top-1 choices: at most one per token); Llama 4 scales the expert inputs by the routing
    weight, so it records rows only."""
    superexperts.register()
    model = build_model(family)
    ids = tokens(2, 12, seed=8)
    result = superexperts.profile(model, ids, progress=False)
    assert result.routed
    for layer, s in result.routed.items():
        routed = s.rows > 0
        assert routed.any()
        if family == "llama4":
            assert not s.weight_sum.any() and not s.norm_sum.any() and not s.top1.any()
            continue
        assert torch.all(s.weight_sum[routed] > 0) and torch.all(s.norm_sum[routed] > 0)
        assert torch.all(s.weight_sum[~routed] == 0) and torch.all(s.top1[~routed] == 0)
        if family == "longcat_flash":
            assert int(s.top1.sum()) <= ids.numel()
        else:
            assert int(s.top1.sum()) == ids.numel()
