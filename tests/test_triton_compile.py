"""Compile the Triton kernels for real GPUs without one (frontend + ptxas).

The interpreter accepts code that the compiler rejects, and says nothing about what the
compiled loop looks like. Here every kernel is compiled ahead of time for sm_90 (H100) and
sm_80 (A100), both kernels (down_proj with and without statistics; attention with and
without the sink output, and with window, padding and learned sinks), with the argument
specializations a real launch gets (16-byte aligned
pointers, unit inner strides), and its PTX is checked: tensor-core MMAs in the K loop
for fp16/bf16 (``wgmma`` on sm_90, ``mma`` on sm_80), a software-pipelined load stream
(``cp.async``), and global atomics exactly when statistics are on.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

if __name__ != "__main__":
    pytest.importorskip("triton")

PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def compile_kernel(kernel, pointer_types, constexprs, unit_strides, aligned_ints, arch, num_warps, num_stages):
    names = kernel.arg_names
    signature, values = {}, {}
    for n in names:
        if n in constexprs:
            signature[n], values[n] = "constexpr", constexprs[n]
        elif n in unit_strides:
            signature[n], values[n] = "constexpr", 1
        elif n in pointer_types:
            signature[n] = pointer_types[n]
        else:
            signature[n] = "i32"
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if (n in pointer_types and pointer_types[n].startswith("*")) or n in aligned_ints
    }
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in values.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def down_proj_case(arch, dtype, with_stats):
    from superexperts_kernels._triton import down_proj as m

    cfg = m._default_cuda_config(256.0, dtype)
    ptr = PTR[dtype]
    return compile_kernel(
        m._moe_down_proj_kernel,
        pointer_types={"x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "y_ptr": ptr, "offsets_ptr": "*i32",
                       "tile_ends_ptr": "*i32", "key_ptr": "*i64", "in_bits_ptr": "*i32", "chan_bits_ptr": "*i32"},
        constexprs=dict(HAS_BIAS=True, WITH_STATS=with_stats, CHANNEL_STATS=with_stats, UPCAST=False,
                        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", E_POW2=256,
                        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"]),
        unit_strides={"stride_xk", "stride_wk", "stride_yn", "stride_bn"},
        aligned_ints={"stride_xm", "stride_we", "stride_wn", "stride_ym", "stride_be", "hidden", "inter"},
        arch=arch,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def attention_case(arch, dtype, with_sink, window=False, pad=False, sink_logits=False):
    from superexperts_kernels._triton import attention as m

    head_dim = 128
    cfg = m.get_config(4096, head_dim, dtype, torch.device("cuda"))
    ptr = PTR[dtype]
    return compile_kernel(
        m._sink_attention_fwd_kernel,
        pointer_types={"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "sink_mass_ptr": "*fp32",
                       "pad_ptr": "*u8", "sink_logits_ptr": "*fp32", "qk_scale": "fp32"},
        constexprs=dict(HEAD_DIM=head_dim, CAUSAL=True, HAS_WINDOW=window, HAS_PAD=pad, HAS_SINK_LOGITS=sink_logits,
                        WITH_SINK=with_sink, UPCAST=False, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=head_dim),
        unit_strides={"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_pn"},
        aligned_ints={"stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                      "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om", "stride_pb"},
        arch=arch,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


CASES = [
    (f"down_proj-{arch}-{str(dtype)[6:]}-{'stats' if stats else 'nostats'}", down_proj_case, (arch, dtype, stats))
    for arch in (90, 80)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for stats in (True, False)
] + [
    (f"attention-{arch}-{str(dtype)[6:]}-{'sink' if sink else 'nosink'}", attention_case, (arch, dtype, sink))
    for arch in (90, 80)
    for dtype in (torch.bfloat16, torch.float16)
    for sink in (True, False)
] + [
    ("attention-90-bfloat16-sink-window-pad-logits", attention_case, (90, torch.bfloat16, True, True, True, True)),
]


def _summarize(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return {
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": "mma.sync" in ptx,
        "cp_async": "cp.async" in ptx,
        "atomics": re.search(r"\b(atom|red)\.global", ptx) is not None,
    }


@pytest.fixture(scope="module")
def compiled():
    """Compile every case in one subprocess without TRITON_INTERPRET (the test session has the
    kernels decorated for the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_compiles_to_pipelined_tensor_core_loop(compiled, name):
    got = compiled[name]
    arch = int(name.split("-")[1])
    if "float32" in name:  # fp32 inputs use exact fp32 FMAs (input_precision="ieee"), not TF32 MMAs
        assert not got["wgmma"] and not got["mma"]
    else:
        assert got["wgmma"] if arch == 90 else got["mma"]
    assert got["cp_async"]
    assert got["atomics"] == name.endswith("-stats")  # only the down_proj statistics merge atomically


if __name__ == "__main__":
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    print(json.dumps({name: _summarize(build(*args)) for name, build, args in CASES}))
