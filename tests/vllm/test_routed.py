"""The plugin's pieces that need no vLLM: the profiled MoE layer on our ops against a
per-expert brute force, the in-place stat update op, and the merge of worker ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from superexperts.vllm import ranks, routed
from superexperts.vllm.stats import LayerStats

SPAN = 1000


def _problem(num_tokens=13, hidden=32, inter=16, num_experts=6, top_k=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * 0.2).to(dtype)
    w2[3] *= 50  # a planted outlier expert
    logits = torch.randn(num_tokens, num_experts, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    ref = torch.arange(num_tokens) + 7 * SPAN  # request uid 7, positions 0..
    ref[-3:] = -1  # padding rows
    return x, w13, w2, weights, ids.to(torch.int32), ref


def _brute_force(x, w13, w2, weights, ids, ref, held=None):
    """Per-expert loop in fp32: output [M, H] and {expert: (max, token_ref, channel, in_max, rows)};
    with `held` (global ids of w13/w2's experts, in order) only those experts."""
    out = torch.zeros(x.shape[0], w2.shape[1])
    stats = {}
    for e in range(int(ids.max()) + 1):
        if held is not None and e not in held:
            continue
        local = held.index(e) if held is not None else e
        token, slot = torch.where((ids == e) & (ref >= 0).unsqueeze(-1))
        if token.numel() == 0:
            continue
        up = x[token].float() @ w13[local].float().T
        gate, lin = up.chunk(2, dim=-1)
        act = (F.silu(gate) * lin).to(x.dtype)
        down = (act.float() @ w2[local].float().T)
        a = down.to(x.dtype).float().abs()
        flat = int(a.argmax())
        stats[e] = (float(a.view(-1)[flat]), int(ref[token[flat // a.shape[1]]]), flat % a.shape[1],
                    float(act.float().abs().max()), token.numel())
        out.index_add_(0, token, down * weights[token, slot].unsqueeze(-1))
    return out, stats


def _check_stats(stats: LayerStats, want: dict, num_experts: int, tol: float, locations: bool = True):
    for e in range(num_experts):
        if e not in want:
            assert int(stats.rows[e]) == 0 and float(stats.out_absmax[e]) == -1.0
            continue
        value, token, channel, in_max, rows = want[e]
        assert int(stats.rows[e]) == rows
        torch.testing.assert_close(float(stats.out_absmax[e]), value, rtol=tol, atol=tol)
        torch.testing.assert_close(float(stats.in_absmax[e]), in_max, rtol=tol, atol=tol)
        if locations:
            assert (int(stats.out_token[e]), int(stats.out_channel[e])) == (token, channel)


# bf16: one rounding step apart from the fp32 brute force; locations only checked in fp32.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_profiled_moe_matches_brute_force(dtype, tol):
    x, w13, w2, weights, ids, ref = _problem(dtype=dtype)
    stats = LayerStats.empty(6, "cpu")
    out = routed.profiled_moe(x, w13, w2, None, None, weights, ids, None, ref, "silu", False, stats, torch.arange(6))
    want_out, want = _brute_force(x, w13, w2, weights, ids, ref)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float()[:-3], want_out[:-3], rtol=tol, atol=tol * 10)
    assert bool((out[-3:] == 0).all())  # padding rows are not computed
    _check_stats(stats, want, 6, tol, locations=dtype == torch.float32)


def test_expert_parallel_rank_holds_its_experts_at_global_ids():
    x, w13, w2, weights, ids, ref = _problem()
    held = [4, 1, 5]  # local order on this rank
    expert_map = torch.full((6,), -1, dtype=torch.int32)
    expert_map[held] = torch.arange(3, dtype=torch.int32)
    stats = LayerStats.empty(6, "cpu")
    out = routed.profiled_moe(x, w13[held], w2[held], None, None, weights, ids, expert_map, ref, "silu", False,
                              stats, torch.tensor(held))
    want_out, want = _brute_force(x, w13[held], w2[held], weights, ids, ref, held=held)
    torch.testing.assert_close(out[:-3], want_out[:-3], rtol=1e-5, atol=1e-4)
    _check_stats(stats, want, 6, 1e-5)


def test_two_calls_accumulate_like_one():
    x, w13, w2, weights, ids, ref = _problem(num_tokens=20)
    one = LayerStats.empty(6, "cpu")
    routed.profiled_moe(x, w13, w2, None, None, weights, ids, None, ref, "silu", False, one, torch.arange(6))
    two = LayerStats.empty(6, "cpu")
    for part in (slice(0, 9), slice(9, 20)):
        routed.profiled_moe(x[part], w13, w2, None, None, weights[part], ids[part], None, ref[part], "silu", False,
                            two, torch.arange(6))
    for k, t in one.tensors().items():
        torch.testing.assert_close(two.tensors()[k], t, rtol=1e-6, atol=1e-6)


def test_unknown_activation_is_refused():
    x, w13, w2, weights, ids, ref = _problem()
    with pytest.raises(ValueError, match="activation 'swigluoai'"):
        routed.profiled_moe(x, w13, w2, None, None, weights, ids, None, ref, "swigluoai", False,
                            LayerStats.empty(6, "cpu"), torch.arange(6))


def _record_args():
    stats = LayerStats.empty(4, "cpu")
    new = (torch.tensor([1.0, 5.0, float("nan"), 2.0]), torch.tensor([[10, 1], [11, 2], [12, 3], [13, 4]]),
           torch.tensor([0.5, 0.5, 0.5, 0.0]), torch.tensor([1, 2, 3, 0]), torch.tensor([0, 1, 2, 3]))
    return stats, new


def test_record_routed_rules_and_opcheck():
    stats, new = _record_args()
    torch.library.opcheck(torch.ops.superexperts_vllm.record_routed.default, (*stats.tensors().values(), *new))
    stats, new = _record_args()
    stats.record(*new)
    stats.record(torch.tensor([1.0, 6.0, 9.0, 9.0]), torch.tensor([[20, 5], [21, 6], [22, 7], [23, 8]]),
                 torch.tensor([0.1, 0.9, 0.1, 0.0]), torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 2, 3]))
    assert stats.out_absmax.tolist()[:2] == [1.0, 6.0] and stats.out_absmax[2].isnan()
    assert stats.out_token.tolist() == [10, 21, 12, -1]  # tie: earlier wins; NaN stays; no rows: untouched
    assert stats.out_absmax[3] == -1.0 and stats.rows.tolist() == [2, 3, 4, 0]
    torch.testing.assert_close(stats.in_absmax, torch.tensor([0.5, 0.9, 0.5, 0.0]))
    stats.reset()
    assert stats.rows.tolist() == [0, 0, 0, 0] and stats.out_token.tolist() == [-1] * 4


def _snapshot(rank, tables, request_ids=("r0", "r1")):
    layers = {layer: LayerStats(**t) for layer, t in tables.items()}
    return {"meta": {"rank": rank, "model_type": "qwen3_moe", "num_layers": 3, "span": SPAN,
                     "request_ids": list(request_ids), "tokens": 5}, "stats": ranks.to_bytes(layers)}


def test_expert_parallel_ranks_merge_to_the_single_rank_tables(tmp_path):
    x, w13, w2, weights, ids, ref = _problem()
    whole = LayerStats.empty(6, "cpu")
    routed.profiled_moe(x, w13, w2, None, None, weights, ids, None, ref, "silu", False, whole, torch.arange(6))
    parts = []
    for held in ([0, 2, 4], [1, 3, 5]):
        s = LayerStats.empty(6, "cpu")
        emap = torch.full((6,), -1, dtype=torch.int32)
        emap[held] = torch.arange(3, dtype=torch.int32)
        routed.profiled_moe(x, w13[held], w2[held], None, None, weights, ids, emap, ref, "silu", False, s,
                            torch.tensor(held))
        parts.append({k: t.clone() for k, t in s.tensors().items()})
    snaps = [_snapshot(r, {1: p}) for r, p in enumerate(parts)]
    meta, merged = ranks.merge(snaps)
    for k, t in whole.tensors().items():
        torch.testing.assert_close(merged[1][k], t, rtol=1e-6, atol=1e-6)
    for snap in snaps:
        ranks.write_rank(tmp_path, snap)
    meta2, merged2 = ranks.merge(ranks.read_dir(tmp_path))
    assert meta2 == meta and all(torch.equal(merged2[1][k], merged[1][k]) for k in merged[1])


def test_merge_refuses_snapshots_of_different_runs():
    t = {k: v.clone() for k, v in LayerStats.empty(2, "cpu").tensors().items()}
    with pytest.raises(ValueError, match="disagree on the requests"):
        ranks.merge([_snapshot(0, {0: t}), _snapshot(1, {0: t}, request_ids=("other",))])
    with pytest.raises(FileNotFoundError, match="not a superexperts vLLM dump"):
        ranks.read_dir("/nonexistent-dump")
