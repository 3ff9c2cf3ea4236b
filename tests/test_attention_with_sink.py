"""attention_with_sink: every backend against an independent eager oracle.

The oracle builds the full softmax matrix in float64 on tiny shapes, with the masks built
explicitly (``tril`` / ``triu`` diagonals) and learned sinks as an extra softmax column
(how GPT-OSS's eager attention does it), so it shares no code with the reference.
"""

import itertools
from dataclasses import dataclass

import pytest
import torch
from conftest import KERNEL_DEVICE, requires_cuda, requires_triton
from torch.utils._python_dispatch import TorchDispatchMode

import superexperts_kernels as sk
from superexperts_kernels.reference.attention import attention_with_sink_reference

OP = "attention_with_sink"

# o: one bf16 ulp near 2 is 2**-6; on CUDA the probabilities are also rounded to the
# input dtype before the P @ V product. sink_mass is fp32 from fp32 scores (products of
# fp16/bf16 inputs are exact in fp32), so it is tight for every dtype.
TOL_O = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
TOL_SINK = (1e-4, 1e-5)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: tuple[int, int]  # (Hq, Hkv)
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: torch.dtype
    num_sink: int = 1
    window: int | None = None
    causal: bool = True
    padding: str | None = None  # "left": last batch's first Tk // 3 keys masked; "random"
    sink_logits: bool = False


# Every value of every axis, and the pairs that interact: window x (sink excluded, decode,
# padding, learned sinks), GQA x decode, padding x fully masked rows, non-causal x padding.
CASES = [
    Case("basic", 1, (4, 4), 17, 17, 16, torch.float32),
    Case("gqa_window_drops_sink", 2, (8, 2), 64, 64, 64, torch.bfloat16, num_sink=4, window=24),
    Case("decode_sink_logits", 1, (4, 4), 1, 77, 128, torch.float16, sink_logits=True),
    Case("left_pad_fully_masked_rows_d48", 2, (4, 4), 130, 130, 48, torch.float32, num_sink=4, padding="left"),
    Case("noncausal_pad_logits_d80", 1, (8, 2), 17, 50, 80, torch.bfloat16, causal=False, padding="random", sink_logits=True),
    Case("prefill_chunk_everything", 2, (8, 2), 130, 150, 16, torch.float16, num_sink=4, window=40,
         padding="random", sink_logits=True),
    Case("noncausal_d128", 1, (4, 4), 64, 64, 128, torch.bfloat16, causal=False),
    Case("decode_window_drops_sink", 2, (4, 4), 1, 33, 64, torch.float32, num_sink=4, window=8, padding="random"),
    Case("fewer_keys_than_queries", 1, (4, 4), 17, 9, 16, torch.float32),
    Case("window_one", 1, (8, 2), 17, 17, 64, torch.float16, num_sink=4, window=1),
    # The window keeps sink keys 2 and 3 but not 0 and 1.
    Case("decode_gqa_window_part_sink_d80", 2, (8, 2), 1, 130, 80, torch.bfloat16, num_sink=4, window=128, sink_logits=True),
    Case("gqa_d128_logits", 1, (8, 2), 64, 64, 128, torch.float32, num_sink=4, sink_logits=True, padding="random"),
]


def make_inputs(case: Case, device, seed=0):
    """q, k, v with a planted sink (the first keys point where the queries point), the
    padding mask and the learned sink logits of `case`."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = case.heads
    b, t, tk, d = case.batch, case.seq_q, case.seq_k, case.head_dim
    u = torch.randn(d, generator=g)
    u = u / u.norm() * 2 * d**0.25  # q.k on the sink keys ~ 4 sqrt(D): scores ~ 4
    q = torch.randn(b, hq, t, d, generator=g) + u
    k = torch.randn(b, hkv, tk, d, generator=g)
    k[:, :, : case.num_sink] += u
    v = torch.randn(b, hkv, tk, d, generator=g)
    mask = None
    if case.padding == "left":
        mask = torch.ones(b, tk, dtype=torch.bool)
        mask[-1, : tk // 3] = False
    elif case.padding == "random":
        mask = torch.rand(b, tk, generator=g) < 0.8
    logits = torch.randn(hq, generator=g) * 2 if case.sink_logits else None
    to = dict(dtype=case.dtype, device=device)
    return (
        q.to(**to),
        k.to(**to),
        v.to(**to),
        mask.to(device) if mask is not None else None,
        logits.to(device) if logits is not None else None,
    )


def oracle(q, k, v, scale, causal, num_sink, window, key_padding_mask, sink_logits):
    """Full softmax matrix in float64; returns (o, sink_mass, visible)."""
    b, hq, t, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    k = k.cpu().double().repeat_interleave(hq // hkv, dim=1)
    v = v.cpu().double().repeat_interleave(hq // hkv, dim=1)
    s = q.cpu().double() @ k.transpose(-1, -2) * scale
    visible = torch.ones(t, tk, dtype=torch.bool)
    if causal:
        visible = visible.tril(diagonal=tk - t)
    if window is not None:
        visible = visible & torch.ones(t, tk, dtype=torch.bool).triu(diagonal=tk - t - window + 1)
    visible = visible.expand(b, hq, t, tk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.cpu()[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    if sink_logits is not None:
        s = torch.cat([s, sink_logits.cpu().double().view(1, hq, 1, 1).expand(b, hq, t, 1)], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    if sink_logits is not None:
        p = p[..., :-1]
    return p @ v, p[..., :num_sink].sum(-1), visible


def backend_params():
    return [
        pytest.param("reference", id="reference"),
        pytest.param("triton", id="triton", marks=requires_triton),
    ]


def all_backend_params():
    """The backends of `backend_params` and the native CPU kernel (tested at large in
    test_native.py; here for the cases every backend must agree on)."""
    from superexperts_kernels import native

    built = pytest.mark.skipif(not native.BUILT, reason="native extension not built")
    return [*backend_params(), pytest.param("native", id="native", marks=built)]


def device_of(backend):
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def run(backend, device, *args, **kwargs):
    with sk.use_backend(OP, torch.device(device).type, backend):
        return sk.attention_with_sink(*args, **kwargs)


def check_against_oracle(case, out, q, k, v, mask, logits, scale):
    want_o, want_sink, visible = oracle(q, k, v, scale, case.causal, case.num_sink, case.window, mask, logits)
    b, hq, t, d = q.shape
    assert out.o.shape == (b, hq, t, d) and out.o.dtype == q.dtype
    assert out.sink_mass.shape == (b, hq, t) and out.sink_mass.dtype == torch.float32
    o, sink = out.o.cpu(), out.sink_mass.cpu()
    assert torch.isfinite(o.float()).all() and torch.isfinite(sink).all()
    rtol, atol = TOL_O[q.dtype]
    torch.testing.assert_close(o.double(), want_o, rtol=rtol, atol=atol)
    torch.testing.assert_close(sink.double(), want_sink, rtol=TOL_SINK[0], atol=TOL_SINK[1])
    # Exact zeros: queries that see no sink key, and queries that see no key at all.
    no_sink = ~visible[..., : case.num_sink].any(-1)
    assert torch.all(sink[no_sink] == 0)
    no_key = ~visible.any(-1)
    assert torch.all(o[no_key] == 0)
    return no_sink, no_key


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_oracle(backend, case):
    device = device_of(backend)
    q, k, v, mask, logits = make_inputs(case, device)
    scale = case.head_dim**-0.5
    out = run(
        backend, device, q, k, v, scale, causal=case.causal, num_sink_tokens=case.num_sink,
        sliding_window=case.window, key_padding_mask=mask, sink_logits=logits,
    )
    check_against_oracle(case, out, q, k, v, mask, logits, scale)


def test_cases_cover_the_special_rows():
    """The case list really holds windows that drop all or part of the sink, fully masked
    rows, and sizeable sink masses."""
    dropped = partial = masked = False
    for case in CASES:
        q, k, v, mask, logits = make_inputs(case, "cpu")
        _, sink, visible = oracle(q, k, v, 1.0, case.causal, case.num_sink, case.window, mask, logits)
        sink_visible = visible[..., : case.num_sink]
        if case.window is not None and mask is None:
            dropped |= bool((~sink_visible.any(-1) & visible.any(-1)).any())
            partial |= bool((sink_visible.any(-1) & ~sink_visible.all(-1)).any())
        masked |= bool((~visible.any(-1)).any())
        assert sink.max() > 0.3 or not sink_visible.any(), case.name
    assert dropped and partial and masked


# Reference only (fast): a product of the axes that shape the masks.
GRID = [
    Case(f"t{t}_h{hq}x{hkv}_w{w}_n{n}_{pad}_{'logits' if sl else 'nolog'}_{'c' if c else 'nc'}",
         2, (hq, hkv), t, t + 20, 32, torch.float32, n, w, c, pad, sl)
    for t, (hq, hkv), w, n, pad, sl, c in itertools.product(
        (1, 17, 130), ((4, 4), (8, 2)), (None, 5, 40), (1, 4), (None, "left"), (False, True), (True, False)
    )
    if c or w is None
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.name)
def test_reference_grid(case):
    q, k, v, mask, logits = make_inputs(case, "cpu", seed=1)
    scale = 0.2
    out = run(
        "reference", "cpu", q, k, v, scale, causal=case.causal, num_sink_tokens=case.num_sink,
        sliding_window=case.window, key_padding_mask=mask, sink_logits=logits,
    )
    check_against_oracle(case, out, q, k, v, mask, logits, scale)


@requires_triton
@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
        {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    ],
    ids=["m32n16", "m16n32"],
)
def test_triton_tile_shapes(config):
    """Block skipping and the masked / unmasked key ranges hold for unequal tiles."""
    from superexperts_kernels._triton.attention import attention_with_sink_triton

    case = Case("tiles", 1, (4, 2), 70, 90, 16, torch.float32, num_sink=4, window=37, padding="random", sink_logits=True)
    q, k, v, mask, logits = make_inputs(case, KERNEL_DEVICE)
    o, sink = attention_with_sink_triton(q, k, v, 0.25, True, 4, 37, mask, logits, config=config)
    check_against_oracle(case, sk.SinkAttention(o, sink), q, k, v, mask, logits, 0.25)


@requires_triton
def test_triton_without_sink_output_writes_same_o():
    from superexperts_kernels._triton.attention import attention_with_sink_triton

    case = Case("nosink", 1, (4, 2), 33, 40, 16, torch.float16, num_sink=4, window=20)
    q, k, v, _, _ = make_inputs(case, KERNEL_DEVICE)
    with_sink = attention_with_sink_triton(q, k, v, 0.25, True, 4, 20, None, None)
    without = attention_with_sink_triton(q, k, v, 0.25, True, 4, 20, None, None, with_sink=False)
    assert torch.equal(with_sink[0], without[0])
    assert torch.all(without[1] == 0) and with_sink[1].max() > 0.1


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_long_sequence_default_config(dtype):
    case = Case("long", 1, (8, 2), 1024, 1536, 128, dtype, num_sink=4, window=700, padding="random", sink_logits=True)
    q, k, v, mask, logits = make_inputs(case, "cuda")
    out = run("triton", "cuda", q, k, v, causal=True, num_sink_tokens=4, sliding_window=700,
              key_padding_mask=mask, sink_logits=logits)
    check_against_oracle(case, out, q, k, v, mask, logits, 128**-0.5)


@pytest.mark.parametrize("backend", backend_params())
def test_noncontiguous_inputs_and_empty_queries(backend):
    """transformers hands over q / k / v as transposed views ``[B, T, H, D] -> [B, H, T, D]``."""
    device = device_of(backend)
    case = Case("strided", 2, (4, 2), 17, 24, 16, torch.float32, num_sink=4)
    q, k, v, _, _ = make_inputs(case, device)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    out = run(backend, device, qt, kt, vt, num_sink_tokens=4)
    check_against_oracle(case, out, q, k, v, None, None, 16**-0.5)
    empty = run(backend, device, q[:, :, :0], k, v)
    assert empty.o.shape == (2, 4, 0, 16) and empty.sink_mass.shape == (2, 4, 0)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _, _ = make_inputs(Case("s", 1, (4, 4), 9, 9, 64, torch.float32), "cpu")
    torch.testing.assert_close(sk.attention_with_sink(q, k, v), sk.attention_with_sink(q, k, v, 0.125))


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    device = device_of(backend)
    case = Case("op", 1, (4, 2), 17, 20, 16, torch.float32, num_sink=2, window=9, padding="random", sink_logits=True)
    q, k, v, mask, logits = make_inputs(case, device)
    op = torch.ops.superexperts.attention_with_sink.default
    with sk.use_backend(OP, torch.device(device).type, backend):
        torch.library.opcheck(op, (q, k, v, 0.25, True, 2, 9, mask, logits))
        torch.library.opcheck(op, (q, k, v, 0.25))


def test_torch_compile_fullgraph():
    q, k, v, mask, logits = make_inputs(Case("c", 2, (4, 2), 9, 12, 16, torch.float32, padding="random", sink_logits=True), "cpu")

    def f(q, k, v, mask, logits):
        o, sink = torch.ops.superexperts.attention_with_sink(q, k, v, 0.25, True, 1, None, mask, logits)
        return o * 2, sink.mean(dim=-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(q, k, v, mask, logits), f(q, k, v, mask, logits)):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- NaN and overflow

NAN_PLACES = ["q_row", "sink_key", "later_key", "masked_key", "scale", "sink_logit", "value", "q_overflow"]


def nan_places():
    for backend in all_backend_params():
        for where in NAN_PLACES:
            yield pytest.param(backend.values[0], where, marks=backend.marks, id=f"{backend.values[0]}-{where}")


def softmax_nan_rows(q, k, scale, mask, logits):
    """Bool ``[B, Hq, T]``: the queries whose float64 eager softmax row is NaN, among those that
    see a key (a row that sees none is 0 by the op's contract)."""
    hq, hkv, t, tk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    s = q.double() @ k.double().repeat_interleave(hq // hkv, dim=1).transpose(-1, -2) * scale
    visible = torch.ones(t, tk, dtype=torch.bool).tril(diagonal=tk - t) & mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    if logits is not None:
        s = torch.cat([s, logits.double().view(1, hq, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    return torch.softmax(s, dim=-1).isnan().any(-1) & (visible.any(-1) | (logits is not None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, where", nan_places())
def test_nan_in_gives_nan_out(backend, where, dtype):
    """A NaN in q, in a key a query sees, in `scale` or in a sink logit, or scores that are all
    -inf, make that query's o and sink_mass NaN, as eager softmax does; a NaN key the padding
    mask hides changes nothing, a NaN value reaches o only; the other queries are exact."""
    case = Case("nan", 2, (4, 2), 40, 40, 16, dtype, padding="random", sink_logits=where == "sink_logit")
    q, k, v, mask, logits = make_inputs(case, "cpu")
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
    elif where == "sink_logit":
        logits[3] = float("nan")
    elif where == "value":
        v[1, 0, 20, 0] = float("nan")
        mask[1, 20] = True
    else:  # q overflowed to +inf where the only key query 0 sees is negative: its score is -inf
        q[0, 1, 0] = 0.0
        q[0, 1, 0, 2] = float("inf")
        k[0, 0, 0, 2] = -1.0
    device = device_of(backend)
    to = dict(device=device)
    out = run(backend, device, q.to(**to), k.to(**to), v.to(**to), scale, causal=True,
              key_padding_mask=mask.to(device), sink_logits=logits.to(device) if logits is not None else None)
    o, sink = out.o.cpu(), out.sink_mass.cpu()

    nan_rows = softmax_nan_rows(q, k, scale, mask, logits)
    assert bool(nan_rows.any()) == (where not in ("masked_key", "value"))
    assert torch.equal(sink.isnan(), nan_rows)
    if where == "value":  # every query that sees key 20 of batch 1, kv head 0 (heads 0, 1)
        sees = torch.zeros_like(nan_rows)
        sees[1, :2, 20:] = True
        assert o.isnan().any(-1)[sees].all()
        nan_rows = o.isnan().any(-1)  # p = 0 times NaN may or may not make the others NaN
    else:
        assert torch.equal(o.isnan().any(-1), nan_rows) and torch.equal(o.isnan().all(-1), nan_rows)
    want_o, want_sink, _ = oracle(q, k, v.nan_to_num(0.0), scale if where != "scale" else 0.25, True, 1, None, mask, logits)
    keep = ~nan_rows
    torch.testing.assert_close(o[keep].double(), want_o[keep], rtol=TOL_O[dtype][0], atol=TOL_O[dtype][1])
    torch.testing.assert_close(sink[keep].double(), want_sink[keep], rtol=TOL_SINK[0], atol=TOL_SINK[1])


@pytest.mark.parametrize("backend", all_backend_params())
@pytest.mark.parametrize("plus_inf", [False, True], ids=["all_minus_inf", "plus_and_minus_inf"])
@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window6"])
def test_overflowed_scores_without_padding_give_nan(backend, window, plus_inf):
    """Without a padding mask the kernels know which queries see a key from the positions: a
    query whose visible scores all overflowed to -inf, or hold +inf, is NaN, a query that sees no key
    (q longer than k, bottom-right causal) is 0, the others are exact."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, t, 16, generator=g) for t in (12, 10, 10))
    q[0, 1, 5] = 0.0
    q[0, 1, 5, 2] = float("inf")  # query 5 (position 3) sees keys 0..3 (window: all within 6)
    k[0, 1, :4, 2] = -1.0
    if plus_inf:  # scores +inf and -inf: inf - inf in the softmax, NaN too
        k[0, 1, 2, 2] = 1.0
    device = device_of(backend)
    out = run(backend, device, q.to(device), k.to(device), v.to(device), 0.25, causal=True, sliding_window=window)
    o, sink = out.o.cpu(), out.sink_mass.cpu()
    nan_rows = torch.zeros(1, 2, 12, dtype=torch.bool)
    nan_rows[0, 1, 5] = True
    assert torch.equal(sink.isnan(), nan_rows) and torch.equal(o.isnan().all(-1), nan_rows)
    assert torch.all(o[0, :, :2] == 0) and torch.all(sink[0, :, :2] == 0)  # no key seen
    want_o, want_sink, _ = oracle(q, k, v, 0.25, True, 1, window, torch.ones(1, 10, dtype=torch.bool), None)
    keep = ~nan_rows
    torch.testing.assert_close(o[keep].double(), want_o[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sink[keep].double(), want_sink[keep], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- reference extras


class MaxNumel(TorchDispatchMode):
    """Largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_reference_chunks_queries():
    """A T = Tk = 4096 call never allocates T x Tk; chunks give the unchunked result."""
    g = torch.Generator().manual_seed(0)
    t, d, chunk = 4096, 16, 256
    q, k, v = (torch.randn(1, 1, t, d, generator=g) for _ in range(3))
    with MaxNumel() as mode:
        o, sink = attention_with_sink_reference(q, k, v, 0.25, chunk_size=chunk)
    assert mode.max_numel == chunk * t  # the scores of one chunk, nothing bigger
    assert torch.isfinite(o).all() and torch.all((sink > 0) & (sink <= 1))

    q, k, v, mask, logits = make_inputs(Case("chunks", 2, (8, 2), 300, 320, 16, torch.float32, 4, 50, True, "left", True), "cpu")
    args = (q, k, v, 0.25, True, 4, 50, mask, logits)
    with MaxNumel() as mode:
        small = attention_with_sink_reference(*args, chunk_size=64)
    assert mode.max_numel == 2 * 8 * 64 * 320
    whole = attention_with_sink_reference(*args, chunk_size=300)
    for a, b in zip(small, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:superexperts.attention_with_sink on cpu")
def test_attn_mask_and_softcap():
    """`attn_mask` (broadcast over size-1 dims) is ANDed with the other masks; softcap caps the
    scores before masking. Through the public op, which routes them to a backend that honours them."""
    case = Case("extras", 2, (4, 2), 17, 23, 16, torch.float32, num_sink=2, padding="random", sink_logits=True)
    q, k, v, mask, logits = make_inputs(case, "cpu")
    t, tk = 17, 23
    causal = torch.ones(t, tk, dtype=torch.bool).tril(diagonal=tk - t)
    common = dict(num_sink_tokens=2, key_padding_mask=mask, sink_logits=logits)
    base = sk.attention_with_sink(q, k, v, 0.25, causal=True, **common)
    alone = sk.attention_with_sink(q, k, v, 0.25, causal=False, attn_mask=causal[None, None], **common)
    both = sk.attention_with_sink(q, k, v, 0.25, causal=True, attn_mask=causal.expand(2, 1, t, tk), **common)
    for got in (alone, both):
        torch.testing.assert_close(got.o, base.o)
        torch.testing.assert_close(got.sink_mass, base.sink_mass)

    pattern = torch.rand(2, 4, t, tk, generator=torch.Generator().manual_seed(1)) < 0.7
    got = sk.attention_with_sink(q, k, v, 0.25, causal=True, softcap=3.0, attn_mask=pattern, **common)
    kk = k.double().repeat_interleave(2, 1)
    vv = v.double().repeat_interleave(2, 1)
    s = 3.0 * torch.tanh(q.double() @ kk.transpose(-1, -2) * 0.25 / 3.0)
    visible = causal & mask[:, None, None, :] & pattern
    s = torch.cat([s.masked_fill(~visible, float("-inf")), logits.double().view(1, 4, 1, 1).expand(2, 4, t, 1)], -1)
    p = torch.softmax(s, -1)[..., :-1]
    torch.testing.assert_close(got.o.double(), p @ vv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sink_mass.double(), p[..., :2].sum(-1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    case = Case("bad", 2, (4, 2), 5, 7, 16, torch.float32, padding="random", sink_logits=True)
    q, k, v, mask, logits = make_inputs(case, "cpu")
    return [
        ("q", TypeError, dict(q=q.numpy())),
        ("q", ValueError, dict(q=q[0])),
        ("q", TypeError, dict(q=q.int(), k=k.int(), v=v.int())),
        ("q", ValueError, dict(q=torch.zeros(2, 4, 5, 300), k=torch.zeros(2, 2, 7, 300), v=torch.zeros(2, 2, 7, 300))),
        ("k", ValueError, dict(k=k[..., :8])),
        ("v", ValueError, dict(v=v[..., :8])),
        ("k", ValueError, dict(k=torch.zeros(2, 3, 7, 16), v=torch.zeros(2, 3, 7, 16))),
        ("v", ValueError, dict(v=v[:, :, :6])),
        ("v", ValueError, dict(v=v[:, :1])),
        ("k", ValueError, dict(k=k[:1], v=v[:1])),
        ("k", TypeError, dict(k=k.half())),
        ("v", ValueError, dict(v=v.to("meta"))),
        ("k", ValueError, dict(k=k[:, :, :0], v=v[:, :, :0], key_padding_mask=mask[:, :0])),
        ("num_sink_tokens", ValueError, dict(num_sink_tokens=0)),
        ("num_sink_tokens", TypeError, dict(num_sink_tokens=1.5)),
        ("sliding_window", ValueError, dict(sliding_window=0)),
        ("sliding_window", ValueError, dict(sliding_window=4, causal=False)),
        ("key_padding_mask", TypeError, dict(key_padding_mask=mask.float())),
        ("key_padding_mask", ValueError, dict(key_padding_mask=mask[:, :6])),
        ("key_padding_mask", ValueError, dict(key_padding_mask=mask[0])),
        ("sink_logits", ValueError, dict(sink_logits=logits[:3])),
        ("sink_logits", TypeError, dict(sink_logits=logits.int())),
        ("scale", TypeError, dict(scale="0.25")),
        ("scale", TypeError, dict(scale=torch.tensor(0.25))),
        ("causal", TypeError, dict(causal=1)),
        ("softcap", ValueError, dict(softcap=0.0)),
        ("softcap", TypeError, dict(softcap="3")),
        ("attn_mask", TypeError, dict(attn_mask=torch.zeros(2, 1, 5, 7))),
        ("attn_mask", ValueError, dict(attn_mask=torch.ones(2, 5, 7, dtype=torch.bool))),
        ("attn_mask", ValueError, dict(attn_mask=torch.ones(2, 3, 5, 7, dtype=torch.bool))),
        ("attn_mask", ValueError, dict(attn_mask=torch.ones(1, 1, 5, 6, dtype=torch.bool))),
    ], dict(q=q, k=k, v=v, scale=0.25, causal=True, num_sink_tokens=1, sliding_window=None,
            key_padding_mask=mask, sink_logits=logits, softcap=None, attn_mask=None)


@pytest.mark.parametrize("index", range(len(_bad_cases()[0])))
def test_bad_input_raises_naming_argument(index):
    cases, good = _bad_cases()
    name, exc, override = cases[index]
    kwargs = {**good, **override}
    with pytest.raises(exc, match=f"`{name}`"):
        sk.attention_with_sink(**kwargs)


SCALARS = ("scale", "causal", "num_sink_tokens", "sliding_window", "softcap")


def test_bad_input_through_torch_ops():
    cases, good = _bad_cases()
    checked = 0
    for name, exc, override in cases:
        if exc is TypeError and any(n in SCALARS or not isinstance(x, torch.Tensor) for n, x in override.items()):
            continue  # the dispatcher itself rejects arguments of the wrong Python type
        kwargs = {**good, **override}
        with pytest.raises(exc, match=f"`{name}`"):
            torch.ops.superexperts.attention_with_sink(*kwargs.values())
        checked += 1
    assert checked >= 15


def test_backends_report():
    table = sk.backends()
    assert table[OP]["cpu"] in ("reference", "native", "triton")
