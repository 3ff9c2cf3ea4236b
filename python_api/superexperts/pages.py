"""CPU buffers for checkpoint reads whose pages the reader controls.

A layer's buffers are large (hundreds of MB to GB). Allocated by malloc, freeing one raises
glibc's mmap threshold, so the computation's later temporaries stay in malloc's caches and the
process holds more than it uses. `empty` maps each large buffer on its own instead: freeing it
returns its pages to the system at once. `touch` faults pages in ahead of use (on a thread
that would otherwise wait), and `release` gives pages back that will be written again later,
so they are not resident meanwhile.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys

import torch

PAGE = mmap.PAGESIZE
MAPPED_FROM = 1 << 20  # bytes from which `empty` maps a buffer on its own
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS if hasattr(mmap, "MAP_ANONYMOUS") else None


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; from `MAPPED_FROM` bytes on, an anonymous
    mapping of its own (page-aligned), unmapped when the tensor is freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MAPPED_FROM or dtype.itemsize == 0:
        return torch.empty(shape, dtype=dtype)
    return mapped(nbytes).view(dtype).view(shape)


def mapped(nbytes: int) -> torch.Tensor:
    """``[nbytes]`` uint8, uninitialised, page-aligned: an anonymous mapping of its own."""
    if _PRIVATE is not None:
        try:
            # Private: a shared anonymous mapping keeps the pages `release` unmaps (shared memory).
            return torch.frombuffer(mmap.mmap(-1, nbytes, flags=_PRIVATE), dtype=torch.uint8)
        except OSError:  # out of mappings (vm.max_map_count): malloc's memory serves as well
            pass
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    return raw[-raw.data_ptr() % PAGE :][:nbytes]


def touch(t: torch.Tensor, skip: list[tuple[int, int]] = ()) -> None:
    """Fault in the pages of contiguous CPU tensor `t` but those wholly inside a byte range
    ``[start, end)`` (offsets into `t`) of `skip`. Values are left undefined."""
    if not t.numel() or not t.is_contiguous() or t.device.type != "cpu":
        return
    flat = t.view(-1).view(torch.uint8)
    first = (-flat.data_ptr()) % PAGE  # offset of the first page boundary in `t`
    if first >= flat.numel():
        return
    starts = torch.arange(first, flat.numel(), PAGE)
    keep = torch.ones(starts.numel(), dtype=torch.bool)
    for start, end in skip:
        keep &= ~((starts >= start) & (starts + PAGE <= end))
    flat[starts[keep]] = 0


def release(t: torch.Tensor) -> int:
    """Give back the whole pages inside contiguous CPU tensor `t`; the bytes released.

    Its values become undefined (zeros where released; the partial pages at its ends, shared
    with neighbouring memory, are kept): only for a buffer that will be written again. A
    no-op (0) off Linux or for a tensor that is not contiguous.
    """
    if _libc is None or not t.numel() or not t.is_contiguous() or t.device.type != "cpu":
        return 0
    start = -(-t.data_ptr() // PAGE) * PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // PAGE * PAGE
    if end <= start:
        return 0
    if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        return 0
    return end - start
