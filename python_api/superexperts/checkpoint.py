"""Read a safetensors checkpoint one decoder layer at a time.

`CheckpointReader` maps every tensor name to its shard (through
``model.safetensors.index.json`` or a single ``model.safetensors``) and reads only what
is asked for: one layer's tensors, optionally only some experts of it (expert parallel:
per-expert keys are skipped, fused expert tensors are sliced on read), and dequantizes
DeepSeek-V3/R1 FP8 weights (``float8_e4m3fn`` with a ``weight_scale_inv`` per 128x128
block) on the way.

Tensors come as views of the memory-mapped shards (safetensors maps the file; nothing is
copied until the caller copies). `CheckpointReader.tensors` walks them in file order and maps
the shards afresh every ``window_bytes``, so a caller that copies each tensor and drops it
holds about that much of the mapped file at a time, not the whole layer.
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
def layer_key_pattern(layers_name: str = "layers") -> re.Pattern:
    """Checkpoint keys of decoder layer N: ``... .<layers_name>.N. ...`` (``layers`` in most
    families, ``blocks`` in DBRX's ``transformer.blocks.N``)."""
    return re.compile(rf"(?:^|\.){re.escape(layers_name)}\.(\d+)\.")


_EXPERT = re.compile(r"\.experts\.(\d+)\.")
SCALE_SUFFIX = "_scale_inv"
WINDOW_BYTES = 16 << 20


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

    def __init__(self, model_dir: str | Path, *, window_bytes: int = WINDOW_BYTES, layers_name: str = "layers"):
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
        self.layer_keys: dict[int, list[str]] = defaultdict(list)
        self.other_keys: list[str] = []
        layer_key = layer_key_pattern(layers_name)
        for key in weight_map:
            m = layer_key.search(key)
            if m:
                self.layer_keys[int(m.group(1))].append(key)
            else:
                self.other_keys.append(key)
        self._headers: dict[str, object] = {}
        self._order: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0  # bytes of checkpoint tensors read so far

    def _header(self, shard: str):
        """A handle for `shard`'s header (shapes, order); its data pages are never touched."""
        with self._lock:
            if shard not in self._headers:
                path = self.dir / shard
                if not path.is_file():
                    raise FileNotFoundError(f"{self.dir}: shard {shard} named in {INDEX_FILE} does not exist")
                f = safe_open(str(path), "pt")
                self._headers[shard] = f
                self._order[shard] = {k: i for i, k in enumerate(f.offset_keys())}
            return self._headers[shard]

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
        shape = self._header(self.weight_map[key]).get_slice(key).get_shape()
        if self._sliced(key, shape, expert_range, num_experts):
            shape[0] = expert_range[1] - expert_range[0]
        return tuple(shape)

    def file_order(self, keys: list[str]) -> list[str]:
        """`keys` sorted by shard and position in it (sequential reads)."""
        for shard in {self.weight_map[k] for k in keys}:
            self._header(shard)
        return sorted(keys, key=lambda k: (self.weight_map[k], self._order[self.weight_map[k]][k]))

    def tensors(
        self,
        keys: list[str],
        *,
        dtype: torch.dtype,
        expert_range: tuple[int, int] | None = None,
        num_experts: int | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for `keys` (from `select`), in the given order: views of the
        mapped shard, FP8 weights dequantized to `dtype`. Copy or drop each before taking the
        next one: the mappings are renewed every `window_bytes`, and the old ones go when
        their last view does."""
        handles: dict[str, object] = {}
        mapped = 0
        for key in keys:
            shard = self.weight_map[key]
            if shard not in handles:
                handles[shard] = safe_open(str(self.dir / shard), "pt")
            f = handles[shard]
            sliced = f.get_slice(key)
            fused = self._sliced(key, sliced.get_shape(), expert_range, num_experts)
            tensor = sliced[expert_range[0] : expert_range[1]] if fused else sliced[...]
            size = tensor.numel() * tensor.element_size()
            scale_key = key + SCALE_SUFFIX
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_key in self.weight_map:
                scale_shard = self.weight_map[scale_key]
                if scale_shard not in handles:
                    handles[scale_shard] = safe_open(str(self.dir / scale_shard), "pt")
                scale = handles[scale_shard].get_slice(scale_key)
                scale = scale[expert_range[0] : expert_range[1]] if fused else scale[...]
                size += scale.numel() * scale.element_size()
                tensor = dequantize_fp8_blocks(tensor, scale, dtype)
            with self._lock:
                self.bytes_read += size
            mapped += size
            yield key, tensor
            del tensor
            if mapped >= self.window_bytes:
                handles.clear()
                mapped = 0

    def read(
        self,
        keys: list[str],
        *,
        dtype: torch.dtype,
        expert_range: tuple[int, int] | None = None,
        num_experts: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for `keys` as `tensors` gives them (scale keys folded in; with
        `expert_range`, only those experts)."""
        return dict(self.tensors(self.select(keys, expert_range), dtype=dtype, expert_range=expert_range, num_experts=num_experts))

    def close(self) -> None:
        with self._lock:
            self._headers.clear()
