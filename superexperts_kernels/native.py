"""The ``native`` backend: the C++ (CPU) and CUDA kernels built from ``csrc/``.

Importing the extension ``superexperts_kernels._native`` registers two ops,
``torch.ops.superexperts.moe_down_proj_profile_native`` and
``torch.ops.superexperts.attention_with_sink_native``, with kernels for CPU (and CUDA for the
down projection, when the extension was built with CUDA). They take the arguments of
``moe_down_proj_profile`` / ``attention_with_sink`` (plus ``with_stats``) and check them in
C++. This module gives them fake implementations (for ``torch.compile`` and ``opcheck``; they
check the arguments as the public ops do) and registers them as the ``native`` backend of the
public ops, which validate in Python before they dispatch.

`info()` says whether the extension was built and for which devices. Without it (no compiler
at install time, or ``SUPEREXPERTS_NO_EXT=1``) this module imports fine and registers nothing.
"""

from __future__ import annotations

import torch

from . import _backend
from .attention_with_sink import fake_outputs as attention_fake
from .moe_down_proj_profile import fake_outputs as down_proj_fake

try:
    from . import _native
except ImportError as exc:  # not built, or built against another torch
    _native = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

DOWN_PROJ_OP = "moe_down_proj_profile"
ATTENTION_OP = "attention_with_sink"


def info() -> dict:
    """What the native extension holds: ``built`` (bool), ``cuda`` (built with CUDA kernels),
    ``cpu_capability`` (the instruction set of the CPU kernels' vector loops, chosen at run
    time for this CPU: "default", "avx2" or "avx512"), ``cpu_gemm_dtype`` (per input dtype, the
    dtype the CPU down projection's GEMMs run in on this CPU), ``device_types`` per op, and
    ``error`` (why the extension did not load, or None)."""
    built = _native is not None
    return {
        "built": built,
        "cuda": built and bool(_native.WITH_CUDA),
        "cpu_capability": _native.CPU_CAPABILITY if built else None,
        "cpu_gemm_dtype": {d: _native.cpu_gemm_dtype(d) for d in ("float32", "bfloat16", "float16")} if built else None,
        "device_types": {
            DOWN_PROJ_OP: list(moe_down_proj_profile_native.device_types) if built else [],
            ATTENTION_OP: list(attention_with_sink_native.device_types) if built else [],
        },
        "error": _IMPORT_ERROR,
    }


def moe_down_proj_profile_native(x, w_down, offsets, bias, row_token, w_transposed, channel_stats, *, with_stats=True):
    """`moe_down_proj_profile` by the native kernels; ``with_stats=False`` computes y only."""
    return torch.ops.superexperts.moe_down_proj_profile_native(
        x, w_down, offsets, bias, row_token, w_transposed, channel_stats, with_stats
    )


def attention_with_sink_native(
    q, k, v, scale, causal=True, num_sink_tokens=1, sliding_window=None, key_padding_mask=None, sink_logits=None
):
    """`attention_with_sink` by the native CPU kernel."""
    return torch.ops.superexperts.attention_with_sink_native(
        q, k, v, scale, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits
    )


moe_down_proj_profile_native.device_types = ("cpu", "cuda") if _native is not None and _native.WITH_CUDA else ("cpu",)
attention_with_sink_native.device_types = ("cpu",)


if _native is not None:

    @torch.library.register_fake("superexperts::moe_down_proj_profile_native")
    def _(x, w_down, offsets, bias=None, row_token=None, w_transposed=False, channel_stats=False, with_stats=True):
        return down_proj_fake(x, w_down, offsets, bias, row_token, w_transposed, channel_stats)

    torch.library.register_fake("superexperts::attention_with_sink_native")(attention_fake)

    _backend.register_impl(DOWN_PROJ_OP, "native", moe_down_proj_profile_native)
    _backend.register_impl(ATTENTION_OP, "native", attention_with_sink_native)
