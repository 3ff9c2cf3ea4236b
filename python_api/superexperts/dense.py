"""The dense projections of a decoder layer (attention q/k/v/o, routers, shared experts, dense
MLPs) through the native op's GEMMs, on CPUs where that is faster than torch's own.

A bf16/fp16 `nn.Linear` on a CPU without bf16/fp16 GEMM instructions (AVX2 and AVX-512 without
avx512_bf16/AMX) runs torch's reduced-precision GEMM, several times slower than an fp32 GEMM on
upcast copies. The native `moe_down_proj_profile` already chooses at run time
(`superexperts_kernels.native.info()["cpu_gemm_dtype"]`) and runs its GEMMs on fp32 blocks there;
one `nn.Linear` is its one-expert case (``w_down = weight[None]``, no statistics). Its output is
rounded to the input dtype from an fp32 accumulator, as torch's bf16 GEMM does, so the model
computes the same values up to the summation order.

`fast_dense_linears(module)`: inside the block, every plain `nn.Linear` below `module` (but
those inside routed-experts modules) runs that way; forward hooks on them still fire. Outside
the CPU/dtype case where it pays, or without the native backend, it changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import superexperts_kernels as sk
from superexperts_kernels import native

_OP = "moe_down_proj_profile"


def pays(dtype: torch.dtype, device: torch.device) -> bool:
    """True where the native op runs `dtype` GEMMs faster than torch: a CPU whose native GEMM
    dtype for it is another one (fp32 blocks), with the native backend serving the op."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or not native.BUILT:
        return False
    info = native.info()
    return info["cpu_gemm_dtype"][str(dtype).removeprefix("torch.")] != str(dtype).removeprefix("torch.") and (
        sk.backends()[_OP]["cpu"] == "native"
    )


def _forward(module: nn.Linear):
    """``module.forward`` through the op; torch's own for inputs the op does not take."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        if x.dtype != weight.dtype or x.device.type != "cpu" or weight.device.type != "cpu" or x.numel() == 0:
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        offsets = torch.tensor([rows.shape[0]], dtype=torch.int32)
        y = sk.moe_down_proj_profile(
            rows, weight[None], offsets, None if bias is None else bias[None], with_stats=False, check_offsets=False
        ).y
        return y.view(*x.shape[:-1], weight.shape[0])

    return forward


def _linears(module: nn.Module) -> list[nn.Linear]:
    """The plain `nn.Linear` modules below `module`, outside routed-experts modules, whose
    forward is the class's."""
    from .layers import experts_kind

    skip: set[int] = set()
    found = []
    for _, m in module.named_modules():
        if id(m) in skip:
            continue
        if experts_kind(m)[0]:
            skip.update(id(s) for s in m.modules())
        elif type(m) is nn.Linear and "forward" not in m.__dict__ and not hasattr(m, "_hf_hook"):
            found.append(m)  # (a forward of its own already, or accelerate's offload hook: left alone)
    return found


@contextlib.contextmanager
def fast_dense_linears(module: nn.Module, *, enabled: bool | None = None) -> Iterator[int]:
    """Run the plain `nn.Linear` modules below `module` through the native op inside the block
    (see the module docstring); yields how many were switched. ``enabled=None``: where it
    `pays` for the dtype and device of the first such module's weight; True/False force it."""
    linears = _linears(module)
    if enabled is None:
        # Weights still on the meta device (a model loading in the background) take the device
        # of those already read; each call checks its weight's device again.
        device = next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))
        enabled = bool(linears) and pays(linears[0].weight.dtype, device)
    if not enabled:
        yield 0
        return
    for m in linears:
        m.forward = _forward(m)
    try:
        yield len(linears)
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
