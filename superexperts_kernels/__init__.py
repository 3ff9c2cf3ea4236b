"""Fused kernels for profiling Super Experts, registered as ``torch.ops.superexperts.*``.

Ops:

- `moe_down_proj_profile`: grouped expert down_proj with per-expert max |y| (and
  where), max |x| and row counts reduced in the same pass.
- `attention_with_sink`: flash-attention forward that also returns, per query, the
  softmax probability mass on the sink keys, without building the T x T matrix.

Each op module names its implementations (reference, triton, native) in one table,
``IMPLEMENTATIONS``; `backends()` tells which one serves each op on each device type, and
`set_backend` / `use_backend` override the choice. `superexperts_kernels.native.info()`
says whether the native extension (csrc/) was built, and with CUDA.
"""

from ._backend import backends, set_backend, use_backend
from .attention_with_sink import SinkAttention, attention_with_sink
from .moe_down_proj_profile import DownProjProfile, moe_down_proj_profile

__all__ = [
    "DownProjProfile",
    "SinkAttention",
    "attention_with_sink",
    "backends",
    "moe_down_proj_profile",
    "set_backend",
    "use_backend",
]

__version__ = "0.1.0"
