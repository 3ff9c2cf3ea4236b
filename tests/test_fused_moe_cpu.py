"""superexperts::fused_moe_cpu_native (csrc/fused_moe_cpu.cpp) against its torch reference:
several shapes and the three float dtypes, empty experts, one-row experts, skipped rows,
routing weights on the input, every activation; packing round trip; opcheck."""

from __future__ import annotations

import pytest
import torch

from superexperts_kernels import fused_moe_cpu as f

pytestmark = pytest.mark.skipif(not f.available(), reason="the native extension (csrc/) is not built")

# (tokens, hidden, intermediate, experts, top_k)
SHAPES = [(1, 16, 8, 4, 2), (13, 64, 32, 6, 2), (37, 48, 24, 9, 3), (70, 32, 16, 16, 4)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(tokens, hidden, inter, experts, top_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.3).to(dtype)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 0] = -1e9  # expert 0 never routed: an empty expert
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    ids = ids.to(torch.int32)
    if tokens > 2:
        ids[1, 0] = experts - 1  # make sure some expert gets one row only
        ids[ids == experts - 1] = -1
        ids[1, 0] = experts - 1
        ids[-1] = -1  # a skipped (padding) token
    return x, *f.pack_weights(w13, w2), weights, ids, torch.arange(tokens) * 3 + 1000


def _compare(got, want, dtype, locations):
    tol = TOL[dtype]
    torch.testing.assert_close(got.out.float(), want.out.float(), rtol=tol, atol=tol)
    assert torch.equal(got.rows, want.rows)
    torch.testing.assert_close(got.out_absmax, want.out_absmax, rtol=tol, atol=tol)
    torch.testing.assert_close(got.in_absmax, want.in_absmax, rtol=tol, atol=tol)
    if locations:
        assert torch.equal(got.out_argmax, want.out_argmax)
    else:
        assert torch.equal(got.out_argmax == -1, want.out_argmax == -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype):
    args = _inputs(*shape, dtype)
    got, want = f.fused_moe_cpu(*args), f.fused_moe_cpu_reference(*args)
    assert got.out.dtype == dtype
    _compare(got, want, dtype, locations=dtype == torch.float32)
    assert int(got.rows[0]) == 0 and float(got.out_absmax[0]) == -1.0 and got.out_argmax[0].tolist() == [-1, -1]
    if shape[0] > 2:
        assert int(got.rows[shape[3] - 1]) == 1
        assert bool((got.out[-1] == 0).all())


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_activations_and_weights_on_input(activation):
    args = _inputs(13, 64, 32, 6, 1, torch.float32, seed=1)
    got = f.fused_moe_cpu(*args, activation=activation, weights_on_input=True)
    want = f.fused_moe_cpu_reference(*args, activation=activation, weights_on_input=True)
    _compare(got, want, torch.float32, locations=True)


def test_nan_is_reported_not_dropped():
    x, w13p, w2p, weights, ids, ref = _inputs(13, 64, 32, 6, 2, torch.float32)
    x[4, 3] = float("nan")
    got = f.fused_moe_cpu(x, w13p, w2p, weights, ids, ref)
    hit = {int(e) for e in ids[4] if e >= 0}
    assert all(got.out_absmax[e].isnan() and got.in_absmax[e].isnan() for e in hit)
    assert all(int(got.out_argmax[e, 0]) == int(ref[4]) for e in hit)


def test_pack_round_trip_and_bad_shapes():
    w13 = torch.randn(3, 32, 48)
    w2 = torch.randn(3, 48, 16)
    assert all(torch.equal(a, b) for a, b in zip(f.unpack_weights(*f.pack_weights(w13, w2)), (w13, w2)))
    with pytest.raises(ValueError, match="I % 8 == 0 and H % 16 == 0"):
        f.pack_weights(torch.randn(3, 12, 48), torch.randn(3, 48, 6))
    x, w13p, w2p, weights, ids, ref = _inputs(5, 32, 16, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="do not fit x"):
        f.fused_moe_cpu(x[:, :16], w13p, w2p, weights, ids, ref)
    with pytest.raises(ValueError, match="activation must be one of"):
        f.fused_moe_cpu(x, w13p, w2p, weights, ids, ref, activation="relu")


def test_opcheck():
    x, w13p, w2p, weights, ids, ref = _inputs(13, 64, 32, 6, 2, torch.float32)
    torch.library.opcheck(torch.ops.superexperts.fused_moe_cpu_native.default, (x, w13p, w2p, weights, ids, ref, 0, False))
