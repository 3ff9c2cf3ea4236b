"""The CUDA experts' second GEMM (`profiled_w2`): the unweighted down projection with
statistics, then routing weights and top-k sum, against a per-expert brute force. The
logic runs on CPU tensors here; the same test runs on CUDA (Triton kernel) when present."""

from __future__ import annotations

import pytest
import torch

from vllm_env import requires_vllm

pytestmark = requires_vllm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_profiled_w2_matches_brute_force(device, expert_parallel):
    from superexperts.vllm.cuda_experts import profiled_w2
    from superexperts.vllm.layer_setup import LayerProfile
    from superexperts.vllm.stats import LayerStats

    g = torch.Generator().manual_seed(0)
    tokens, top_k, experts, hidden, inter = 11, 2, 6, 32, 16
    act = torch.randn(tokens * top_k, inter, generator=g)
    w2_all = torch.randn(experts, hidden, inter, generator=g) * 0.3
    weights, ids = torch.topk(torch.randn(tokens, experts, generator=g).softmax(-1), top_k)
    ref = torch.arange(tokens) + 3000
    ref[-2:] = -1  # padding rows
    held = [5, 0, 2] if expert_parallel else list(range(experts))
    expert_map = None
    if expert_parallel:
        expert_map = torch.full((experts,), -1, dtype=torch.int32)
        expert_map[held] = torch.arange(len(held), dtype=torch.int32)
    stats = LayerStats.empty(experts, device)
    profile = LayerProfile(1, stats, ref.to(device), torch.tensor(held, device=device))
    out = profiled_w2(act.to(device), w2_all[held].to(device), None, weights.to(device), ids.int().to(device),
                      None if expert_map is None else expert_map.to(device), profile, False).cpu()

    want = torch.zeros(tokens, hidden)
    for e in held:
        token, slot = torch.where((ids == e) & (ref >= 0).unsqueeze(-1))
        if token.numel() == 0:
            assert int(stats.rows[e]) == 0
            continue
        y = act[token * top_k + slot] @ w2_all[e].T
        a = y.abs()
        flat = int(a.argmax())
        assert int(stats.rows[e]) == token.numel()
        torch.testing.assert_close(float(stats.out_absmax[e]), float(a.view(-1)[flat]), rtol=1e-5, atol=1e-5)
        assert (int(stats.out_token[e]), int(stats.out_channel[e])) == (int(ref[token[flat // hidden]]), flat % hidden)
        want.index_add_(0, token, y * weights[token, slot].unsqueeze(-1))
    for e in set(range(experts)) - set(held):
        assert int(stats.rows[e]) == 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
