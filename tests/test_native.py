"""The native backend (C++ CPU kernels, CUDA when built, from csrc/) against the references.

Same case matrices as the Triton tests (imported from their test modules), plus what is
particular to the native kernels: several column / row / key blocks, experts split between
threads, ties and NaN in the statistics. The stats must be exactly those of the ``y`` the
native kernel wrote; ``y`` and ``o`` within dtype tolerance of the references. Skipped when
the extension is not built.
"""

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(params=["float32", "input"])
def gemm_policy(request):
    """The CPU down projection's GEMMs on fp32 upcast blocks ("float32"), or in the input
    dtype ("input": torch's bf16/fp16 GEMM writing y, the path of CPUs with bf16/fp16
    instructions). fp32 inputs take the same path under both."""
    previous = native._native.set_cpu_gemm_policy(request.param)
    assert native._native.cpu_gemm_dtype("bfloat16") == ("bfloat16" if request.param == "input" else "float32")
    yield request.param
    native._native.set_cpu_gemm_policy(previous)


@pytest.fixture
def threads(request):
    """Run the test with `request.param` ATen threads (the native kernels split work by them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_info_and_default_backend():
    assert INFO["cpu_capability"] in ("default", "avx2", "avx512")
    assert INFO["cpu_gemm_dtype"]["float32"] == "float32"
    assert {INFO["cpu_gemm_dtype"]["bfloat16"], INFO["cpu_gemm_dtype"]["float16"]} <= {"float32", "bfloat16", "float16"}
    assert INFO["device_types"] == {DP: ["cpu", "cuda"] if INFO["cuda"] else ["cpu"], ATTN: ["cpu"]}
    table = sk.backends()
    assert table[DP]["cpu"] == table[ATTN]["cpu"] == "native"


# --------------------------------------------------------------------------- moe_down_proj_profile

# (name, rows per expert, H, I, tail): more than one 256-channel block and 128-row block, and
# one expert holding every row (split between threads); "wide_blocks" has several channel
# blocks on every GEMM path (256 channels upcast, 512 fp32, 1024 bf16/fp16 at 128 rows).
NATIVE_CASES = [
    ("blocks_ragged", [0, 70, 130, 1, 0], 300, 100, 5),
    ("one_expert_many_rows", [203], 260, 40, 0),
    ("experts_of_one_row", [1] * 9, 129, 33, 2),
    ("wide_blocks", [0, 131, 3, 1], 1100, 16, 1),
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


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
@pytest.mark.parametrize("case", dp_tests.CASES + NATIVE_CASES, ids=lambda c: c[0])
def test_down_proj_matches_reference(case, dtype, threads, gemm_policy):
    _, counts, hidden, inter, tail = case
    x, w, offsets, _ = dp_tests.make_inputs(counts, hidden, inter, tail, dtype, "cpu")
    out = run_dp("cpu", x, w, offsets, channel_stats=True)
    ref = moe_down_proj_profile_reference(x, w, offsets, None, None, False, True)
    check_dp(out, x, offsets, counts, tail, hidden, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
def test_down_proj_bias_transposed_row_token(dtype, gemm_policy):
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
def test_down_proj_without_stats_writes_same_y(dtype, gemm_policy):
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


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_down_proj_ties_pick_first_in_row_major_order(threads, gemm_policy):
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


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
def test_down_proj_nan_shows_in_stats(dtype, threads, gemm_policy):
    """A NaN in y is the max (as torch.max has it), located at its first occurrence; the other
    expert's stats stay those of its finite rows."""
    x, w, _ = identity_layer(140, 600, dtype)
    w, offsets = w.expand(2, -1, -1), torch.tensor([9, 140], dtype=torch.int32)
    x[:, 3] = 1.0
    x[5, 300] = 7.0
    x[133, 530] = float("nan")  # y[133, :] is all NaN: NaN * 0 in every dot product
    x[135, 10] = float("nan")
    out = run_dp("cpu", x, w, offsets, channel_stats=True)
    assert out.out_absmax.tolist()[0] == 7.0 and out.out_argmax.tolist()[0] == [5, 300]
    assert out.in_absmax.tolist()[0] == 7.0
    assert out.out_absmax[1].isnan() and out.in_absmax[1].isnan()
    assert out.out_argmax.tolist()[1] == [133, 0]
    assert out.channel_absmax[1].isnan().all() and not out.channel_absmax[0].isnan().any()
    assert torch.equal(out.rows, torch.tensor([9, 131]))


def test_down_proj_empty_and_unrouted(gemm_policy):
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


NAN_PLACES = ["q_row", "sink_key", "later_key", "masked_key", "scale", "sink_logit"]


@pytest.mark.parametrize("dtype", DTYPES, **dtype_id)
@pytest.mark.parametrize("where", NAN_PLACES)
def test_attention_nan_in_gives_nan_out(where, dtype):
    """A NaN in q, in a key a query sees, in `scale` or in a learned sink logit makes that
    query's output and sink mass NaN, as softmax does (issue 9); the other queries, and a NaN
    key that the padding mask hides, change nothing."""
    case = Case("nan", 2, (4, 2), 40, 40, 16, dtype, padding="random", sink_logits=where == "sink_logit")
    q, k, v, mask, logits = make_attn_inputs(case)
    mask[:, 0] = True
    scale = 0.25
    if where == "q_row":
        q[1, 2, 7, 3] = float("nan")
    elif where == "sink_key":
        k[0, 1, 0, 5] = float("nan")
    elif where in ("later_key", "masked_key"):
        k[1, 0, 20, 0] = float("nan")
        mask[1, 20] = where == "later_key"
    elif where == "scale":
        scale = float("nan")
    else:
        logits[3] = float("nan")
    out = run_attn(case, q, k, v, mask, logits, scale)

    # The queries whose softmax row holds a NaN: a NaN score on a visible key, or a NaN logit.
    scores = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) * scale
    visible = torch.ones(40, 40, dtype=torch.bool).tril() & mask[:, None, None, :]
    nan_rows = (scores.isnan() & visible).any(-1)
    if logits is not None:
        nan_rows |= logits.isnan()[None, :, None]
    assert bool(nan_rows.any()) == (where != "masked_key")
    assert torch.equal(out.sink_mass.isnan(), nan_rows)
    assert torch.equal(out.o.isnan().any(-1), nan_rows) and torch.equal(out.o.isnan().all(-1), nan_rows)
    want_o, want_sink, _ = attn_tests.oracle(q, k, v, 0.25, True, 1, None, mask, logits)
    rtol, atol = attn_tests.TOL_O[dtype]
    finite = ~nan_rows
    if where != "scale":
        torch.testing.assert_close(out.o[finite].double(), want_o[finite], rtol=rtol, atol=atol)
        torch.testing.assert_close(out.sink_mass[finite].double(), want_sink[finite], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- instruction sets


def test_cpu_capability_is_chosen_at_run_time_like_atens():
    """The vector loops run the instruction set ATen uses on this CPU (ATen's AVX2 or AVX512
    kernels: ours built for the same; anything else: the baseline copy)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("the per-instruction-set copies are built for x86-64 Linux (GCC)")
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    assert INFO["cpu_capability"] == expected


def test_only_the_instruction_set_files_use_wide_vector_registers():
    """No -m flag in the build: code that uses AVX registers is only the per-instruction-set
    copies of the loops (csrc/cpu_isa_*.cpp) and the fused MoE op's AVX2 micro-kernel
    (csrc/fused_moe_cpu.cpp), both reached through the choice made at run time, never a
    function that any other code links to."""
    objdump = shutil.which("objdump")
    if objdump is None or sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("needs objdump and an x86-64 Linux build")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", native._native.__file__],
                          capture_output=True, text=True, check=True).stdout
    wide, function = set(), None
    for line in text.splitlines():
        label = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if label:
            function = label.group(1)
        elif function and ("%ymm" in line or "%zmm" in line):
            wide.add(function)
    isa_only = re.compile(
        r"superexperts::cpu::\(anonymous namespace\)|superexperts::\(anonymous namespace\)::micro_kernel_avx2<"
        r"|at::vec::AVX2::|at::vec::AVX512::"
    )
    assert wide, "no AVX code at all: the per-instruction-set files were built without their target"
    assert [f for f in wide if not isa_only.search(f)] == []


LOWER_ISA_SCRIPT = """
import json, sys, torch
import superexperts_kernels as sk
from superexperts_kernels import native
sys.path.insert(0, {tests!r})
import test_moe_down_proj_profile as dp_tests
out = {{"capability": native.info()["cpu_capability"], "down_proj": [], "attention": []}}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x, w, offsets, bias = dp_tests.make_inputs([0, 70, 130, 1], 300, 100, 5, dtype, "cpu", bias=True)
    res = torch.ops.superexperts.moe_down_proj_profile_native(x, w, offsets, bias, None, False, True, True)
    brute = dp_tests.stats_of(res[0], x, offsets, 300)
    out["down_proj"].append([res[0].float().tolist(), [t.tolist() for t in res[1:4] + res[5:]], [t.tolist() for t in brute]])
    q, k, v = (torch.randn(1, h, 70, 32, generator=torch.Generator().manual_seed(h)).to(dtype) for h in (4, 2, 2))
    o, mass = torch.ops.superexperts.attention_with_sink_native(q, k, v, 0.2, True, 2)
    out["attention"].append([o.float().tolist(), mass.tolist()])
print(json.dumps(out))
"""


def test_baseline_instruction_set_gives_the_same_results():
    """ATEN_CPU_CAPABILITY=default lowers ATen and our loops to the baseline copy: the stats are
    exactly those of the y it writes, and y and attention agree with this process's to float
    rounding (torch's GEMMs and our exp differ in the last bits between instruction sets)."""
    tests_dir = str(Path(__file__).parent)
    script = LOWER_ISA_SCRIPT.format(tests=tests_dir)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    lowered = json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                        check=True).stdout.splitlines()[-1])
    here = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                     check=True).stdout.splitlines()[-1])
    assert lowered["capability"] == "default" and here["capability"] == INFO["cpu_capability"]
    for (y_low, stats_low, brute_low), (y_here, _, _) in zip(lowered["down_proj"], here["down_proj"]):
        assert stats_low == brute_low
        torch.testing.assert_close(torch.tensor(y_low), torch.tensor(y_here), rtol=1e-2, atol=1e-2)
    for (o_low, mass_low), (o_here, mass_here) in zip(lowered["attention"], here["attention"]):
        torch.testing.assert_close(torch.tensor(o_low), torch.tensor(o_here), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(torch.tensor(mass_low), torch.tensor(mass_here), rtol=1e-4, atol=1e-5)


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
