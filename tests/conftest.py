"""Test setup: run the Triton kernels in the interpreter on machines without CUDA.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, i.e. at import of the
kernel modules, so it is set here before anything imports them.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Where the Triton kernels run in these tests: the GPU when there is one, else CPU tensors
# under the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def kernel_device():
    return torch.device(KERNEL_DEVICE)
