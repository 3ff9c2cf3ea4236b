"""The Triton attention kernel's own features: softcap and what the launcher says it supports."""

import pytest
import torch
from conftest import KERNEL_DEVICE, requires_triton

pytestmark = requires_triton


def eager_softcap(q, k, v, scale, softcap, num_sink):
    """float64 causal GQA attention with Gemma 2's score cap, and the sink mass."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = softcap * torch.tanh(s / softcap)
    t, tk = q.shape[2], k.shape[2]
    visible = torch.ones(t, tk, dtype=torch.bool).tril(tk - t)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    return p @ v, p[..., :num_sink].sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 2, 37, 37, 16), (2, 2, 1, 9, 21, 24)], ids=["prefill", "past-keys"])
def test_softcap_matches_eager(dtype, shape):
    from superexperts_kernels._triton.attention import attention_with_sink_triton

    b, hq, hkv, t, tk, d = shape
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(b, hq, t, d, generator=g) * 2).to(dtype)
    k = (torch.randn(b, hkv, tk, d, generator=g) * 2).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    scale, softcap = d**-0.5, 5.0
    dev = KERNEL_DEVICE
    o, mass = attention_with_sink_triton(q.to(dev), k.to(dev), v.to(dev), scale, True, 2, None, None, None, softcap)
    want_o, want_mass = eager_softcap(q, k, v, scale, softcap, 2)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=tol, atol=tol)
    torch.testing.assert_close(mass.cpu().double(), want_mass, rtol=1e-4, atol=1e-5)
    # The cap changes the result: without it the same inputs give other probabilities.
    plain_o, _ = attention_with_sink_triton(q.to(dev), k.to(dev), v.to(dev), scale, True, 2)
    assert not torch.allclose(plain_o.cpu().double(), want_o, rtol=tol, atol=tol)


def test_launcher_declares_what_it_supports():
    from superexperts_kernels._triton import attention

    assert attention.attention_with_sink_triton.supports == attention.SUPPORTS
    assert {"softcap", "sink_logits", "sliding_window", "key_padding_mask"} <= attention.SUPPORTS


def test_autotune_list_is_pruned_by_the_resource_model():
    from superexperts_kernels._triton import attention

    for arch in (90, 80):
        listed = attention.candidate_configs(128, torch.bfloat16, arch)
        assert listed
        for cfg in listed:
            use = attention.estimate_resources(cfg["BLOCK_M"], cfg["BLOCK_N"], 128, cfg["num_warps"], cfg["num_stages"], 2, arch)
            assert use["registers"] <= attention._REG_BUDGET and use["shared_bytes"] <= attention._SMEM_BUDGET
        # 128-wide key blocks with a 128-wide head hold too many live scores (they spill).
        assert all(cfg["BLOCK_N"] < 128 for cfg in listed)
