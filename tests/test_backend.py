"""Dispatch: one table per op, resolved lazily; calls go to a backend that honours their arguments."""

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import HAS_TRITON

import superexperts_kernels as sk
from superexperts_kernels import _backend, native
from superexperts_kernels.attention_with_sink import IMPLEMENTATIONS as ATTENTION
from superexperts_kernels.moe_down_proj_profile import IMPLEMENTATIONS as DOWN_PROJ

requires_native = pytest.mark.skipif(not native.BUILT, reason="native extension not built")


def test_every_table_names_its_implementations_and_they_resolve():
    for table in (DOWN_PROJ, ATTENTION):
        assert set(table.impls) == {"reference", "triton", "native"}
        for backend, impl in table.impls.items():
            if backend == "triton" and not HAS_TRITON or backend == "native" and not native.BUILT:
                continue
            assert callable(table.resolve(backend)), impl.target


def test_queries_import_nothing():
    """available / select / backends read the tables only: no kernel module, no triton."""
    code = (
        "import sys, superexperts_kernels as sk\n"
        "from superexperts_kernels import _backend\n"
        "before = set(sys.modules)\n"
        "sk.backends()\n"
        "for op in ('moe_down_proj_profile', 'attention_with_sink'):\n"
        "    for b in _backend.BACKENDS:\n"
        "        for d in _backend.DEVICE_TYPES:\n"
        "            _backend.available(op, b, d)\n"
        "new = sorted(set(sys.modules) - before)\n"
        "assert not new, new\n"
        "assert not any(m.startswith(('triton', 'superexperts_kernels._triton', 'superexperts_kernels.reference'))"
        " for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def attention_inputs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 6, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g)
    mask = torch.rand(1, 1, 6, 6, generator=g) < 0.7
    return q, k, mask


@requires_native
def test_a_call_runs_on_a_backend_that_honours_its_arguments(monkeypatch):
    """native serves CPU calls but not `attn_mask`/`softcap`: those go to the reference, with
    one warning; forcing native for them is an error that names the argument."""
    monkeypatch.setattr(_backend, "_warned", set())
    q, k, mask = attention_inputs()
    assert ATTENTION.choose("cpu") == "native"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sk.attention_with_sink(q, k, k, causal=False, attn_mask=mask)
        sk.attention_with_sink(q, k, k, causal=False, attn_mask=mask)
    assert [str(w.message) for w in caught] == [
        "superexperts.attention_with_sink on cpu: the native backend cannot express `attn_mask`; such calls run "
        "on the reference backend (slower, same numbers)"
    ]
    with sk.use_backend("attention_with_sink", "cpu", "reference"):
        want = sk.attention_with_sink(q, k, k, causal=False, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with sk.use_backend("attention_with_sink", "cpu", "native"):
        with pytest.raises(ValueError, match="backend 'native'.*does not support `softcap`; supported by: reference"):
            sk.attention_with_sink(q, k, k, softcap=3.0)
        sk.attention_with_sink(q, k, k)  # what native honours still runs there

    # Every backend honours with_stats=False: it stays on native, without a warning.
    x, w = torch.randn(5, 8), torch.randn(2, 12, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DOWN_PROJ.choose("cpu", frozenset({"with_stats"})) == "native"
        sk.moe_down_proj_profile(x, w, torch.tensor([2, 5], dtype=torch.int32), with_stats=False)


def test_only_options_away_from_their_defaults_reach_the_implementation(monkeypatch):
    seen = []
    monkeypatch.setitem(ATTENTION._resolved, "reference", lambda *args, **options: seen.append(options) or _empty(args[0]))
    q, k, mask = attention_inputs()
    with sk.use_backend("attention_with_sink", "cpu", "reference"):
        sk.attention_with_sink(q, k, k)
        sk.attention_with_sink(q, k, k, causal=False, attn_mask=mask, softcap=2.0)
    assert seen[0] == {} and set(seen[1]) == {"attn_mask", "softcap"} and seen[1]["softcap"] == 2.0


def _empty(q):
    return torch.zeros_like(q), torch.zeros(q.shape[:3])


def test_environment_and_unknown_names(monkeypatch):
    monkeypatch.setenv("SUPEREXPERTS_CPU_BACKEND", "reference")
    assert sk.backends()["moe_down_proj_profile"]["cpu"] == "reference"
    monkeypatch.setenv("SUPEREXPERTS_CPU_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SUPEREXPERTS_CPU_BACKEND"):
        _backend.select("moe_down_proj_profile", "cpu")
    monkeypatch.delenv("SUPEREXPERTS_CPU_BACKEND")
    with pytest.raises(ValueError, match="unknown op"):
        sk.set_backend("no_such_op", "cpu", "reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.set_backend("moe_down_proj_profile", "cpu", "nonsense")
