"""Load a transformers MoE checkpoint directory for profiling, with clear errors.

- `load_model`: the whole model, on our experts and attention implementations
  (`load_model_in_background`: the same, read while the first forward runs);
- `build_skeleton`: the model on the meta device (but for its computed buffers);
- `LayerLoader`: the skeleton's embeddings, then its decoder layers one at a time, each read
  from the memory-mapped shards and written once into its final (fused) tensors
  (`superexperts.conversion`), optionally on a background thread ahead of use.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import pages
from .checkpoint import CheckpointReader
from .conversion import LayerPlan, plan_layer
from .families import is_supported, refusal_of, supported_model_types
from .layers import LayerParts, find_decoder_layers, find_layers, tag, text_config

if TYPE_CHECKING:
    from .distributed import ExpertShard

_FUSED_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")

# Models that `load_model_in_background` is still filling: model -> {layer index: its hook}.
_LOADING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(model_dir: str | Path):
    """Return the config of a checkpoint directory, or raise a clear error (also for a
    missing, truncated or corrupt safetensors shard: `check_shards`)."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"--model: {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {path} is not a transformers checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: {path / 'config.json'} cannot be read as a transformers config ({e})") from None
    check_shards(path)
    model_type = getattr(text_config(config), "model_type", None) or config.model_type
    if not (is_supported(model_type) or is_supported(config.model_type)):
        reason = refusal_of(config.model_type)
        if reason is not None:
            raise ValueError(f"--model: {reason}")
        supported = supported_model_types()
        raise ValueError(
            f"--model: unsupported architecture {config.model_type!r}: superexperts profiles MoE models whose experts "
            "transformers runs through its ExpertsInterface or that superexperts.adapters declares. Supported model "
            f"types (`superexperts families` lists them): {', '.join(supported)}"
        )
    return config


def check_shards(model_dir: Path) -> None:
    """Open the header of every safetensors shard of `model_dir` (those its index names, or
    all ``*.safetensors``): a missing, truncated or corrupt shard raises an error naming it
    before any weight is read."""
    from safetensors import SafetensorError, safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--model: {index} is not a safetensors index ({e!r})") from None
    else:
        names = sorted(f.name for f in model_dir.glob("*.safetensors"))
    for name in names:
        shard = model_dir / name
        if not shard.is_file():
            raise FileNotFoundError(f"--model: shard {shard} named by {index.name} is missing")
        try:
            with safe_open(str(shard), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise ValueError(
                f"--model: {shard} is not a readable safetensors file ({e}); the checkpoint is truncated or corrupt: "
                "copy or download that shard again"
            ) from None


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda``, ``cuda:N``; a clear
    ValueError for anything else or for a CUDA device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_dtype(model_dir: str | Path, dtype: str | torch.dtype) -> torch.dtype:
    """``"auto"`` (the checkpoint's dtype, float32 when it names none), a name in `DTYPES`, or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return DTYPES[dtype]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).dtype or torch.float32


def load_model(model_dir: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """Load (model, tokenizer or None) from a checkpoint directory onto `device`, on our implementations.

    Every checkpoint tensor is copied once, from the memory-mapped shards into its final tensor
    (per-expert tensors straight into their fused slots; `LayerLoader`).
    """
    config = check_model_dir(model_dir)
    if _quantization(config) not in (None, "fp8"):
        return _from_pretrained(model_dir, dtype, device), load_tokenizer(model_dir)
    with _loader(model_dir, dtype, device, background=False) as (model, loader):
        for p in find_layers(model):
            loader.load_layer(p.index, p)
    return model.eval(), load_tokenizer(model_dir)


def _quantization(config) -> str | None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method))


def auto_model_class(config):
    """The transformers auto class that builds `config`'s model with its language-model head:
    ``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for the multimodal families
    that have no causal-LM class (Step3p7)."""
    import transformers

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(f"--model: transformers has no causal-LM or image-text-to-text class for {config.model_type!r}")


def _from_pretrained(model_dir, dtype: str, device: str):
    """transformers' own loading (for quantization formats other than FP8 block scales, which
    transformers dequantizes itself)."""
    from .integration import register

    register()
    model = auto_model_class(check_model_dir(model_dir)).from_pretrained(
        model_dir, dtype=resolve_dtype(model_dir, dtype), experts_implementation="superexperts",
        attn_implementation="superexperts_sink",
    )
    return model.to(resolve_device(device)).eval()


@contextlib.contextmanager
def load_model_in_background(model_dir: str | Path, *, dtype: str = "auto", device: str = "auto") -> Iterator[tuple]:
    """`load_model` that overlaps the reading with the first forward: yields (model, tokenizer)
    once the embeddings are in, while the decoder layers are read in order on a background
    thread; the first forward through a layer waits for it and puts it in place (until then its
    parameters are on the meta device: run a forward before touching them). Leaving the block
    cancels the reads still in flight. `superexperts.profile` runs such a model's first batches
    layer by layer (`layers_loading`), so that computing a layer hides reading the next.

        with load_model_in_background(path) as (model, tokenizer):
            result = superexperts.profile(model, tokens)
    """
    if _quantization(check_model_dir(model_dir)) not in (None, "fp8"):
        yield _from_pretrained(model_dir, dtype, device), load_tokenizer(model_dir)
        return
    with _loader(model_dir, dtype, device, background=True) as (model, loader):
        parts = find_layers(model)
        for p in parts:
            loader.prefetch(p.index, p)

        def arrive(p: LayerParts):
            def hook(module, args):
                handles.pop(p.index).remove()
                loader.load_layer(p.index, p)

            return hook

        handles = {p.index: p.layer.register_forward_pre_hook(arrive(p)) for p in parts}
        _LOADING[model] = handles
        try:
            yield model.eval(), load_tokenizer(model_dir)
        finally:
            _LOADING.pop(model, None)
            for h in handles.values():
                h.remove()


def layers_loading(model: nn.Module) -> bool:
    """Whether some decoder layers of `model` are still being read by `load_model_in_background`
    (they arrive at their first forward)."""
    return bool(_LOADING.get(model))


@contextlib.contextmanager
def _loader(model_dir, dtype, device, *, background: bool) -> Iterator[tuple]:
    """(skeleton with its embeddings, lm_head and norms loaded, its `LayerLoader`), closed at exit."""
    torch_dtype = resolve_dtype(model_dir, dtype)
    dev = resolve_device(device)
    model = build_skeleton(model_dir, dtype=torch_dtype, device=dev)
    with LayerLoader(model, model_dir, dtype=torch_dtype, device=dev, background=background) as loader:
        loader.load_base(lm_head=True)
        yield model, loader


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, or None when it has none (pre-tokenized data still works)."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")
    if not any((Path(model_dir) / f).is_file() for f in files):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        return None


def build_skeleton(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device):
    """The model on the meta device, but for its non-persistent buffers (rotary tables), which
    are computed on `device` as transformers' own init does."""
    from transformers import AutoConfig

    from .integration import register

    register()
    config = AutoConfig.from_pretrained(model_dir)
    method = _quantization(config)
    if method is not None:
        if method != "fp8":
            raise ValueError(f"--model: quantization {method!r} is not supported by layer streaming (FP8 block scales are)")
        del config.quantization_config  # dequantized on load by CheckpointReader
    with torch.device("meta"):
        model = auto_model_class(config).from_config(
            config, dtype=dtype, experts_implementation="superexperts", attn_implementation="superexperts_sink"
        )
    materialize_buffers(model, device)
    return model.eval()


def materialize_buffers(model, device: torch.device) -> None:
    """Put the non-persistent buffers (rotary tables: computed, never in a checkpoint) of a
    meta-built model on `device`, computed by transformers' own init."""
    owners = set()
    for name, buf in model.named_non_persistent_buffers():
        module_path, _, buf_name = name.rpartition(".")
        owner = model.get_submodule(module_path)
        owner._buffers[buf_name] = torch.empty_like(buf, device=device)
        owners.add(owner)
    with torch.no_grad():
        for owner in owners:
            model._init_weights(owner)


class LayerLoadError(RuntimeError):
    """Reading or converting a part of the checkpoint failed; the message names the part, the
    tensor and its shard."""


class HeldBytes:
    """Bytes of layer tensors a `LayerLoader` holds (installed layers and reads in flight), and
    their peak. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.now += n
            self.peak = max(self.peak, self.now)

    def sub(self, n: int) -> None:
        with self._lock:
            self.now -= n


class _Cancelled(Exception):
    pass


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class _LayerRead:
    """A layer read on the background thread. `main` resolves to the layer's tensors once all
    but the held-back keys (`tail`) are in; `done` (the thread's future) once those are too.
    The tail is read only after the layers installed when the read started (`blockers`) are
    freed; until then the forward of each module of `owners` waits for it (`hooks`)."""

    what: str
    tail: list[str]
    tail_bytes: int
    owners: list[nn.Module]
    blockers: frozenset[int]
    main: Future = field(default_factory=Future)
    done: Future | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    hooks: list = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)  # the tail's places in the layer's tensors


class LayerLoader:
    """Loads and frees the decoder layers of a meta skeleton from a checkpoint directory.

    `load_layer` reads a layer (or takes the read `prefetch` started on a background thread)
    and puts its tensors into the model on `device`; `free_layer` returns it to meta. Each
    checkpoint tensor is copied once from the checkpoint into its final tensor.
    `held` counts the layer bytes held at once (for the memory bound: one layer, two with a
    prefetch in flight); `read_seconds` and `wait_seconds` say how long each read took and
    how long the caller waited for it (the part of the reading that computing did not hide).
    Use as a context manager, or call `close`: it cancels a read in flight.

    Two things keep a streamed run within two layers of resident memory on CPU:
    `reserve` faults in the next layer's buffers while the first layer is read (not while the
    first layer computes), and `prefetch(..., hold_back=n)` leaves the last `n` bytes of a
    layer's experts unread (their pages given back) until the layer before it is freed.
    """

    def __init__(
        self,
        model,
        model_dir: str | Path,
        *,
        dtype: torch.dtype,
        device: torch.device,
        background: bool = True,
        in_place: bool = True,
    ):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model = model
        layers_path, self.layers = find_decoder_layers(model)
        # Checkpoint keys name the layer list as the model does ("layers", DBRX's "blocks").
        self.reader = CheckpointReader(model_dir, layers_name=layers_path.rpartition(".")[2])
        self.dtype = dtype
        self.device = torch.device(device)
        self.mapping = get_model_conversion_mapping(model)
        self.dtype_plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
        self.in_place = in_place
        self.held = HeldBytes()
        self.read_seconds: dict[str, float] = {}  # part ("layer 3") -> seconds its read took
        self.wait_seconds: dict[str, float] = {}  # part -> seconds `load_layer` waited for it
        self.tail_wait_seconds: dict[str, float] = {}  # part -> seconds its forward waited for held-back tensors
        self.held_back: dict[str, list[str]] = {}  # part -> the checkpoint keys its read held back (file order)
        layers_name = next(n for n, m in model.named_modules() if m is self.layers)
        self._prefix = f"{layers_name}." if layers_name else ""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="superexperts-read") if background else None
        self._helper: ThreadPoolExecutor | None = None  # faults in `reserve`d buffers
        self._pending: dict[int, _LayerRead] = {}
        self._tails: dict[int, _LayerRead] = {}  # id(installed layer) -> its read, while its tail is out
        self._held_back: dict[int, list[torch.Tensor]] = {}  # id(installed layer) -> its tail's places
        self._installed: dict[int, int] = {}  # id(layer) -> bytes held
        self._freed = threading.Condition()  # guards `_installed`; notified when a layer is freed
        self._cancel = threading.Event()
        # Buffers a read allocated (part -> tensors), then the installed layer's (id -> tensors):
        # on CPU, `free_layer` keeps them as spares that the next read fills again.
        self._allocated: dict[str, list[torch.Tensor]] = {}
        self._reusable: dict[int, list[torch.Tensor]] = {}
        self._spare: dict[tuple, list[torch.Tensor]] = {}
        self._reserved: dict[str, Future] = {}  # part -> its faulted-in buffers {(shape, dtype): [tensor]}
        self._spare_lock = threading.Lock()

    def __enter__(self) -> LayerLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _plan(self, keys: list[str], what: str, expert_range=None, num_experts=None) -> LayerPlan:
        keys = self.reader.select(keys, expert_range)
        return plan_layer(
            self.model, keys, lambda k: self.reader.shape(k, expert_range, num_experts), self.mapping,
            what=what, dtype_plan=self.dtype_plan, in_place=self.in_place,
        )

    def _read(self, plan: LayerPlan, what: str, held: HeldBytes | None, expert_range=None, num_experts=None,
              job: _LayerRead | None = None) -> dict[str, torch.Tensor]:
        """Read and convert the tensors of `plan` (CPU); raises LayerLoadError naming `what`.
        With `job`, its `main` future gets the tensors before its `tail` keys are read."""

        def empty(shape, dtype):
            t = pages.empty(tuple(shape), dtype)
            if held is not None:
                held.add(t.numel() * t.element_size())
            return t

        start = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        key = None
        tail = job.tail if job is not None else []
        handed = False  # whether `out` was handed to the caller (its bytes are then the layer's)
        try:
            # Buffers `reserve`d for this part, then the freed layer's that fit (the rest of them
            # released), then new ones.
            reserved = self._reserved.pop(what, None)
            reserved = reserved.result() if reserved is not None else {}
            def take(shape, dtype):
                t = _pop(reserved, shape, dtype)
                return t if t is not None or held is None else self._take_spare(shape, dtype)

            allocated = plan.allocate(take)
            self.held.sub(sum(t.numel() * t.element_size() for ts in reserved.values() for t in ts))
            self._drop_spares()
            for name, t in allocated.items():
                if t is None:
                    allocated[name] = empty(plan.targets[name].shape, plan.targets[name].dtype)
            out.update(allocated)
            if job is not None:
                job.views = [plan.slot_view(out, k) for k in tail]
                for v in job.views:
                    pages.release(v)
            group_of = {k: g for g in plan.converted for keys in g.sources.values() for k in keys}
            collected: dict[int, dict[str, torch.Tensor]] = {id(g): {} for g in plan.converted}
            held_back = set(tail)
            keys = self.reader.file_order([k for k in plan.keys() if k not in held_back])
            stream = self._tensors(keys, expert_range, num_experts)
            for key in keys:  # the reader yields in this order: an error in next() is this key's
                tensor = next(stream)
                if key in plan.slots:
                    plan.fill(out, key, tensor)
                else:
                    group = group_of[key]
                    collected[id(group)][key] = tensor.to(plan.targets[group.first_target].dtype, copy=True)
            key = None
            for group in plan.converted:
                for name, t in plan.convert(self.model, group, collected.pop(id(group))).items():
                    out[name] = t
                    if held is not None:
                        held.add(t.numel() * t.element_size())
            self.read_seconds[what] = time.perf_counter() - start
            if held is not None:
                self._allocated[what] = list(allocated.values())
            if job is None:
                return out
            job.main.set_result(out)
            handed = True
            if tail:
                self._wait_for_blockers(job)
                start = time.perf_counter()
                stream = self._tensors(tail, expert_range, num_experts)
                for key in tail:
                    plan.fill(out, key, next(stream))
                key = None
                self.read_seconds[what] += time.perf_counter() - start
        except BaseException as e:
            if held is not None and not handed:
                held.sub(_nbytes(out))
            if isinstance(e, (_Cancelled, KeyboardInterrupt)):
                raise
            where = f"{key} in {self.reader.dir / self.reader.weight_map[key]}" if key else str(self.reader.dir)
            raise LayerLoadError(f"{what}: reading {where} failed: {type(e).__name__}: {e}") from e
        return out

    def _tensors(self, keys: list[str], expert_range, num_experts) -> Iterator[torch.Tensor]:
        """The tensors of `keys` (`CheckpointReader.tensors`, in that order), stopping at `close`."""
        for _, tensor in self.reader.tensors(keys, dtype=self.dtype, expert_range=expert_range, num_experts=num_experts):
            if self._cancel.is_set():
                raise _Cancelled
            yield tensor

    def _wait_for_blockers(self, job: _LayerRead) -> None:
        with self._freed:
            while any(b in self._installed for b in job.blockers):
                if self._cancel.is_set() or job.cancel.is_set():
                    raise _Cancelled
                self._freed.wait(0.1)

    def _take_spare(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A buffer of a freed layer with this shape and dtype (its bytes still in `held`), or None."""
        with self._spare_lock:
            return _pop(self._spare, shape, dtype)

    def _drop_spares(self) -> None:
        """Release the freed layer's buffers that no read took."""
        with self._spare_lock:
            dropped, self._spare = self._spare, {}
        self.held.sub(sum(t.numel() * t.element_size() for ts in dropped.values() for t in ts))

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            module_path, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_path)
            t = t.to(self.device)
            if attr in module._buffers:
                module._buffers[attr] = t
            else:
                setattr(module, attr, nn.Parameter(t, requires_grad=False))

    def load_base(self, lm_head: bool = False) -> None:
        """Everything outside the decoder layers: embeddings, final norm and, with `lm_head`,
        the output projection (tied to the embeddings when the checkpoint has none)."""
        keys = [k for k in self.reader.other_keys if lm_head or "lm_head" not in k]
        self._install(self._read(self._plan(keys, "embeddings and norms"), "embeddings and norms", None))
        layer_params = {id(p) for p in self.layers.parameters()}
        if lm_head:
            self.model.tie_weights()
        modules = [self.model] if lm_head else [self.model.base_model.get_input_embeddings()]
        still_meta = [n for m in modules for n, p in m.named_parameters() if p.device.type == "meta" and id(p) not in layer_params]
        if still_meta:
            raise ValueError(f"embeddings and norms: no checkpoint tensor for {still_meta[:4]} in {self.reader.dir}")

    def _layer_plan(self, index: int, parts: LayerParts, shard: ExpertShard | None) -> tuple[LayerPlan, tuple]:
        """Plan layer `index` (its experts resized to `shard` first); raises ValueError for a
        parameter the checkpoint does not have, before anything is read."""
        expert_range, num_global = None, None
        if shard is not None and parts.experts is not None:
            _resize_meta_experts(parts.experts, shard.count)
            tag(parts.experts).shard = shard
            expert_range, num_global = (shard.start, shard.start + shard.count), shard.num_global
        what = f"layer {index}"
        plan = self._plan(self.reader.layer_keys.get(index, []), what, expert_range, num_global)
        prefix = f"{self._prefix}{index}."
        missing = [n for n, _ in self.layers[index].named_parameters() if prefix + n not in plan.targets]
        if missing:
            raise ValueError(f"{what}: no checkpoint tensor for {missing[:4]} in {self.reader.dir}")
        return plan, (what, self.held, expert_range, num_global)

    def _tail(self, plan: LayerPlan, parts: LayerParts, hold_back: int, expert_range, num_experts) -> tuple[list[str], int]:
        """The experts' checkpoint keys (last in file order) holding at least `hold_back`
        bytes of the layer, at most all of its experts' tensors, and their bytes."""
        if hold_back <= 0 or parts.experts is None or self.device.type != "cpu":
            return [], 0
        prefix = next(n for n, m in self.model.named_modules() if m is parts.experts) + "."
        own = {f"{prefix}{n}" for n, _ in parts.experts.named_parameters(recurse=False)}
        keys = self.reader.file_order([k for k, slot in plan.slots.items() if slot.target in own])
        tail, total = [], 0
        for key in reversed(keys):
            if total >= hold_back:
                break
            tail.append(key)
            total += math.prod(self.reader.shape(key, expert_range, num_experts)) * plan.targets[plan.slots[key].target].dtype.itemsize
        return self.reader.file_order(tail), total

    def prefetch(self, index: int, parts: LayerParts, shard: ExpertShard | None = None, *, hold_back: int = 0) -> None:
        """Start reading layer `index` on the background thread (no-op without one).

        hold_back: on CPU, about this many bytes of the layer's expert tensors (the last in
            file order) are read only once the layers installed now are freed; `load_layer`
            puts the layer in place without them, and the experts' first forward waits for
            them (free the layers before running this one)."""
        if self._pool is None or index in self._pending or not 0 <= index < len(self.layers):
            return
        plan, args = self._layer_plan(index, parts, shard)
        tail, tail_bytes = self._tail(plan, parts, hold_back, *args[2:])
        with self._freed:
            blockers = frozenset(self._installed)
        job = _LayerRead(args[0], tail, tail_bytes, [parts.experts] if tail else [], blockers)
        if tail:
            self.held_back[args[0]] = tail
        job.done = self._pool.submit(self._run_read, plan, args, job)
        self._pending[index] = job

    def _run_read(self, plan: LayerPlan, args: tuple, job: _LayerRead) -> dict[str, torch.Tensor]:
        try:
            return self._read(plan, *args, job=job)
        except BaseException as e:
            if not job.main.done():
                job.main.set_exception(e)
            raise

    def reserve(self, index: int, parts: LayerParts, shard: ExpertShard | None = None, *, hold_back: int = 0) -> None:
        """On CPU with a background thread, allocate layer `index`'s buffers now and fault their
        pages in on a helper thread, for that layer's read to fill (call it while the layer
        before is being read: the first freshly allocated layer read while another computes
        otherwise faults its pages in on the CPUs the computation uses). The pages of the
        `hold_back` tail (as `prefetch` gives it) are left out."""
        what = f"layer {index}"
        if self._pool is None or self.device.type != "cpu" or what in self._reserved or not 0 <= index < len(self.layers):
            return
        plan, args = self._layer_plan(index, parts, shard)
        tail, _ = self._tail(plan, parts, hold_back, *args[2:])
        shapes = plan.allocate(lambda shape, dtype: (tuple(shape), dtype))
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="superexperts-reserve")

        def fault_in() -> dict[tuple, list[torch.Tensor]]:
            got: dict[tuple, list[torch.Tensor]] = {}
            views = {}
            for name, (shape, dtype) in shapes.items():
                t = pages.empty(shape, dtype)
                self.held.add(t.numel() * t.element_size())
                got.setdefault((shape, dtype), []).append(t)
                views[name] = t
            for name, t in views.items():
                if self._cancel.is_set():
                    break
                skip = []
                for key in tail:
                    if plan.slots[key].target == name:
                        v = plan.slot_view(views, key)
                        skip.append((v.data_ptr() - t.data_ptr(), v.data_ptr() - t.data_ptr() + v.numel() * v.element_size()))
                pages.touch(t, skip)
            return got

        self._reserved[what] = self._helper.submit(fault_in)

    def load_layer(self, index: int, parts: LayerParts, shard: ExpertShard | None = None) -> nn.Module:
        """Put decoder layer `index` on the device (the prefetched read, or a read now); with
        `shard`, only those experts."""
        start = time.perf_counter()
        job = self._pending.pop(index, None)
        if job is not None:
            tensors = job.main.result()
        else:
            plan, args = self._layer_plan(index, parts, shard)
            tensors = self._read(plan, *args)
        self.wait_seconds[f"layer {index}"] = time.perf_counter() - start
        layer = self.layers[index]
        self._install(tensors)
        with self._freed:
            self._installed[id(layer)] = self._installed.get(id(layer), 0) + _nbytes(tensors)
        allocated = self._allocated.pop(f"layer {index}", [])
        if self.device.type == "cpu":  # installed as they are (elsewhere: copied to the device)
            self._reusable.setdefault(id(layer), []).extend(allocated)
        if job is not None and job.tail:
            self._tails[id(layer)] = job
            self._held_back[id(layer)] = job.views
            job.hooks = [m.register_forward_pre_hook(lambda *_, layer=layer: self._await_tail(layer)) for m in job.owners]
        return layer

    def _await_tail(self, layer: nn.Module) -> None:
        """Wait for the held-back tensors of `layer` (raises the read's error)."""
        job = self._tails.get(id(layer))
        if job is None:
            return
        with self._freed:
            blocked = not job.done.done() and any(b in self._installed for b in job.blockers)
        if blocked:
            raise RuntimeError(
                f"{job.what}: its last {job.tail_bytes / 2**20:.0f} MB of expert tensors are read once the layers loaded "
                "before it are freed (hold_back): free them before running it"
            )
        del self._tails[id(layer)]
        for h in job.hooks:
            h.remove()
        start = time.perf_counter()
        job.done.result()
        self.tail_wait_seconds[job.what] = time.perf_counter() - start

    def layer_bytes(self, layer: nn.Module) -> int:
        """Bytes of the tensors (parameters and buffers) loaded into `layer`."""
        return self._installed.get(id(layer), 0)

    def free_layer(self, layer: nn.Module) -> None:
        """Return a loaded layer's tensors to the meta device. On CPU the buffers the reads
        allocated for it are kept for the next read (which fills them again instead of
        faulting in fresh zeroed pages), and released once that read has taken what fits."""
        job = self._tails.pop(id(layer), None)
        if job is not None:  # its held-back tensors are no longer wanted: stop writing them
            job.cancel.set()
            for h in job.hooks:
                h.remove()
            with contextlib.suppress(BaseException):
                job.done.result()
        layer.to("meta")
        kept = self._reusable.pop(id(layer), [])
        for v in self._held_back.pop(id(layer), []) if kept else []:
            pages.release(v)  # a later read of this shape holds the same places back: not resident meanwhile
        with self._spare_lock:
            for t in kept:
                self._spare.setdefault((tuple(t.shape), t.dtype), []).append(t)
        with self._freed:
            installed = self._installed.pop(id(layer), 0)
            self._freed.notify_all()
        self.held.sub(installed - sum(t.numel() * t.element_size() for t in kept))

    def close(self) -> None:
        """Cancel the reads in flight and stop the background threads."""
        self._cancel.set()
        with self._freed:
            self._freed.notify_all()
        for job in self._pending.values():
            job.done.cancel()
        for future in self._reserved.values():
            future.cancel()
        for pool in (self._pool, self._helper):
            if pool is not None:
                pool.shutdown(wait=True)
        for job in self._pending.values():
            if job.main.done() and job.main.exception() is None:
                self.held.sub(_nbytes(job.main.result()))
        for future in self._reserved.values():
            if not future.cancelled() and future.exception() is None:
                self.held.sub(sum(t.numel() * t.element_size() for ts in future.result().values() for t in ts))
        self._pending.clear()
        self._reserved.clear()
        self._drop_spares()
        self._allocated.clear()
        self._reusable.clear()
        self._held_back.clear()
        self.reader.close()


def _pop(pool: dict[tuple, list[torch.Tensor]], shape, dtype: torch.dtype) -> torch.Tensor | None:
    """Take a tensor of this shape and dtype out of `pool` (``(shape, dtype) -> [tensor]``)."""
    free = pool.get((tuple(shape), dtype))
    return free.pop() if free else None


def _resize_meta_experts(experts: nn.Module, count: int) -> None:
    for name in _FUSED_EXPERT_PARAMS:
        p = getattr(experts, name, None)
        if isinstance(p, torch.Tensor):
            setattr(experts, name, nn.Parameter(torch.empty((count, *p.shape[1:]), dtype=p.dtype, device="meta"), requires_grad=False))
    experts.num_experts = count
