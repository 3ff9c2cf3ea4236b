"""Read a safetensors checkpoint one decoder layer at a time.

`CheckpointReader` maps every tensor name to its shard (through
``model.safetensors.index.json`` or a single ``model.safetensors``) and reads only what
is asked for: one layer's tensors, optionally only some experts of it (expert parallel:
per-expert keys are skipped, fused expert tensors are sliced on read), and dequantizes
DeepSeek-V3/R1 FP8 weights (``float8_e4m3fn`` with a ``weight_scale_inv`` per 128x128
block) on the way.

Where the file system allows it, tensors are read past the page cache (``O_DIRECT``,
`DirectReads`): several reads in flight, into two reused windows, ahead of the caller. On this
project's virtual machines the page cache costs the CPUs much of the time it should hide
(`bench/bench_disk_cost.py`), and direct reads next to none (`bench/bench_sweep.py`). Elsewhere
(``SUPEREXPERTS_DIRECT_IO=0``, tmpfs, a tensor over `DIRECT_LARGEST`) tensors are views of the
memory-mapped shards (nothing is copied until the caller copies): `CheckpointReader.tensors` maps
the shards afresh every ``window_bytes``, so a caller that copies each tensor and drops it holds
about that much of the mapped file at a time, not the whole layer.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from . import pages

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
def layer_key_pattern(layers_name: str = "layers") -> re.Pattern:
    """Checkpoint keys of decoder layer N: ``... .<layers_name>.N. ...`` (``layers`` in most
    families, ``blocks`` in DBRX's ``transformer.blocks.N``)."""
    return re.compile(rf"(?:^|\.){re.escape(layers_name)}\.(\d+)\.")


_EXPERT = re.compile(r"\.experts\.(\d+)\.")
SCALE_SUFFIX = "_scale_inv"
WINDOW_BYTES = 16 << 20
# Direct reads: bytes per read, reads in flight, file bytes per window (two windows are held),
# the largest tensor read so, and the gap between tensors a window reads through.
DIRECT_IO = os.environ.get("SUPEREXPERTS_DIRECT_IO", "1") != "0"
DIRECT_CHUNK = 8 << 20
DIRECT_THREADS = 4
DIRECT_WINDOW = 16 << 20
DIRECT_LARGEST = 256 << 20
DIRECT_GAP = 1 << 20
_ALIGN = 4096
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight [..., out, in]`` float8 times ``scale_inv [..., ceil(out/b), ceil(in/b)]``
    (one fp32 scale per ``b x b`` block) -> `dtype`."""
    rows, cols = weight.shape[-2:]
    block_r = -(-rows // scale_inv.shape[-2])
    block_c = -(-cols // scale_inv.shape[-1])
    scale = scale_inv.repeat_interleave(block_r, dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block_c, dim=-1)[..., :cols]
    return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)


class CheckpointReader:
    """Tensor names, shards and layer grouping of a safetensors checkpoint directory.

    `shape`, `select` and `file_order` read shard headers only; `tensors` and `read` read data.
    A reader may be used from two threads (a background reader and the caller).
    """

    def __init__(
        self, model_dir: str | Path, *, window_bytes: int = WINDOW_BYTES, layers_name: str = "layers", direct_io: bool = True,
    ):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            with safe_open(str(self.dir / SINGLE_FILE), "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE}")
        self.weight_map: dict[str, str] = weight_map
        self.window_bytes = window_bytes
        self.direct_io = direct_io and DIRECT_IO and hasattr(os, "O_DIRECT")
        self.layer_keys: dict[int, list[str]] = defaultdict(list)
        self.other_keys: list[str] = []
        layer_key = layer_key_pattern(layers_name)
        for key in weight_map:
            m = layer_key.search(key)
            if m:
                self.layer_keys[int(m.group(1))].append(key)
            else:
                self.other_keys.append(key)
        self._entries: dict[str, dict[str, tuple[str, list[int], int, int]]] = {}  # shard -> its header
        self._lock = threading.Lock()
        self.bytes_read = 0  # bytes of checkpoint tensors read so far
        self.direct_bytes = 0  # of which read past the page cache (`DirectReads`)

    @staticmethod
    def _other_expert(key: str, expert_range: tuple[int, int] | None) -> bool:
        m = _EXPERT.search(key) if expert_range is not None else None
        return bool(m) and not expert_range[0] <= int(m.group(1)) < expert_range[1]

    @staticmethod
    def _sliced(key: str, shape: list[int], expert_range, num_experts) -> bool:
        """A fused experts tensor (first dim `num_experts`) read as its ``expert_range`` slice."""
        return expert_range is not None and ".experts." in key and not _EXPERT.search(key) and shape[:1] == [num_experts]

    def select(self, keys: list[str], expert_range: tuple[int, int] | None = None) -> list[str]:
        """The keys `tensors` yields: scale keys dropped (folded into their weights) and, with
        ``expert_range (start, end)``, per-expert keys of other experts."""
        return [k for k in keys if not k.endswith(SCALE_SUFFIX) and not self._other_expert(k, expert_range)]

    def shape(self, key: str, expert_range: tuple[int, int] | None = None, num_experts: int | None = None) -> tuple[int, ...]:
        """The shape `tensors` gives `key` (a sliced fused experts tensor: the slice's)."""
        shape = list(self._entry(key)[1])
        if self._sliced(key, shape, expert_range, num_experts):
            shape[0] = expert_range[1] - expert_range[0]
        return tuple(shape)

    def _entry(self, key: str) -> tuple[str, list[int], int, int]:
        """``(dtype, shape, start, end)`` of `key` from its shard's header (read once; no data
        page is touched): bytes ``[start, end)`` of the file."""
        shard = self.weight_map[key]
        with self._lock:
            entries = self._entries.get(shard)
        if entries is None:
            path = self.dir / shard
            if not path.is_file():
                raise FileNotFoundError(f"{self.dir}: shard {shard} named in {INDEX_FILE} does not exist")
            fd = os.open(path, os.O_RDONLY)
            try:
                if hasattr(os, "posix_fadvise"):  # no read-ahead into the tensors after the header
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                size = int.from_bytes(os.pread(fd, 8, 0), "little")
                header = json.loads(os.pread(fd, size, 8))
                entries = {
                    k: (v["dtype"], v["shape"], 8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
                    for k, v in header.items() if k != "__metadata__"
                }
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}: not a safetensors header ({e!r}); the shard is truncated or corrupt") from None
            finally:
                os.close(fd)
            with self._lock:
                self._entries[shard] = entries
        return entries[key]

    def _direct_range(self, key: str, expert_range, num_experts) -> tuple[str, int, int, torch.dtype, list[int]] | None:
        """``(shard, start, end, dtype, shape)`` of what `tensors` gives `key` (a sliced fused
        experts tensor: the slice's bytes), or None where a direct read does not apply."""
        dtype, shape, start, end = self._entry(key)
        if dtype not in _DTYPES or start % _DTYPES[dtype].itemsize:
            return None
        if self._sliced(key, shape, expert_range, num_experts):
            row = (end - start) // shape[0]
            start, end = start + expert_range[0] * row, start + expert_range[1] * row
            shape = [expert_range[1] - expert_range[0], *shape[1:]]
        return self.weight_map[key], start, end, _DTYPES[dtype], list(shape)

    def file_order(self, keys: list[str]) -> list[str]:
        """`keys` sorted by shard and position in it (sequential reads)."""
        return sorted(keys, key=lambda k: (self.weight_map[k], self._entry(k)[2]))

    def tensors(
        self,
        keys: list[str],
        *,
        dtype: torch.dtype,
        expert_range: tuple[int, int] | None = None,
        num_experts: int | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for `keys` (from `select`), in the given order, FP8 weights
        dequantized to `dtype`. A tensor is valid until the next one is taken: copy or drop it
        first. It is a view of the mapped shard (the mappings are renewed every `window_bytes`)
        or of a window of `DirectReads` that is filled again for later tensors."""
        handles: dict[str, object] = {}
        mapped = 0
        direct = None
        if self.direct_io:
            direct = DirectReads(self.dir, [self._direct_range(k, expert_range, num_experts) for k in keys])
        try:
            for i, key in enumerate(keys):
                shard = self.weight_map[key]
                fused = self._sliced(key, self._entry(key)[1], expert_range, num_experts)
                tensor = direct.tensor(i) if direct is not None else None
                if tensor is not None:
                    with self._lock:
                        self.direct_bytes += tensor.numel() * tensor.element_size()
                else:
                    if shard not in handles:
                        handles[shard] = safe_open(str(self.dir / shard), "pt")
                    sliced = handles[shard].get_slice(key)
                    tensor = sliced[expert_range[0] : expert_range[1]] if fused else sliced[...]
                    mapped += tensor.numel() * tensor.element_size()
                yield key, self._dequantized(key, tensor, handles, dtype, expert_range if fused else None)
                del tensor
                if mapped >= self.window_bytes:
                    handles.clear()
                    mapped = 0
        finally:
            if direct is not None:
                direct.close()

    def _dequantized(self, key: str, tensor: torch.Tensor, handles: dict, dtype: torch.dtype, expert_range) -> torch.Tensor:
        """`tensor`, counted in `bytes_read`; an FP8 block-scaled weight dequantized to `dtype`
        (its scale sliced to `expert_range` when not None)."""
        size = tensor.numel() * tensor.element_size()
        scale_key = key + SCALE_SUFFIX
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_key in self.weight_map:
            scale_shard = self.weight_map[scale_key]
            if scale_shard not in handles:
                handles[scale_shard] = safe_open(str(self.dir / scale_shard), "pt")
            scale = handles[scale_shard].get_slice(scale_key)
            scale = scale[expert_range[0] : expert_range[1]] if expert_range is not None else scale[...]
            size += scale.numel() * scale.element_size()
            tensor = dequantize_fp8_blocks(tensor, scale, dtype)
        with self._lock:
            self.bytes_read += size
        return tensor

    def read(
        self,
        keys: list[str],
        *,
        dtype: torch.dtype,
        expert_range: tuple[int, int] | None = None,
        num_experts: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for `keys` as `tensors` gives them, copied (scale keys folded in; with
        `expert_range`, only those experts)."""
        stream = self.tensors(self.select(keys, expert_range), dtype=dtype, expert_range=expert_range, num_experts=num_experts)
        return {key: tensor.clone() for key, tensor in stream}

    def close(self) -> None:
        with self._lock:
            self._entries.clear()


class _Window:
    """File bytes ``[first, end)`` of one shard (`first` aligned), read into a reused buffer."""

    def __init__(self, shard: str, first: int, end: int):
        self.shard, self.first, self.end = shard, first, end
        self.buffer: torch.Tensor | None = None
        self.reads: list[Future] | None = None  # None: not submitted


class DirectReads:
    """Read the byte ranges of one `CheckpointReader.tensors` walk with ``O_DIRECT``, ahead of it.

    `ranges[i]` is ``(shard, start, end, dtype, shape)`` of the i-th tensor (None: not read
    here). Consecutive ranges of a shard are joined into windows of up to `DIRECT_WINDOW` bytes
    (a larger tensor, up to `DIRECT_LARGEST`, is a window of its own); two windows are read at a
    time, each as `DIRECT_CHUNK` reads on `DIRECT_THREADS` threads, into two buffers that
    later windows fill again. The page cache is not asked first: its answer (``RWF_NOWAIT``,
    ``mincore``) is wrong on some virtual machines, where reading a header makes a whole file
    look cached. A shard that refuses ``O_DIRECT`` is left to the mapped shard: `tensor`
    returns None.
    """

    def __init__(self, directory: Path, ranges: list[tuple[str, int, int, torch.dtype, list[int]] | None]):
        self.dir = directory
        self.ranges = ranges
        self._fds: dict[str, int | None] = {}
        self._windows: list[_Window] = []
        self._window_of: list[int | None] = [None] * len(ranges)
        window = None
        for i, r in enumerate(ranges):
            if r is None or not 0 < r[2] - r[1] <= DIRECT_LARGEST or self._fd(r[0]) is None:
                continue
            shard, start, end = r[:3]
            if window is not None and window.shard == shard and 0 <= start - window.end <= DIRECT_GAP and end - window.first <= DIRECT_WINDOW:
                window.end = end
            else:
                window = _Window(shard, start - start % _ALIGN, end)
                self._windows.append(window)
            self._window_of[i] = len(self._windows) - 1
        self._mapped = [False] * len(self._windows)  # True: direct reads refused at read time
        self._spare: list[torch.Tensor] = []
        self._pool = ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="superexperts-direct") if self._windows else None
        self._current = -1
        for k in range(min(2, len(self._windows))):
            self._submit(k)

    def _fd(self, shard: str) -> int | None:
        if shard not in self._fds:
            try:
                self._fds[shard] = os.open(self.dir / shard, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # a file system without direct I/O (tmpfs)
                self._fds[shard] = None
        return self._fds[shard]

    def _submit(self, k: int) -> None:
        window = self._windows[k]
        fd = self._fds.get(window.shard)
        if window.reads is not None or fd is None:
            return
        size = -(-(window.end - window.first) // _ALIGN) * _ALIGN
        fits = [i for i, b in enumerate(self._spare) if b.numel() >= size]
        buffer = self._spare.pop(fits[0]) if fits else pages.mapped(size)
        window.buffer = buffer
        array = buffer.numpy()
        window.reads = [
            self._pool.submit(_read_fully, fd, array[at : at + DIRECT_CHUNK], window.first + at)
            for at in range(0, size, DIRECT_CHUNK)
        ]

    def _wait(self, k: int) -> bool:
        """Whether window `k` was read (False: its shard refused direct reads; use the mapping)."""
        window = self._windows[k]
        if window.reads is None:
            return False
        try:
            got = [f.result() for f in window.reads]
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # direct I/O refused at read time
                raise
            self._fds[window.shard] = None
            return False
        read = 0
        for n in got:  # bytes read from `first` on, up to the first short read (the file's end)
            read += n
            if n < DIRECT_CHUNK:
                break
        if window.first + read < window.end:
            raise OSError(f"{self.dir / window.shard}: the file ends at byte {window.first + read}, a tensor ends at {window.end} (truncated?)")
        return True

    def tensor(self, i: int) -> torch.Tensor | None:
        """The i-th tensor, a view of its window (valid until `tensor` is asked for a later
        window's), or None: take it from the mapped shard."""
        k = self._window_of[i]
        if k is None or self._mapped[k]:
            return None
        if k != self._current:
            if 0 <= self._current < k and self._windows[self._current].buffer is not None:
                self._spare.append(self._windows[self._current].buffer)
                self._windows[self._current].buffer = None
            self._current = k
            if k + 1 < len(self._windows):
                self._submit(k + 1)
            if not self._wait(k):
                self._mapped[k] = True
                return None
        window = self._windows[k]
        _, start, end, dtype, shape = self.ranges[i]
        return window.buffer[start - window.first : end - window.first].view(dtype).view(shape)

    def close(self) -> None:
        """Cancel the reads not started, wait for the others, close the files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


def _read_fully(fd: int, array, offset: int) -> int:
    """Read ``len(array)`` bytes of `fd` from `offset` into `array` (fewer only at the file's
    end); the bytes read."""
    done = 0
    view = memoryview(array)
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        done += max(n, 0)
        if n <= 0 or n % _ALIGN:  # the file's end (an unaligned offset cannot be read on)
            break
    return done
