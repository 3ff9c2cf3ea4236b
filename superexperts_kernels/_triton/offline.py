"""Compile the Triton kernels for a GPU without one, and read what the compiler made.

``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ``ptxas``) with no driver.
The arguments are specialized as a real launch specializes them: 16-byte aligned
pointers and integers divisible by 16 get ``tt.divisibility = 16``, unit strides become
constexpr 1.

`analyze` reads the artifacts:

- TTGIR: the shared-memory buffers of each pipelined operand (``ttg.local_alloc`` of a
  ``memdesc<N x ...>``: ``N`` buffers); 2-D int64 tensors (per-element 64-bit work);
- ``ptxas -v`` (the same ptxas and flags Triton uses): registers, spill bytes;
- ``cuobjdump`` on Triton's own cubin: registers and local memory as linked, and the SASS:
  tensor-core instructions (``HGMMA`` = wgmma, ``HMMA`` = mma.sync), fences
  (``MEMBAR.*.GPU``) and the memory order of the global atomics;
- metadata: shared memory per CTA, hence `occupancy.ctas_per_sm`.

The kernel argument specs used by the tests and ``bench/gpu_static.py`` live here too, so
that both compile exactly what the launchers launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .occupancy import ctas_per_sm

PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def compile_kernel(kernel, pointer_types, constexprs, unit_strides, aligned_ints, arch, num_warps, num_stages,
                   scalar_types=None, maxnreg=None):
    """Compile `kernel` (a ``@triton.jit`` function) for ``sm_<arch>``.

    pointer_types: ``{arg: "*bf16" | "*i32" | ...}``; constexprs: ``{arg: value}``;
    unit_strides: args specialized to 1; aligned_ints: int args divisible by 16;
    scalar_types: non-pointer args other than i32 (e.g. ``{"qk_scale": "fp32"}``).
    """
    fn = kernel
    names = fn.arg_names
    scalar_types = scalar_types or {}
    signature, values = {}, {}
    for n in names:
        if n in constexprs:
            signature[n], values[n] = "constexpr", constexprs[n]
        elif n in unit_strides:
            signature[n], values[n] = "constexpr", 1
        elif n in pointer_types:
            signature[n] = pointer_types[n]
        else:
            signature[n] = scalar_types.get(n, "i32")
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if (n in pointer_types and pointer_types[n].startswith("*")) or n in aligned_ints
    }
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in values.items()}, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# --------------------------------------------------------------------------- specs


def down_proj_kernel_args(dtype, cfg, *, with_stats, channel_stats=False, bias=False, offsets_dtype=torch.int32):
    """`compile_kernel` arguments for ``_moe_down_proj_kernel`` as the launcher launches it
    on contiguous ``[S, I]`` x and ``[E, H, I]`` weights with H, I multiples of 16."""
    from . import down_proj as m

    ptr = PTR[dtype]
    return dict(
        kernel=m._moe_down_proj_kernel,
        pointer_types={"x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "y_ptr": ptr,
                       "offsets_ptr": "*i32" if offsets_dtype == torch.int32 else "*i64",
                       "key_ptr": "*i64", "in_bits_ptr": "*i32", "chan_bits_ptr": "*i32"},
        constexprs=dict(HAS_BIAS=bias, WITH_STATS=with_stats, CHANNEL_STATS=channel_stats, UPCAST=False,
                        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", E_POW2=512,
                        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                        GROUP_M=cfg.get("GROUP_M", 1)),
        unit_strides={"stride_xk", "stride_wk", "stride_yn", "stride_bn"},
        aligned_ints={"stride_xm", "stride_we", "stride_wn", "stride_ym", "stride_be", "hidden", "inter"},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def attention_kernel_args(dtype, cfg, head_dim, *, with_sink, causal=True, window=False, pad=False,
                          sink_logits=False, softcap=False):
    """`compile_kernel` arguments for ``_sink_attention_fwd_kernel`` on contiguous
    ``[B, H, T, D]`` tensors."""
    from . import attention as m

    ptr = PTR[dtype]
    return dict(
        kernel=m._sink_attention_fwd_kernel,
        pointer_types={"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "sink_mass_ptr": "*fp32",
                       "pad_ptr": "*u8", "sink_logits_ptr": "*fp32"},
        scalar_types={"qk_scale": "fp32", "softcap": "fp32"},
        constexprs=dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_WINDOW=window, HAS_PAD=pad,
                        HAS_SINK_LOGITS=sink_logits, HAS_SOFTCAP=softcap, WITH_SINK=with_sink, UPCAST=False,
                        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(head_dim))),
        unit_strides={"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_pn"},
        aligned_ints={"stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                      "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om", "stride_pb"},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


# --------------------------------------------------------------------------- analysis

_ALLOC = re.compile(r"(%[\w.]+) = ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([0-9x]+)x(\w+),")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def shared_buffers(ttgir: str) -> list[dict]:
    """Multi-buffered shared-memory allocations (``local_alloc`` without an initial value):
    ``[{"name", "buffers", "shape", "dtype"}]`` in program order."""
    out = []
    for name, dims, dtype in _ALLOC.findall(ttgir):
        shape = [int(d) for d in dims.split("x")]
        out.append({"name": name, "buffers": shape[0], "shape": shape[1:], "dtype": dtype})
    return out


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` with Triton's ptxas and flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    stores = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(s) for s in re.findall(r"(\d+) bytes spill loads", log)]
    return {"registers": max(regs), "spill_stores": sum(stores), "spill_loads": sum(loads)}


def cubin_usage(cubin: bytes) -> tuple[dict, str]:
    """(``{"registers", "local", "stack"}`` from ``cuobjdump -res-usage``, SASS text)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))}, sass


def _sass_ops(sass: str) -> list[str]:
    """Instruction mnemonics (with modifiers) in program order."""
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)


def analyze(compiled, arch: int) -> dict:
    """What the compiler made of one kernel: see the module docstring."""
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    usage = ptxas_usage(ptx, arch)
    linked, sass = cubin_usage(compiled.asm["cubin"])
    ops = _sass_ops(sass)
    atomics = [op for op in ops if op.startswith(("ATOMG", "REDG", "RED.", "ATOM."))]
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    return {
        "registers": linked["registers"],
        "ptxas_registers": usage["registers"],
        "spill_bytes": usage["spill_stores"] + usage["spill_loads"] + linked["local"] + linked["stack"],
        "shared_bytes": shared,
        "num_warps": num_warps,
        "ctas_per_sm": ctas_per_sm(linked["registers"], shared, num_warps, arch),
        "buffers": shared_buffers(ttgir),
        "i64_tiles": sorted({t for t in re.findall(r"tensor<(\d+x\d+)xi64", ttgir) if "1" not in t.split("x")}),
        "wgmma": any(op.startswith("HGMMA") for op in ops),
        "mma_sync": any(op.startswith("HMMA") for op in ops),
        "cp_async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "atomics": sorted(set(atomics)),
        "gpu_fences": sum(op.startswith("MEMBAR") and ("GPU" in op or "SYS" in op) for op in ops),
        "sass_instructions": len(ops),
    }


def compile_and_analyze(spec: dict, arch: int) -> dict:
    """`compile_kernel(**spec, arch=arch)` then `analyze`."""
    spec = dict(spec)
    return analyze(compile_kernel(arch=arch, **spec), arch)
