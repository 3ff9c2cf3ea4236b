"""The candidate pool A as the authors' tool builds it: experts that saw no token count as a = 0."""

import json

import pytest
import torch
from tiny_models import build_model, force_unrouted, save_and_load, tokens

import superexperts
from superexperts.cli import _rule, build_parser
from superexperts.layers import find_layers
from superexperts.rules import Rule

OURS = dict(experts_implementation="superexperts", attn_implementation="superexperts_sink")
NUM_EXPERTS = 160


@pytest.fixture(scope="module")
def quarter_unrouted(tmp_path_factory):
    """A 4-layer Qwen3-MoE (L = layers 0-2, 3 x 160 = 480 candidates) where a quarter of the
    experts of every candidate layer never get a token, and four experts of layer 0 planted so
    that their output maxima are 400, 300, 200 and 150 (max // 10 = 40 lets all four pass).

    With all 480 in A, P99.5 lies 60.5% of the way from the 4th to the 3rd largest (180.25): the
    top three are Super Experts. With the 360 (or fewer) routed ones only, it lies above the 3rd
    largest: the top two. The 4th (150) passes neither."""
    superexperts.register()
    model = build_model("qwen3_moe", num_hidden_layers=4, num_experts=NUM_EXPERTS, num_experts_per_tok=8)
    unrouted = {layer: list(range(layer, NUM_EXPERTS, 4)) for layer in range(3)}
    force_unrouted(model, unrouted)
    ids = tokens(4, 32, seed=7)
    rows = superexperts.profile(model, ids, progress=False).routed[0].rows
    routed_first = [int(e) for e in torch.argsort(rows, descending=True)[:4]]
    parts = find_layers(model)[0]
    with torch.no_grad():
        parts.experts.down_proj[routed_first, 0] = 0.0  # planted outputs leave the carrier channel alone
    natural = superexperts.profile(model, ids, progress=False).routed[0].out_absmax
    with torch.no_grad():
        for e, target in zip(routed_first, (400.0, 300.0, 200.0, 150.0)):
            parts.experts.down_proj[e].mul_(target / float(natural[e]))
    loaded = save_and_load(model, tmp_path_factory.mktemp("pool") / "m", **OURS)
    return superexperts.profile(loaded, ids, progress=False), unrouted, routed_first


def test_unrouted_experts_are_in_the_pool_with_a_zero(quarter_unrouted):
    result, unrouted, planted = quarter_unrouted
    for layer, ids in unrouted.items():
        assert torch.all(result.routed[layer].rows[ids] == 0), "the forced experts must see no token"
    values = sorted((u["output_max"] for u in result.units() if u["layer"] < 3), reverse=True)
    assert values[:4] == pytest.approx([400.0, 300.0, 200.0, 150.0], rel=1e-4)
    assert values[4] < 40.0

    default = result.super_experts()
    assert [(se.layer, se.expert) for se in default] == [(0, e) for e in planted[:3]]
    pool = result.pool()
    assert pool["candidates"] == 3 * NUM_EXPERTS and pool["unrouted"] >= 120 and pool["unrouted_in_pool"]
    want = values[3] + (0.995 * 479 - 476) * (values[2] - values[3])
    assert pool["threshold"] == pytest.approx(want, rel=1e-6)

    rule = Rule(exclude_unrouted=True)
    excluded = result.super_experts(rule)
    assert [(se.layer, se.expert) for se in excluded] == [(0, e) for e in planted[:2]]
    pool = result.pool(rule)
    assert pool["candidates"] == 3 * NUM_EXPERTS - result.pool()["unrouted"] and not pool["unrouted_in_pool"]
    assert values[2] < pool["threshold"] < values[1]
    assert (0, planted[3]) not in {(se.layer, se.expert) for se in default + excluded}


def test_report_and_cli_say_how_the_pool_was_built(quarter_unrouted, tmp_path, capsys):
    result, _, planted = quarter_unrouted
    rule = _rule(build_parser().parse_args(["profile", "--model", "m", "--calib", "c", "--exclude-unrouted"]))
    assert rule.exclude_unrouted
    assert not _rule(build_parser().parse_args(["profile", "--model", "m", "--calib", "c"])).exclude_unrouted
    paths = superexperts.write_report(result, tmp_path, rule=rule, plots=False)
    report = json.loads(paths["report"].read_text())
    assert report["rule"]["pool"] == result.pool(rule)
    assert [se["expert"] for se in report["super_experts"]] == planted[:2]
    from superexperts.cli import print_super_experts

    print_super_experts(result, Rule())
    out = capsys.readouterr().out
    assert f"pool A: {3 * NUM_EXPERTS} candidates; {result.pool()['unrouted']} experts of L saw no token (in A with a = 0)" in out
