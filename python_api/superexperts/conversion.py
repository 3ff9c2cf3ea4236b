"""Checkpoint tensors -> model tensors, by transformers' own conversion mapping, fused in place.

transformers 5 loads a per-expert checkpoint (``mlp.experts.<e>.gate_proj.weight``, ...) into
fused parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) through the
`WeightConverter` rules of its conversion mapping: `MergeModulelist` stacks the experts' tensors
and `Concatenate` joins gate and up, each op a new full-size tensor. `plan_layer` resolves every
checkpoint key with transformers' own renaming (`rename_source_key`); for that stack(+concat)
chain it gives each source tensor its slot inside the final parameter, so a reader copies every
tensor once, from the memory-mapped shard into its slot (`LayerPlan.fill`). Any other chain
(transposes, interleaves, splits, ...) runs through transformers' own ops (`LayerPlan.convert`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TargetTensor:
    """One tensor of the model: its state-dict name, shape and dtype (those of the meta tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Slot:
    """Where a checkpoint tensor goes: the whole target (`index` None), or element `index` of
    its first dimension, optionally narrowed to ``(dim, start, length)`` of that element."""

    target: str
    index: int | None = None
    narrow: tuple[int, int, int] | None = None


@dataclass
class Converted:
    """Checkpoint tensors that transformers' own ops turn into one or more targets."""

    converter: object  # transformers WeightConverter (a private copy)
    first_target: str
    sources: dict[str, list[str]]  # source pattern -> checkpoint keys, in transformers' order


@dataclass
class LayerPlan:
    """How the checkpoint tensors of one decoder layer become model tensors.

    targets: every model tensor the plan produces, by name.
    slots: checkpoint key -> its place in a target (filled by copying, `fill`).
    converted: groups that go through transformers' ops (`convert`).
    """

    targets: dict[str, TargetTensor] = field(default_factory=dict)
    slots: dict[str, Slot] = field(default_factory=dict)
    converted: list[Converted] = field(default_factory=list)

    def keys(self) -> list[str]:
        """The checkpoint keys the plan reads."""
        return [*self.slots, *(k for c in self.converted for keys in c.sources.values() for k in keys)]

    def allocate(self, empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The targets that `fill` writes, allocated by ``empty(shape, dtype)``."""
        filled = {s.target for s in self.slots.values()}
        return {name: empty(t.shape, t.dtype) for name, t in self.targets.items() if name in filled}

    def slot_view(self, out: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        """The part of ``out[target]`` that checkpoint tensor `key` fills."""
        slot = self.slots[key]
        dest = out[slot.target]
        if slot.index is not None:
            dest = dest[slot.index]
        if slot.narrow is not None:
            dest = dest.narrow(*slot.narrow)
        return dest

    def fill(self, out: dict[str, torch.Tensor], key: str, tensor: torch.Tensor) -> None:
        """Copy checkpoint tensor `key` into its slot of ``out[target]`` (converting the dtype)."""
        self.slot_view(out, key).copy_(tensor)

    def convert(self, model, group: Converted, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run transformers' ops of `group` on its checkpoint tensors (``key -> tensor``, each
        already in the target dtype); returns ``name -> tensor`` checked against the model."""
        conv = group.converter
        for pattern, keys in group.sources.items():
            for key in keys:
                conv.add_tensor(group.first_target, key, pattern, lambda t=tensors[key]: t)
        out = conv.convert(group.first_target, model=model, config=model.config, hf_quantizer=None, loading_info=None)
        result = {}
        for name, value in out.items():
            value = value[0] if isinstance(value, list) else value
            want = self.targets.get(name)
            if want is None:
                raise ValueError(f"{name}: transformers' conversion made a tensor the model does not have")
            if tuple(value.shape) != want.shape:
                raise ValueError(f"{name}: the checkpoint gives shape {tuple(value.shape)}, the model expects {want.shape}")
            result[name] = value.to(want.dtype).contiguous()
        return result


def _fused_chain(converter) -> int | None:
    """For a converter that only stacks experts (``MergeModulelist(dim=0)``), optionally then
    concatenates the stacks (``Concatenate(dim >= 1)``): the concatenation dim (0 for none).
    None for any other chain."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", []))
    if converter.quantization_operation is not None or converter.distributed_operation is not None:
        return None
    if len(converter.target_patterns) != 1 or not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        return 0 if len(converter.source_patterns) == 1 else None
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim >= 1:
        return ops[1].dim
    return None


def plan_layer(
    model,
    keys: list[str],
    shape_of: Callable[[str], tuple[int, ...]],
    mapping: list,
    *,
    what: str,
    dtype_plan: dict | None = None,
    in_place: bool = True,
) -> LayerPlan:
    """Plan the loading of checkpoint `keys` into `model` (tensors on the meta device).

    Args:
        shape_of: a checkpoint key's shape as it will be read (from the shard header).
        mapping: transformers' conversion mapping of the model (`get_model_conversion_mapping`).
        what: names the part in error messages (``"layer 3"``).
        dtype_plan: transformers' ``{module pattern: dtype}`` for tensors kept in another dtype
            than the model's (``_keep_in_fp32_modules``); the rest take their meta tensor's dtype.
        in_place: fuse stacked experts by copying into their slots; False runs every converter
            through transformers' ops.

    Raises ValueError, before anything is read, when a checkpoint tensor's shape does not
    match the model's.
    """
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        build_glob_alternation,
        dot_natural_key,
        rename_source_key,
    )

    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict(keep_vars=True)
    prefix = model.base_model_prefix
    plan = LayerPlan()
    groups: dict[str, tuple[object, dict[str, list[str]]]] = {}

    kept = build_glob_alternation(list(dtype_plan))[:2] if dtype_plan else None

    def target(name: str) -> TargetTensor:
        t = meta[name]
        dtype = t.dtype
        if kept is not None and (m := kept[0].search(name)) is not None:
            dtype = dtype_plan[kept[1][m.lastgroup]]
        return plan.targets.setdefault(name, TargetTensor(name, tuple(t.shape), dtype))

    for key in sorted(keys, key=dot_natural_key):  # transformers' order: experts stack in index order
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, pattern = rename_source_key(key, [], [], prefix, meta)
        if name not in meta:
            continue  # not a tensor of this model (transformers ignores it too)
        if pattern is None:
            want = target(name)
            if tuple(shape_of(key)) != want.shape:
                raise ValueError(f"{what}: checkpoint tensor {key} has shape {tuple(shape_of(key))}, the model expects {want.shape} for {name}")
            plan.slots[key] = Slot(name)
            continue
        converter, sources = groups.setdefault(name, (by_pattern[pattern], defaultdict(list)))
        sources[pattern].append(key)

    for name, (converter, sources) in groups.items():
        dim = _fused_chain(converter) if in_place else None
        if dim is None:
            for produced in _converter_targets(converter, name):
                if produced in meta:
                    target(produced)
            plan.converted.append(Converted(copy.deepcopy(converter), name, dict(sources)))
            continue
        _plan_stack(plan, target(name), converter.source_patterns, sources, dim, shape_of, what)
    return plan


def _converter_targets(converter, first_target: str) -> list[str]:
    """The full names a converter producing `first_target` writes (one per target pattern)."""
    first = converter.target_patterns[0]
    if first not in first_target:
        return [first_target]
    head, _, tail = first_target.partition(first)
    return [head + p + tail for p in converter.target_patterns]


def _plan_stack(plan: LayerPlan, target: TargetTensor, patterns, sources, dim: int, shape_of, what: str) -> None:
    """Slots of stacked (and, with `dim` >= 1, concatenated along `dim`) expert tensors."""
    present = [p for p in patterns if p in sources]
    counts = {len(sources[p]) for p in present}
    shapes = {p: {tuple(shape_of(k)) for k in sources[p]} for p in present}
    if len(counts) != 1 or any(len(s) != 1 for s in shapes.values()):
        detail = {p: (len(sources[p]), sorted(shapes[p])) for p in present}
        raise ValueError(f"{what}: the checkpoint tensors of {target.name} differ in count or shape: {detail}")
    count = counts.pop()
    element = [next(iter(shapes[p])) for p in present]
    if dim and any(s[: dim - 1] != element[0][: dim - 1] or s[dim:] != element[0][dim:] for s in element):
        raise ValueError(f"{what}: the checkpoint tensors of {target.name} cannot be joined along dim {dim}: {element}")
    if dim == 0:
        fused = (count, *element[0])
    else:
        width = sum(s[dim - 1] for s in element)
        fused = (count, *element[0][: dim - 1], width, *element[0][dim:])
    if fused != target.shape:
        raise ValueError(f"{what}: the checkpoint tensors of {target.name} make shape {fused}, the model expects {target.shape}")
    start = 0
    for pattern, shape in zip(present, element):
        narrow = (dim - 1, start, shape[dim - 1]) if dim else None
        for index, key in enumerate(sources[pattern]):
            plan.slots[key] = Slot(target.name, index, narrow)
        start += shape[dim - 1] if dim else 0
