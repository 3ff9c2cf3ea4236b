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
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

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


class LayerLoader:
    """Loads and frees the decoder layers of a meta skeleton from a checkpoint directory.

    `load_layer` reads a layer (or takes the read `prefetch` started on a background thread)
    and puts its tensors into the model on `device`; `free_layer` returns it to meta. Each
    checkpoint tensor is copied once from the mapped shard into its final tensor.
    `held` counts the layer bytes held at once (for the memory bound: one layer, two with a
    prefetch in flight); `read_seconds` and `wait_seconds` say how long each read took and
    how long the caller waited for it (the part of the reading that computing did not hide). Use as a context manager, or call `close`: it cancels a read in flight.
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
        layers_name = next(n for n, m in model.named_modules() if m is self.layers)
        self._prefix = f"{layers_name}." if layers_name else ""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="superexperts-read") if background else None
        self._pending: dict[int, Future] = {}
        self._installed: dict[int, int] = {}  # id(layer) -> bytes held
        self._cancel = threading.Event()
        # Buffers a read allocated (part -> tensors), then the installed layer's (id -> tensors):
        # on CPU, `free_layer` keeps them as spares that the next read fills again.
        self._allocated: dict[str, list[torch.Tensor]] = {}
        self._reusable: dict[int, list[torch.Tensor]] = {}
        self._spare: dict[tuple, list[torch.Tensor]] = {}
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

    def _read(self, plan: LayerPlan, what: str, held: HeldBytes | None, expert_range=None, num_experts=None) -> dict[str, torch.Tensor]:
        """Read and convert the tensors of `plan` (CPU); raises LayerLoadError naming `what`."""

        def empty(shape, dtype):
            t = torch.empty(shape, dtype=dtype)
            if held is not None:
                held.add(t.numel() * t.element_size())
            return t

        start = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        key = None
        try:
            # The freed layer's buffers that fit first, the rest of them released, then new ones.
            allocated = plan.allocate(self._take_spare if held is not None else lambda shape, dtype: None)
            self._drop_spares()
            for name, t in allocated.items():
                if t is None:
                    allocated[name] = empty(plan.targets[name].shape, plan.targets[name].dtype)
            out.update(allocated)
            group_of = {k: g for g in plan.converted for keys in g.sources.values() for k in keys}
            collected: dict[int, dict[str, torch.Tensor]] = {id(g): {} for g in plan.converted}
            keys = self.reader.file_order(plan.keys())
            stream = self.reader.tensors(keys, dtype=self.dtype, expert_range=expert_range, num_experts=num_experts)
            for key in keys:  # the reader yields in this order: an error in next() is this key's
                _, tensor = next(stream)
                if self._cancel.is_set():
                    raise _Cancelled
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
        except BaseException as e:
            if held is not None:
                held.sub(_nbytes(out))
            if isinstance(e, (_Cancelled, KeyboardInterrupt)):
                raise
            where = f"{key} in {self.reader.dir / self.reader.weight_map[key]}" if key else str(self.reader.dir)
            raise LayerLoadError(f"{what}: reading {where} failed: {type(e).__name__}: {e}") from e
        self.read_seconds[what] = time.perf_counter() - start
        if held is not None:
            self._allocated[what] = list(allocated.values())
        return out

    def _take_spare(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A buffer of a freed layer with this shape and dtype (its bytes still in `held`), or None."""
        with self._spare_lock:
            free = self._spare.get((tuple(shape), dtype))
            return free.pop() if free else None

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

    def prefetch(self, index: int, parts: LayerParts, shard: ExpertShard | None = None) -> None:
        """Start reading layer `index` on the background thread (no-op without one)."""
        if self._pool is None or index in self._pending or not 0 <= index < len(self.layers):
            return
        plan, args = self._layer_plan(index, parts, shard)
        self._pending[index] = self._pool.submit(self._read, plan, *args)

    def load_layer(self, index: int, parts: LayerParts, shard: ExpertShard | None = None) -> nn.Module:
        """Put decoder layer `index` on the device (the prefetched read, or a read now); with
        `shard`, only those experts."""
        start = time.perf_counter()
        future = self._pending.pop(index, None)
        if future is not None:
            tensors = future.result()
        else:
            plan, args = self._layer_plan(index, parts, shard)
            tensors = self._read(plan, *args)
        self.wait_seconds[f"layer {index}"] = time.perf_counter() - start
        layer = self.layers[index]
        self._install(tensors)
        self._installed[id(layer)] = self._installed.get(id(layer), 0) + _nbytes(tensors)
        allocated = self._allocated.pop(f"layer {index}", [])
        if self.device.type == "cpu":  # installed as they are (elsewhere: copied to the device)
            self._reusable.setdefault(id(layer), []).extend(allocated)
        return layer

    def layer_bytes(self, layer: nn.Module) -> int:
        """Bytes of the tensors (parameters and buffers) loaded into `layer`."""
        return self._installed.get(id(layer), 0)

    def free_layer(self, layer: nn.Module) -> None:
        """Return a loaded layer's tensors to the meta device. On CPU the buffers the reads
        allocated for it are kept for the next read (which fills them again instead of
        faulting in fresh zeroed pages), and released once that read has taken what fits."""
        layer.to("meta")
        kept = self._reusable.pop(id(layer), [])
        with self._spare_lock:
            for t in kept:
                self._spare.setdefault((tuple(t.shape), t.dtype), []).append(t)
        self.held.sub(self._installed.pop(id(layer), 0) - sum(t.numel() * t.element_size() for t in kept))

    def close(self) -> None:
        """Cancel the reads in flight and stop the background thread."""
        self._cancel.set()
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
        for future in self._pending.values():
            if not future.cancelled() and future.exception() is None:
                self.held.sub(_nbytes(future.result()))
        self._pending.clear()
        self._drop_spares()
        self._allocated.clear()
        self._reusable.clear()
        self.reader.close()


def _resize_meta_experts(experts: nn.Module, count: int) -> None:
    for name in _FUSED_EXPERT_PARAMS:
        p = getattr(experts, name, None)
        if isinstance(p, torch.Tensor):
            setattr(experts, name, nn.Parameter(torch.empty((count, *p.shape[1:]), dtype=p.dtype, device="meta"), requires_grad=False))
    experts.num_experts = count
