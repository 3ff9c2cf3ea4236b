"""Super Expert rules on synthetic candidate pools with known answers."""

import numpy as np
import pytest
import torch

from superexperts.rules import Rule, detect, threshold


def pool(num_layers=8, experts=64, seed=0, planted=()):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(num_layers, experts, generator=g) * 5 + 1
    for layer, expert, value in planted:
        values[layer, expert] = value
    return [(layer, expert, float(values[layer, expert])) for layer in range(num_layers) for expert in range(experts)]


def test_paper_rule_finds_planted_in_candidate_layers_only():
    cands = pool(experts=128, planted=[(1, 68, 744.0), (2, 92, 540.0), (3, 82, 430.0), (7, 5, 900.0)])
    found = detect(cands, num_layers=8)  # L = first round(0.75 * 8) = 6 layers: 768 candidates
    assert [(s.layer, s.expert, s.rank) for s in found] == [(1, 68, 1), (2, 92, 2), (3, 82, 3)]
    assert found[0].value == 744.0


def test_paper_rule_threshold_matches_numpy_percentile():
    cands = pool(planted=[(0, 0, 100.0)])
    values = np.array([v for layer, _, v in cands if layer < 6])
    want = max(np.percentile(values, 99.5), values.max() // 10)
    assert threshold(torch.tensor(values), Rule()) == pytest.approx(want, rel=1e-12)


def test_max_condition_floors_like_the_authors():
    """The authors' code keeps a > np.max(A) // 10 (floor): with max 105 a value of 10.4
    passes (10.4 > 10), which max/10 = 10.5 would have blocked."""
    cands = [(0, e, 1.0) for e in range(998)] + [(0, 998, 105.0), (0, 999, 10.4)]
    assert threshold(torch.tensor([v for *_, v in cands]), Rule(layer_fraction=1.0)) == 10.0
    found = detect(cands, num_layers=1, rule=Rule(layer_fraction=1.0))
    assert [(s.expert, s.value) for s in found] == [(998, 105.0), (999, 10.4)]


def test_max_ratio_condition_blocks_mild_outliers():
    # 600 candidates: P99.5 lets the top 3 through, but only values above max/10 are kept.
    cands = pool(num_layers=10, experts=60, planted=[(0, 0, 1000.0), (1, 1, 99.0), (2, 2, 98.0)])
    found = detect(cands, num_layers=10, rule=Rule(layer_fraction=1.0))
    assert [(s.layer, s.expert) for s in found] == [(0, 0)]


def test_explicit_layers_and_fraction():
    cands = pool(planted=[(7, 1, 500.0)])
    assert (7, 1) not in [(s.layer, s.expert) for s in detect(cands, 8)]  # layer 7 is not among the first 6
    assert [(s.layer, s.expert) for s in detect(cands, 8, Rule(layers=(7,)))] == [(7, 1)]
    assert Rule(layer_fraction=0.5).layer_set(48) == set(range(24))
    assert Rule().layer_set(48) == set(range(36))  # Qwen3-30B-A3B: 36 of 48 layers


@pytest.mark.parametrize(
    "rule",
    [Rule("std", k=4.0), Rule("quantile", quantile=99.5), Rule("mean_multiple", k=20.0)],
    ids=lambda r: r.name,
)
def test_other_rules(rule):
    cands = pool(planted=[(0, 3, 400.0), (4, 60, 350.0)])
    found = detect(cands, 8, rule)
    assert [(s.layer, s.expert) for s in found] == [(0, 3), (4, 60)]


def test_std_rule_threshold():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert threshold(values, Rule("std", k=1.0)) == pytest.approx(2.5 + float(values.std(unbiased=False)))
    assert threshold(values, Rule("mean_multiple", k=2.0)) == pytest.approx(5.0)


def test_shared_experts_are_candidates():
    cands = pool(num_layers=4, experts=8) + [(1, "shared", 300.0)]
    assert [(s.layer, s.expert) for s in detect(cands, 4)] == [(1, "shared")]


def test_bad_rules():
    with pytest.raises(ValueError, match="rule must be one of"):
        Rule("nope")
    with pytest.raises(ValueError, match="quantile"):
        Rule(quantile=101)
    with pytest.raises(ValueError, match="layer_fraction"):
        Rule(layer_fraction=0.0)


def test_empty_pool():
    assert detect([], 4) == []


ALL_RULES = [Rule(), Rule("std", k=4.0), Rule("quantile", quantile=99.5), Rule("mean_multiple", k=20.0)]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_overflowed_expert_is_reported_first_and_thresholds_stay_finite(rule):
    """An inf candidate (its output overflowed the dtype) is the strongest Super Expert: it
    comes first, marked, with a warning; the finite ones are still found (issue 9)."""
    cands = pool(planted=[(0, 3, 400.0), (4, 60, 350.0)]) + [(1, 5, float("inf"))]
    with pytest.warns(RuntimeWarning, match=r"overflowed \(inf\) in layer 1 expert 5"):
        found = detect(cands, 8, rule)
    assert [(s.layer, s.expert, s.rank, s.status) for s in found] == [
        (1, 5, 1, "overflow"), (0, 3, 2, "finite"), (4, 60, 3, "finite")
    ]
    assert found[0].value == float("inf")


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_nan_experts_are_marked_and_do_not_empty_the_detection(rule):
    cands = pool(planted=[(0, 3, 400.0), (4, 60, 350.0), (2, 9, float("nan")), (1, 7, float("nan"))])
    cands += [(3, "shared", float("inf"))]
    with pytest.warns(RuntimeWarning, match=r"overflowed \(inf\) in layer 3 expert shared"):
        with pytest.warns(RuntimeWarning, match=r"NaN in layer 1 expert 7, layer 2 expert 9"):
            found = detect(cands, 8, rule)
    assert [(s.layer, s.expert, s.status) for s in found] == [
        (3, "shared", "overflow"), (1, 7, "nan"), (2, 9, "nan"), (0, 3, "finite"), (4, 60, "finite")
    ]
    assert [s.rank for s in found] == [1, 2, 3, 4, 5]


def test_thresholds_come_from_the_finite_values():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for rule in ALL_RULES:
        want = threshold(values, rule)
        assert threshold(torch.cat([values, torch.tensor([float("inf"), float("nan")])]), rule) == want
    assert threshold(torch.tensor([float("nan"), float("inf")]), Rule()) == float("inf")


def test_non_finite_outside_candidate_layers_is_not_reported():
    cands = pool(planted=[(7, 1, float("inf")), (0, 3, 400.0)])
    assert [(s.layer, s.expert) for s in detect(cands, 8)] == [(0, 3)]


def test_bad_rule_arguments():
    with pytest.raises(ValueError, match="max_ratio must be > 0"):
        Rule(max_ratio=0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        Rule("std", k=-1.0)
    with pytest.raises(ValueError, match=r"layers \[8, 9\] are outside the model's 8 decoder layers"):
        detect(pool(), 8, Rule(layers=(1, 8, 9)))
