"""Build information of the native extension (the C++ and CUDA kernels built from ``csrc/``).

Importing the extension ``superexperts_kernels._native`` (done here, at package import)
defines ``torch.ops.superexperts.moe_down_proj_profile_native`` and
``torch.ops.superexperts.attention_with_sink_native`` with kernels for CPU, and CUDA for the
down projection when the extension was built with CUDA. The op modules name them in their
backend tables and register their fake implementations next to the public ops' fakes.

`info()` says whether the extension was built and for which devices. Without it (no compiler
at install time, or ``SUPEREXPERTS_NO_EXT=1``) the package works on its other backends.
"""

from __future__ import annotations

try:
    from . import _native
except ImportError as exc:  # not built, or built against another torch
    _native = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

BUILT = _native is not None
WITH_CUDA = BUILT and bool(_native.WITH_CUDA)

# Device types each native op has kernels for in this build.
DEVICE_TYPES: dict[str, tuple[str, ...]] = {
    "moe_down_proj_profile": (("cpu", "cuda") if WITH_CUDA else ("cpu",)) if BUILT else (),
    "attention_with_sink": ("cpu",) if BUILT else (),
}


def info() -> dict:
    """What the native extension holds: ``built`` (bool), ``cuda`` (built with CUDA kernels),
    ``cpu_capability`` (the instruction set of the CPU kernels' vector loops, chosen at run
    time for this CPU: "default", "avx2" or "avx512"), ``cpu_gemm_dtype`` (per input dtype, the
    dtype the CPU down projection's GEMMs run in on this CPU), ``device_types`` per op, and
    ``error`` (why the extension did not load, or None)."""
    return {
        "built": BUILT,
        "cuda": WITH_CUDA,
        "cpu_capability": _native.CPU_CAPABILITY if BUILT else None,
        "cpu_gemm_dtype": {d: _native.cpu_gemm_dtype(d) for d in ("float32", "bfloat16", "float16")} if BUILT else None,
        "device_types": {op: list(devices) for op, devices in DEVICE_TYPES.items()},
        "error": _IMPORT_ERROR,
    }
