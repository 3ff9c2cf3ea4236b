"""moe_down_proj_profile: every backend against the pure-torch reference."""

import importlib

import pytest
import torch
from conftest import KERNEL_DEVICE, requires_triton

import superexperts_kernels as sk
from superexperts_kernels import native
from superexperts_kernels.reference.down_proj import moe_down_proj_profile_reference

OP = "moe_down_proj_profile"

# (name, rows per expert, H, I, tail rows that belong to no expert)
CASES = [
    ("one_expert_one_row", [1], 8, 8, 0),
    ("ragged_with_empty_and_tail", [0, 5, 1, 0], 24, 40, 3),
    ("s_not_multiple_of_tile", [7, 13, 1, 9, 0, 4, 2, 1], 24, 40, 0),
    ("sixteen_random", [3, 0, 11, 1, 0, 0, 6, 2, 17, 1, 0, 5, 1, 1, 0, 2], 48, 72, 0),
    ("sixty_four_mostly_tiny", [1, 0, 2, 0] * 16, 20, 36, 1),
    ("all_rows_one_expert", [0, 50, 0], 33, 17, 0),
    ("wide_k", [4, 9], 16, 130, 2),
]

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(counts, hidden, inter, tail, dtype, device, *, bias=False, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_rows = sum(counts) + tail
    x = torch.randn(num_rows, inter, generator=g)
    shape = (len(counts), inter, hidden) if transposed else (len(counts), hidden, inter)
    w = torch.randn(*shape, generator=g) / inter**0.5
    b = torch.randn(len(counts), hidden, generator=g) if bias else None
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    to = dict(dtype=dtype, device=device)
    return x.to(**to), w.to(**to), offsets.to(device), (b.to(**to) if bias else None)


def stats_of(y, x, offsets, hidden):
    """Per-expert stats of given y and x by brute force (first occurrence wins ties)."""
    ends = offsets.tolist()
    num_experts = len(ends)
    absmax = torch.zeros(num_experts)
    argmax = torch.full((num_experts, 2), -1, dtype=torch.int64)
    in_absmax = torch.zeros(num_experts)
    channel = torch.zeros(num_experts, hidden)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            a = y[start:end].float().abs().cpu()
            flat = int(a.argmax())
            absmax[e] = a.view(-1)[flat]
            argmax[e] = torch.tensor([start + flat // hidden, flat % hidden])
            in_absmax[e] = x[start:end].float().abs().max().cpu()
            channel[e] = a.amax(0)
        start = end
    return absmax, argmax, in_absmax, channel


requires_native = pytest.mark.skipif(not native.BUILT, reason="native extension not built")


def backend_params():
    return [
        pytest.param("reference", id="reference"),
        pytest.param("triton", id="triton", marks=requires_triton),
    ]


def run(backend, device, *args, **kwargs):
    with sk.use_backend(OP, torch.device(device).type, backend):
        return sk.moe_down_proj_profile(*args, **kwargs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_reference(backend, dtype, case):
    _, counts, hidden, inter, tail = case
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x, w, offsets, _ = make_inputs(counts, hidden, inter, tail, dtype, device)
    out = run(backend, device, x, w, offsets, channel_stats=True)
    ref = moe_down_proj_profile_reference(x.cpu(), w.cpu(), offsets.cpu(), None, None, False, True)

    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.y.cpu().float(), ref[0].float(), rtol=rtol, atol=atol)
    assert out.y.dtype == dtype and out.y.shape == (sum(counts) + tail, hidden)
    assert torch.all(out.y[sum(counts):] == 0), "rows past offsets[-1] must be zero"

    # Stats are exactly those of the values written to y.
    absmax, argmax, in_absmax, channel = stats_of(out.y, x, offsets, hidden)
    assert torch.equal(out.out_absmax.cpu(), absmax)
    assert torch.equal(out.in_absmax.cpu(), in_absmax)
    assert torch.equal(out.channel_absmax.cpu(), channel)
    assert torch.equal(out.rows.cpu(), torch.tensor(counts))
    # Location: where a value differs by rounding from the reference it may legitimately
    # move, so check that it holds the max rather than comparing with the reference.
    assert torch.equal(out.out_argmax.cpu(), argmax)
    for e, (row, ch) in enumerate(out.out_argmax.tolist()):
        if counts[e] == 0:
            assert row == ch == -1 and out.out_absmax[e] == 0
        else:
            assert out.y[row, ch].abs().float().item() == out.out_absmax[e].item()

    # And the stats are within dtype tolerance of the reference's.
    torch.testing.assert_close(out.out_absmax.cpu(), ref[1], rtol=rtol, atol=atol)
    assert torch.equal(out.in_absmax.cpu(), ref[3])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_bias_transposed_row_token(backend, dtype):
    counts, hidden, inter, tail = [2, 0, 19, 1, 6], 24, 40, 2
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x, w_t, offsets, bias = make_inputs(counts, hidden, inter, tail, dtype, device, bias=True, transposed=True)
    row_token = torch.randperm(x.shape[0]).to(device)
    out = run(backend, device, x, w_t, offsets, bias, row_token, w_transposed=True)
    plain = run(backend, device, x, w_t.transpose(1, 2).contiguous(), offsets, bias)
    ref = moe_down_proj_profile_reference(x.cpu(), w_t.cpu(), offsets.cpu(), bias.cpu(), None, True, False)

    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.y.cpu().float(), ref[0].float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.y, plain.y, rtol=rtol, atol=atol)
    absmax, argmax, _, _ = stats_of(out.y, x, offsets, hidden)
    assert torch.equal(out.out_absmax.cpu(), absmax)
    has_rows = torch.tensor(counts) > 0
    expected_token = torch.where(has_rows, row_token.cpu()[argmax[:, 0].clamp(min=0)], -1)
    assert torch.equal(out.out_argmax[:, 0].cpu(), expected_token)
    assert torch.equal(out.out_argmax[:, 1].cpu(), argmax[:, 1])
    assert out.channel_absmax.shape == (len(counts), 0)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_input(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x, w, offsets, _ = make_inputs([0, 0, 0], 8, 8, 0, torch.float32, device)
    out = run(backend, device, x, w, offsets, channel_stats=True)
    assert out.y.shape == (0, 8)
    assert torch.equal(out.out_argmax.cpu(), torch.full((3, 2), -1))
    assert torch.all(out.out_absmax == 0) and torch.all(out.rows == 0)


@requires_triton
def test_triton_stats_off_writes_same_y():
    from superexperts_kernels._triton.down_proj import moe_down_proj_profile_triton

    x, w, offsets, _ = make_inputs([3, 0, 20, 1], 24, 40, 1, torch.float16, KERNEL_DEVICE)
    with_stats = moe_down_proj_profile_triton(x, w, offsets, None, None, False, False)
    no_stats = moe_down_proj_profile_triton(x, w, offsets, None, None, False, False, with_stats=False)
    assert torch.equal(with_stats[0], no_stats[0])
    assert torch.all(no_stats[1] == 0)


@pytest.mark.parametrize("backend", backend_params())
def test_ties_pick_first_occurrence(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x = torch.ones(40, 2, device=device)
    w = torch.ones(2, 35, 2, device=device)
    offsets = torch.tensor([3, 40], dtype=torch.int32, device=device)
    out = run(backend, device, x, w, offsets)
    assert out.out_argmax.tolist() == [[0, 0], [3, 0]]
    assert out.out_absmax.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x, w, offsets, bias = make_inputs([3, 0, 9, 1], 16, 24, 2, torch.float32, device, bias=True)
    with sk.use_backend(OP, torch.device(device).type, backend):
        torch.library.opcheck(torch.ops.superexperts.moe_down_proj_profile.default, (x, w, offsets, bias, None, False, True))
        torch.library.opcheck(torch.ops.superexperts.moe_down_proj_profile.default, (x, w, offsets))


def test_torch_compile_fullgraph():
    x, w, offsets, _ = make_inputs([3, 0, 9, 1], 16, 24, 2, torch.float32, "cpu")

    def f(x, w, offsets):
        out = torch.ops.superexperts.moe_down_proj_profile(x, w, offsets, None, None, False, False)
        return out[0] * 2, out[1].max(), out[2]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x, w, offsets)
    want = f(x, w, offsets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _bad_cases():
    x, w, offsets, bias = make_inputs([2, 3], 8, 12, 1, torch.float32, "cpu", bias=True)
    return [
        ("x", TypeError, dict(x=x.numpy())),
        ("x", ValueError, dict(x=x[0])),
        ("x", TypeError, dict(x=x.to(torch.int32), w_down=w.to(torch.int32))),
        ("w_down", ValueError, dict(w_down=w[0])),
        ("w_down", ValueError, dict(w_down=w[:, :, :5])),
        ("w_down", TypeError, dict(w_down=w.half())),
        ("w_down", ValueError, dict(w_down=w.to("meta"))),
        ("w_down", ValueError, dict(w_down=w[:0], offsets=offsets[:0])),
        ("offsets", TypeError, dict(offsets=offsets.float())),
        ("offsets", ValueError, dict(offsets=offsets[:1])),
        ("offsets", ValueError, dict(offsets=offsets.view(1, 2))),
        ("offsets", ValueError, dict(offsets=torch.tensor([4, 2], dtype=torch.int32))),
        ("offsets", ValueError, dict(offsets=torch.tensor([2, 7], dtype=torch.int32))),
        ("offsets", ValueError, dict(offsets=torch.tensor([-1, 3], dtype=torch.int32))),
        ("bias", ValueError, dict(bias=bias[:, :3])),
        ("bias", TypeError, dict(bias=bias.half())),
        ("row_token", ValueError, dict(row_token=torch.arange(3))),
        ("row_token", TypeError, dict(row_token=torch.zeros(6))),
    ], dict(x=x, w_down=w, offsets=offsets, bias=bias)


@pytest.mark.parametrize("index", range(len(_bad_cases()[0])))
def test_bad_input_raises_naming_argument(index):
    cases, good = _bad_cases()
    name, exc, override = cases[index]
    kwargs = {**good, **override}
    with pytest.raises(exc, match=f"`{name}`"):
        sk.moe_down_proj_profile(**kwargs)


def test_bad_input_through_torch_ops():
    cases, good = _bad_cases()
    for name, exc, override in cases:
        kwargs = {**good, **override}
        if not all(isinstance(v, torch.Tensor) for v in kwargs.values()):
            continue  # the dispatcher itself rejects non-tensors
        args = (kwargs["x"], kwargs["w_down"], kwargs["offsets"], kwargs["bias"], kwargs.get("row_token"), False, False)
        with pytest.raises(exc, match=f"`{name}`"):
            torch.ops.superexperts.moe_down_proj_profile(*args)


def test_backends_report():
    table = sk.backends()
    assert table[OP]["cpu"] in ("reference", "native", "triton")
    with pytest.raises(ValueError, match="backend"):
        sk.set_backend(OP, "cpu", "nonsense")


@pytest.mark.parametrize("backend", backend_params())
def test_nan_is_the_max_at_its_first_occurrence(backend):
    """A NaN in y wins the max (as torch.max has it) and is located at its first occurrence."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x = torch.zeros(6, 16)
    x[:, 3] = 1.0
    x[4, 7] = float("nan")  # every entry of y[4] is NaN
    w = torch.zeros(2, 20, 16)
    w[:, :, 3] = torch.arange(20.0)
    offsets = torch.tensor([2, 6], dtype=torch.int32)
    out = run(backend, device, x.to(device), w.to(device), offsets.to(device), channel_stats=True)
    assert out.out_absmax[0].item() == 19.0 and out.out_absmax[1].isnan()
    assert out.out_argmax.tolist() == [[0, 19], [4, 0]]
    assert out.in_absmax[1].isnan() and out.channel_absmax[1].isnan().all()


def all_backend_params():
    return [*backend_params(), pytest.param("native", id="native", marks=requires_native)]


@pytest.mark.parametrize("backend", all_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_without_stats_same_y_rows_counted_stats_empty(backend, dtype):
    """with_stats=False: the same y; rows still counted; the other stats as for an expert without rows."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x, w, offsets, bias = make_inputs([3, 0, 9, 1], 16, 24, 2, dtype, device, bias=True)
    full = run(backend, device, x, w, offsets, bias, channel_stats=True)
    bare = run(backend, device, x, w, offsets, bias, channel_stats=True, with_stats=False)
    assert torch.equal(bare.y, full.y) and torch.equal(bare.rows, full.rows)
    assert torch.all(bare.out_absmax == 0) and torch.all(bare.in_absmax == 0)
    assert torch.all(bare.out_argmax == -1)
    assert bare.channel_absmax.shape == full.channel_absmax.shape and torch.all(bare.channel_absmax == 0)


def test_offsets_values_are_checked_unless_the_caller_opts_out(monkeypatch):
    """Direct calls get the offsets error; with check_offsets=False the op reads no value of
    `offsets` on the host (no device sync)."""
    x, w, _, _ = make_inputs([2, 3], 8, 12, 1, torch.float32, "cpu")
    bad = torch.tensor([4, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="`offsets` must be non-decreasing"):
        sk.moe_down_proj_profile(x, w, bad)
    with pytest.raises(ValueError, match="`offsets` must be non-decreasing"):
        torch.ops.superexperts.moe_down_proj_profile(x, w, bad)

    module = importlib.import_module("superexperts_kernels.moe_down_proj_profile")  # the package attribute is the function
    reads = []
    monkeypatch.setattr(module, "check_offsets_values", lambda *args: reads.append(args))
    good = torch.tensor([2, 5], dtype=torch.int32)
    sk.moe_down_proj_profile(x, w, good, check_offsets=False)
    assert reads == []
    sk.moe_down_proj_profile(x, w, good)
    assert len(reads) == 1
