"""The native backend (C++ CPU kernels, CUDA when built, from csrc/) against the references.

Same case matrices as the Triton tests (imported from their test modules), plus what is
particular to the native kernels: several column / row / key blocks, experts split between
threads, ties and NaN in the statistics. The stats must be exactly those of the ``y`` the
native kernel wrote; ``y`` and ``o`` within dtype tolerance of the references. Skipped when
the extension is not built.
"""

import dataclasses
import itertools

import pytest
import test_attention_with_sink as attn_tests
import test_moe_down_proj_profile as dp_tests
import torch
from conftest import HAS_CUDA

import superexperts_kernels as sk
from superexperts_kernels import native
from superexperts_kernels.reference.attention import attention_with_sink_reference
from superexperts_kernels.reference.down_proj import moe_down_proj_profile_reference

INFO = native.info()
pytestmark = pytest.mark.skipif(not INFO["built"], reason=f"native extension not built ({INFO['error']})")
requires_native_cuda = pytest.mark.skipif(
    not (HAS_CUDA and INFO["cuda"]), reason="needs a CUDA device and the extension built with CUDA"
)

DP = "moe_down_proj_profile"
ATTN = "attention_with_sink"
DTYPES = dp_tests.DTYPES
dtype_id = dict(ids=lambda d: str(d).replace("torch.", ""))


@pytest.fixture
def threads(request):
    """Run the test with `request.param` ATen threads (the native kernels split work by them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_info_and_default_backend():
    assert INFO["cpu_capability"] in ("avx2", "default")
    assert INFO["device_types"] == {DP: ["cpu", "cuda"] if INFO["cuda"] else ["cpu"], ATTN: ["cpu"]}
    table = sk.backends()
    assert table[DP]["cpu"] == table[ATTN]["cpu"] == "native"


# --------------------------------------------------------------------------- moe_down_proj_profile

# (name, rows per expert, H, I, tail): more than one 256-channel block and 128-row block, and
# one expert holding every row (split between threads).
NATIVE_CASES = [
    ("blocks_ragged", [0, 70, 130, 1, 0], 300, 100, 5),
    ("one_expert_many_rows", [203], 260, 40, 0),
    ("experts_of_one_row", [1] * 9, 129, 33, 2),
]


def run_dp(device, *args, **kwargs):
    with sk.use_backend(DP, torch.device(device).type, "native"):
        return sk.moe_down_proj_profile(*args, **kwargs)


def check_dp(out, x, offsets, counts, tail, hidden, ref, dtype):
    """y close to the reference; stats exactly those of the native y."""
    rtol, atol = dp_tests.TOL[dtype]
    torch.testing.assert_close(out.y.cpu().float(), ref[0].float(), rtol=rtol, atol=atol)
    assert out.y.dtype == dtype and out.y.shape == (sum(counts) + tail, hidden)
    assert torch.all(out.y[sum(counts):] == 0)
    absmax, argmax, in_absmax, channel = dp_tests.stats_of(out.y, x, offsets, hidden)
    assert torch.equal(out.out_absmax.cpu(), absmax)
    assert torch.equal(out.out_argmax.cpu(), argmax)
    assert torch.equal(out.in_absmax.cpu(), in_absmax)
    if out.channel_absmax.shape[1]:
        assert torch.equal(out.channel_absmax.cpu(), channel)
    assert torch.equal(out.rows.cpu(), torch.tensor(counts))
    torch.testing.assert_close(out.out_absmax.cpu(), ref[1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
@pytest.mark.parametrize("case", dp_tests.CASES + NATIVE_CASES, ids=lambda c: c[0])
def test_down_proj_matches_reference(case, dtype, threads):
    _, counts, hidden, inter, tail = case
    x, w, offsets, _ = dp_tests.make_inputs(counts, hidden, inter, tail, dtype, "cpu")
    out = run_dp("cpu", x, w, offsets, channel_stats=True)
    ref = moe_down_proj_profile_reference(x, w, offsets, None, None, False, True)
    check_dp(out, x, offsets, counts, tail, hidden, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
def test_down_proj_bias_transposed_row_token(dtype):
    counts, hidden, inter, tail = [2, 0, 79, 1, 6], 140, 40, 2
    x, w_t, offsets, bias = dp_tests.make_inputs(counts, hidden, inter, tail, dtype, "cpu", bias=True, transposed=True)
    row_token = torch.randperm(x.shape[0])
    out = run_dp("cpu", x, w_t, offsets, bias, row_token, w_transposed=True, channel_stats=True)
    plain = run_dp("cpu", x, w_t.transpose(1, 2).contiguous(), offsets, bias, channel_stats=True)
    ref = moe_down_proj_profile_reference(x, w_t, offsets, bias, None, True, True)
    check_dp(plain, x, offsets, counts, tail, hidden, ref, dtype)
    # The transposed layout takes another GEMM path: y may differ in the last bit, the stats
    # are those of its own y, with the row reported as its token.
    rtol, atol = dp_tests.TOL[dtype]
    torch.testing.assert_close(out.y, plain.y, rtol=rtol, atol=atol)
    absmax, argmax, in_absmax, channel = dp_tests.stats_of(out.y, x, offsets, hidden)
    has_rows = torch.tensor(counts) > 0
    assert torch.equal(out.out_absmax, absmax) and torch.equal(out.channel_absmax, channel)
    assert torch.equal(out.out_argmax[:, 0], torch.where(has_rows, row_token[argmax[:, 0].clamp(min=0)], -1))
    assert torch.equal(out.out_argmax[:, 1], argmax[:, 1])


@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
def test_down_proj_without_stats_writes_same_y(dtype):
    x, w, offsets, bias = dp_tests.make_inputs([3, 0, 70, 1], 150, 40, 1, dtype, "cpu", bias=True)
    with_stats = torch.ops.superexperts.moe_down_proj_profile_native(x, w, offsets, bias, None, False, True)
    no_stats = torch.ops.superexperts.moe_down_proj_profile_native(x, w, offsets, bias, None, False, True, with_stats=False)
    assert torch.equal(with_stats[0], no_stats[0])
    assert torch.all(no_stats[1] == 0) and torch.all(no_stats[2] == -1) and torch.all(no_stats[5] == 0)
    assert torch.equal(no_stats[4], with_stats[4])


def identity_layer(num_rows, hidden, dtype):
    """One expert whose weight is the identity: y = x, so the test plants y directly."""
    x = torch.zeros(num_rows, hidden, dtype=dtype)
    w = torch.eye(hidden, dtype=dtype)[None]
    return x, w, torch.tensor([num_rows], dtype=torch.int32)


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_down_proj_ties_pick_first_in_row_major_order(threads):
    """Equal maxima in other column blocks and other threads' pieces: the first row wins,
    then the first channel, whichever block or piece is reduced first."""
    x, w, offsets = identity_layer(12, 600, torch.bfloat16)
    x[2, 520] = -9.0  # third 256-channel block, first piece
    x[9, 0] = 9.0  # first block, last piece
    x[2, 530] = 9.0
    out = run_dp("cpu", x, w, offsets, channel_stats=True)
    assert out.out_argmax.tolist() == [[2, 520]] and out.out_absmax.tolist() == [9.0]

    ones = run_dp("cpu", torch.ones(40, 2), torch.ones(2, 300, 2), torch.tensor([3, 40], dtype=torch.int32))
    assert ones.out_argmax.tolist() == [[0, 0], [3, 0]] and ones.out_absmax.tolist() == [2.0, 2.0]


def test_down_proj_nan_shows_in_stats():
    """A NaN in y is the max (as torch.max has it), located at its first occurrence."""
    x, w, offsets = identity_layer(6, 20, torch.float32)
    x[:, 3] = 1.0
    x[4, 7] = float("nan")  # y[4, :] is all NaN: NaN * 0 in every dot product
    out = run_dp("cpu", x, w, offsets, channel_stats=True)
    assert out.out_absmax.isnan().all() and out.in_absmax.isnan().all()
    assert out.out_argmax.tolist() == [[4, 0]]
    assert out.channel_absmax.isnan().all()


def test_down_proj_empty_and_unrouted():
    x, w, offsets, _ = dp_tests.make_inputs([0, 0, 0], 8, 8, 0, torch.float32, "cpu")
    out = run_dp("cpu", x, w, offsets, channel_stats=True)
    assert out.y.shape == (0, 8) and torch.equal(out.out_argmax, torch.full((3, 2), -1))
    x, w, offsets, _ = dp_tests.make_inputs([0, 0], 8, 8, 5, torch.float16, "cpu")
    out = run_dp("cpu", x, w, offsets)
    assert torch.all(out.y == 0) and torch.all(out.rows == 0) and torch.all(out.out_absmax == 0)


def test_down_proj_opcheck():
    x, w, offsets, bias = dp_tests.make_inputs([3, 0, 9, 1], 16, 24, 2, torch.float32, "cpu", bias=True)
    row_token = torch.arange(x.shape[0]).flip(0)
    op = torch.ops.superexperts.moe_down_proj_profile_native.default
    torch.library.opcheck(op, (x, w, offsets, bias, row_token, False, True, True))
    torch.library.opcheck(op, (x.bfloat16(), w.transpose(1, 2).bfloat16(), offsets, None, None, True, False, False))
    torch.library.opcheck(op, (x, w, offsets))


def same_error(native_call, python_call, native_name, python_name):
    """Both calls raise the same exception type with the same message after the op name."""
    with pytest.raises((TypeError, ValueError)) as native_error:
        native_call()
    with pytest.raises((TypeError, ValueError)) as python_error:
        python_call()
    assert native_error.type is python_error.type
    assert str(native_error.value).replace(native_name, python_name) == str(python_error.value)


def test_down_proj_native_op_checks_give_the_python_messages():
    """The C++ guards of the native op (for direct calls) say what the public op says."""
    cases, good = dp_tests._bad_cases()
    checked = 0
    for _, _, override in cases:
        kwargs = {**good, **override}
        if not all(isinstance(v, torch.Tensor) for v in kwargs.values()):
            continue  # the dispatcher itself rejects non-tensors
        if "row_weight" in override:
            continue  # the native op has no row_weight argument
        args = (kwargs["x"], kwargs["w_down"], kwargs["offsets"], kwargs["bias"], kwargs.get("row_token"))
        same_error(
            lambda: torch.ops.superexperts.moe_down_proj_profile_native(*args),
            lambda: torch.ops.superexperts.moe_down_proj_profile(*args),
            "superexperts::moe_down_proj_profile_native",
            "superexperts.moe_down_proj_profile",
        )
        checked += 1
    assert checked >= 15


def test_down_proj_public_op_validates_before_dispatch():
    cases, good = dp_tests._bad_cases()
    with sk.use_backend(DP, "cpu", "native"):
        for name, exc, override in cases:
            with pytest.raises(exc, match=f"^superexperts.moe_down_proj_profile: `{name}`"):
                sk.moe_down_proj_profile(**{**good, **override})


@requires_native_cuda
@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
@pytest.mark.parametrize("case", dp_tests.CASES + NATIVE_CASES, ids=lambda c: c[0])
def test_down_proj_cuda_matches_reference(case, dtype):
    _, counts, hidden, inter, tail = case
    x, w, offsets, _ = dp_tests.make_inputs(counts, hidden, inter, tail, dtype, "cuda")
    out = torch.ops.superexperts.moe_down_proj_profile_native(x, w, offsets, None, None, False, True)
    ref = moe_down_proj_profile_reference(x.cpu(), w.cpu(), offsets.cpu(), None, None, False, True)
    check_dp(sk.DownProjProfile(*out), x.cpu(), offsets.cpu(), counts, tail, hidden, ref, dtype)


# --------------------------------------------------------------------------- attention_with_sink

Case = attn_tests.Case


def make_attn_inputs(case: Case, seed=0):
    """attn_tests.make_inputs, plus padding="full": random padding and the last batch entry's
    keys all masked (every query of it sees no key)."""
    if case.padding != "full":
        return attn_tests.make_inputs(case, "cpu", seed)
    q, k, v, mask, logits = attn_tests.make_inputs(dataclasses.replace(case, padding="random"), "cpu", seed)
    mask[-1] = False
    return q, k, v, mask, logits


def run_attn(case: Case, q, k, v, mask, logits, scale):
    with sk.use_backend(ATTN, "cpu", "native"):
        return sk.attention_with_sink(
            q, k, v, scale, causal=case.causal, num_sink_tokens=case.num_sink, sliding_window=case.window,
            key_padding_mask=mask, sink_logits=logits,
        )


@pytest.mark.parametrize("case", attn_tests.CASES, ids=lambda c: c.name)
def test_attention_matches_oracle(case):
    q, k, v, mask, logits = make_attn_inputs(case)
    scale = case.head_dim**-0.5
    out = run_attn(case, q, k, v, mask, logits, scale)
    attn_tests.check_against_oracle(case, out, q, k, v, mask, logits, scale)


# Every (B, heads, T, D) with two of the mask variants below, dtypes in turn: windows that
# drop the sink (W=5 with 4 sink tokens), fully masked rows (left padding, padding="full"),
# learned sinks, non-causal with padding, W=1, decode (T < Tk) and T = Tk.
VARIANTS = [
    dict(),
    dict(causal=False, padding="random", sink_logits=True),
    dict(num_sink=4, window=5, padding="left"),
    dict(window=40, sink_logits=True, padding="full"),
    dict(num_sink=4, padding="left", sink_logits=True),
    dict(causal=False),
    dict(num_sink=4, window=1),
    dict(window=17, padding="random"),
]
GRID = [
    Case(
        f"b{b}_h{hq}x{hkv}_t{t}_k{t + extra}_d{d}_v{n}",
        b, (hq, hkv), t, t + extra, d, DTYPES[n % 3], **VARIANTS[n % len(VARIANTS)],
    )
    for n, (b, (hq, hkv), t, d, extra) in enumerate(
        (b, h, t, d, extra)
        for b, h, t, d in itertools.product((1, 2), ((4, 4), (8, 2)), (1, 17, 64, 130), (16, 64, 128))
        for extra in (0, 20)
    )
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.name)
def test_attention_grid_matches_oracle(case):
    q, k, v, mask, logits = make_attn_inputs(case, seed=1)
    out = run_attn(case, q, k, v, mask, logits, 0.2)
    attn_tests.check_against_oracle(case, out, q, k, v, mask, logits, 0.2)


def test_attention_grid_covers_the_special_rows():
    """The grid really holds windows that drop the sink and queries that see no key."""
    dropped = masked = False
    for case in GRID:
        q, k, v, mask, logits = make_attn_inputs(case, seed=1)
        _, sink, visible = attn_tests.oracle(q, k, v, 1.0, case.causal, case.num_sink, case.window, mask, logits)
        dropped |= bool((sink == 0).any() & visible[..., : case.num_sink].any())
        masked |= bool((~visible.any(-1)).any())
    assert dropped and masked


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
def test_attention_many_blocks_matches_reference(dtype, threads):
    """Several query and key blocks per head; the result does not depend on the threads."""
    case = Case("long", 2, (8, 2), 300, 333, 64, dtype, num_sink=4, window=200, padding="random", sink_logits=True)
    q, k, v, mask, logits = make_attn_inputs(case)
    out = run_attn(case, q, k, v, mask, logits, 0.125)
    ref = attention_with_sink_reference(q, k, v, 0.125, True, 4, 200, mask, logits)
    rtol, atol = attn_tests.TOL_O[dtype]
    torch.testing.assert_close(out.o.float(), ref[0].float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.sink_mass, ref[1], rtol=attn_tests.TOL_SINK[0], atol=attn_tests.TOL_SINK[1])
    torch.set_num_threads(1)
    single = run_attn(case, q, k, v, mask, logits, 0.125)
    assert torch.equal(single.o, out.o) and torch.equal(single.sink_mass, out.sink_mass)


def test_attention_noncontiguous_inputs_and_empty_queries():
    case = Case("strided", 2, (4, 2), 17, 24, 16, torch.float16, num_sink=4)
    q, k, v, _, _ = make_attn_inputs(case)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out = run_attn(case, qt, kt, vt, None, None, 0.25)
    attn_tests.check_against_oracle(case, out, q, k, v, None, None, 0.25)
    empty = run_attn(case, q[:, :, :0], k, v, None, None, 0.25)
    assert empty.o.shape == (2, 4, 0, 16) and empty.sink_mass.shape == (2, 4, 0)


def test_attention_opcheck():
    case = Case("op", 1, (4, 2), 17, 20, 16, torch.float32, num_sink=2, window=9, padding="random", sink_logits=True)
    q, k, v, mask, logits = make_attn_inputs(case)
    op = torch.ops.superexperts.attention_with_sink_native.default
    torch.library.opcheck(op, (q, k, v, 0.25, True, 2, 9, mask, logits))
    torch.library.opcheck(op, (q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25, False))


def test_attention_native_op_checks_give_the_python_messages():
    cases, good = attn_tests._bad_cases()
    native_args = [n for n in good if n not in ("softcap", "attn_mask")]  # the native op does not take them
    checked = 0
    for _, exc, override in cases:
        if any(n not in native_args for n in override):
            continue
        if exc is TypeError and any(n in attn_tests.SCALARS or not isinstance(x, torch.Tensor) for n, x in override.items()):
            continue  # the dispatcher itself rejects arguments of the wrong Python type
        args = [{**good, **override}[n] for n in native_args]
        same_error(
            lambda: torch.ops.superexperts.attention_with_sink_native(*args),
            lambda: torch.ops.superexperts.attention_with_sink(*args),
            "superexperts::attention_with_sink_native",
            "superexperts.attention_with_sink",
        )
        checked += 1
    assert checked >= 15


def test_attention_public_op_validates_before_dispatch():
    cases, good = attn_tests._bad_cases()
    with sk.use_backend(ATTN, "cpu", "native"):
        for name, exc, override in cases:
            with pytest.raises(exc, match=f"^superexperts.attention_with_sink: `{name}`"):
                sk.attention_with_sink(**{**good, **override})


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_inputs_that_require_grad_on_worker_threads(threads):
    """Model weights require grad; the kernels' worker threads must run below autograd too,
    and a backward through the forward-only ops must fail loudly."""
    x, w, offsets, _ = dp_tests.make_inputs([5, 0, 40, 3], 16, 24, 2, torch.float32, "cpu")
    w.requires_grad_(True)
    out = run_dp("cpu", x, w, offsets)
    ref = moe_down_proj_profile_reference(x, w.detach(), offsets, None, None, False, False)
    torch.testing.assert_close(out.y.detach(), ref[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.y.sum().backward()

    q = torch.randn(1, 4, 150, 16, requires_grad=True)
    kv = torch.randn(1, 2, 150, 16, requires_grad=True)
    with sk.use_backend("attention_with_sink", "cpu", "native"):
        o, mass = sk.attention_with_sink(q, kv, kv)
    want = attention_with_sink_reference(q.detach(), kv.detach(), kv.detach(), 0.25)
    torch.testing.assert_close(o.detach(), want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mass, want[1], rtol=1e-4, atol=1e-5)
