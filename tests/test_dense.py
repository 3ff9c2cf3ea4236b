"""superexperts.dense: a layer's dense projections through the native op's GEMMs."""

import pytest
import torch
from torch import nn
from tiny_models import build_model, tokens

import superexperts
import superexperts_kernels as sk
from superexperts import dense
from superexperts.layers import find_layers
from superexperts_kernels import native

requires_native = pytest.mark.skipif(not native.BUILT, reason="native extension not built")
# One unit in the last place of the output's dtype at the logits' magnitude: the op rounds
# from an fp32 accumulator as torch's bf16/fp16 GEMMs do, in another summation order.
TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def plain_linears(module):
    return [m for m in module.modules() if type(m) is nn.Linear]


@requires_native
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_model_outputs_equal_plain_and_forwards_are_restored(family, dtype):
    """Attention projections, shared experts and dense MLPs switched (routed experts never),
    the model's outputs those of torch's GEMMs, and every module's own forward back after."""
    superexperts.register()
    model = build_model(family).to(dtype).eval()
    layers = model.model.layers
    experts = {id(m) for p in find_layers(model) if p.experts is not None for m in p.experts.modules()}
    want = [m for m in plain_linears(layers) if id(m) not in experts]
    ids = tokens(2, 20)
    with torch.inference_mode():
        plain = model(ids).logits
        with dense.fast_dense_linears(layers, enabled=True) as switched:
            assert switched == len(want) > 0
            assert all("forward" in m.__dict__ for m in want)
            fast = model(ids).logits
        assert not any("forward" in m.__dict__ for m in layers.modules())
        again = model(ids).logits
    torch.testing.assert_close(fast.float(), plain.float(), **TOL[dtype])
    assert torch.equal(again, plain)


@requires_native
def test_one_linear_with_bias_odd_shapes_hooks_and_fallbacks():
    """Bias, rows and features not multiples of any block, leading batch dims; hooks still
    fire; inputs of another dtype and empty inputs take torch's own path."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(70, 300).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(300, 70, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(300, generator=g))
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(3, 41, 70, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        plain = lin(x)
        with dense.fast_dense_linears(nn.Sequential(lin), enabled=True):
            fast = lin(x)
            empty = lin(x[:, :0])
            with pytest.raises(RuntimeError):
                lin(x.float())  # torch's own F.linear refuses mixed dtypes, as without the switch
    torch.testing.assert_close(fast.float(), plain.float(), **TOL[torch.bfloat16])
    assert fast.shape == plain.shape == (3, 41, 300) and empty.shape == (3, 0, 300)
    assert seen[:2] == [plain.shape, fast.shape]


def test_pays_only_where_the_native_gemm_dtype_differs(monkeypatch):
    assert not dense.pays(torch.float32, torch.device("cpu"))
    assert not dense.pays(torch.bfloat16, torch.device("cuda"))
    if not native.BUILT:
        assert not dense.pays(torch.bfloat16, torch.device("cpu"))
        return
    upcast = native.info()["cpu_gemm_dtype"]["bfloat16"] != "bfloat16"
    assert dense.pays(torch.bfloat16, torch.device("cpu")) == upcast
    with sk.use_backend("moe_down_proj_profile", "cpu", "reference"):
        assert not dense.pays(torch.bfloat16, torch.device("cpu"))


@requires_native
def test_profile_uses_it_where_it_pays_and_finds_the_same_super_experts(monkeypatch):
    """A bf16 profile with the switch forced on and off: the same Super Experts, statistics
    within bf16 rounding, and the switch used inside `profile` only."""
    from tiny_models import plant

    superexperts.register()
    model = build_model("qwen3_moe").to(torch.bfloat16).eval()
    plant(model, layer=1, expert=3, scale=200.0)
    ids = tokens(4, 24)
    calls = []
    real = dense.fast_dense_linears

    def counting(module, enabled=None):
        calls.append(enabled)
        return real(module, enabled=forced)

    monkeypatch.setattr("superexperts.integration.fast_dense_linears", counting)
    results = {}
    for forced in (True, False):
        results[forced] = superexperts.profile(model, ids, progress=False)
    assert len(calls) == 2
    on, off = results[True], results[False]
    assert on.super_experts() == off.super_experts() and (1, 3) in [(s.layer, s.expert) for s in on.super_experts()]
    a, b = on.tensors(), off.tensors()
    assert set(a) == set(b)
    for key in (k for k in a if k.endswith("out_absmax")):
        torch.testing.assert_close(a[key], b[key], rtol=3e-2, atol=3e-2)


@requires_native
def test_modules_still_on_meta_are_switched_and_run_once_loaded():
    """A model loading in the background enters `profile` with its layers on the meta device:
    they are switched where the CPU pays, and run through the op once their weights arrive."""
    with torch.device("meta"):
        seq = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 8)).to(torch.bfloat16)
    want = 2 if dense.pays(torch.bfloat16, torch.device("cpu")) else 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 40, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        with dense.fast_dense_linears(seq) as switched:
            assert switched == want
            for m in seq:  # "loaded": real parameters replace the meta ones
                m.weight = nn.Parameter(torch.randn(m.out_features, m.in_features, generator=g).to(torch.bfloat16))
                m.bias = nn.Parameter(torch.randn(m.out_features, generator=g).to(torch.bfloat16))
            fast = seq(x)
        plain = seq(x)
    torch.testing.assert_close(fast.float(), plain.float(), **TOL[torch.bfloat16])
