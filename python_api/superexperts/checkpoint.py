"""Read a safetensors checkpoint one decoder layer at a time.

`CheckpointReader` maps every tensor name to its shard (through
``model.safetensors.index.json`` or a single ``model.safetensors``) and reads only what
is asked for: one layer's tensors, optionally only some experts of it (expert parallel:
per-expert keys are skipped, fused expert tensors are sliced on read), and dequantizes
DeepSeek-V3/R1 FP8 weights (``float8_e4m3fn`` with a ``weight_scale_inv`` per 128x128
block) on the way.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
SCALE_SUFFIX = "_scale_inv"


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
    """Tensor names, shards and layer grouping of a safetensors checkpoint directory."""

    def __init__(self, model_dir: str | Path):
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
        self.layer_keys: dict[int, list[str]] = defaultdict(list)
        self.other_keys: list[str] = []
        for key in weight_map:
            m = _LAYER.search(key)
            if m:
                self.layer_keys[int(m.group(1))].append(key)
            else:
                self.other_keys.append(key)
        self._handles: dict[str, object] = {}
        self.bytes_read = 0  # bytes of checkpoint tensors read so far

    def _file(self, key: str):
        shard = self.weight_map[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), "pt")
        return self._handles[shard]

    def read(
        self,
        keys: list[str],
        *,
        dtype: torch.dtype,
        expert_range: tuple[int, int] | None = None,
        num_experts: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read `keys` (scales folded into their weights). With `expert_range` ``(start, end)``,
        per-expert keys outside it are not read and fused expert tensors (first dim
        `num_experts`, under ``.experts.``) are read as the ``start:end`` slice only."""
        out = {}
        for key in keys:
            if key.endswith(SCALE_SUFFIX):
                continue
            if expert_range is not None:
                m = _EXPERT.search(key)
                if m and not expert_range[0] <= int(m.group(1)) < expert_range[1]:
                    continue
            f = self._file(key)
            sliced = f.get_slice(key)
            fused_experts = (
                expert_range is not None
                and ".experts." in key
                and not _EXPERT.search(key)
                and sliced.get_shape()[:1] == [num_experts]
            )
            tensor = sliced[expert_range[0] : expert_range[1]] if fused_experts else sliced[...]
            self.bytes_read += tensor.numel() * tensor.element_size()
            scale_key = key + SCALE_SUFFIX
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_key in self.weight_map:
                scale = self._file(scale_key).get_slice(scale_key)
                scale = scale[expert_range[0] : expert_range[1]] if fused_experts else scale[...]
                self.bytes_read += scale.numel() * scale.element_size()
                tensor = dequantize_fp8_blocks(tensor, scale, dtype)
            out[key] = tensor
        return out

    def close(self) -> None:
        self._handles.clear()
