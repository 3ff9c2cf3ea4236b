"""Which implementation serves each op, and the call from the op to it.

Each op module names its implementations in one `OpTable`, right under the op::

    reference  superexperts_kernels.reference.<op file>:<op>_reference   pure torch
    triton     superexperts_kernels._triton.<op file>:<op>_triton        Triton launcher
    native     torch:ops.superexperts.<op>_native                        csrc/ kernels

A target is a ``"module:attribute"`` name imported on the first call that needs it, so
nothing here imports Triton or a kernel module until an op runs on it. `available`,
`select` and `backends` only read the tables and the environment.

Backends:

- ``reference``: pure torch; the test oracle, and the fallback on every device.
- ``triton``: the Triton kernels; on CUDA, and on CPU tensors only under
  ``TRITON_INTERPRET=1`` (set before the kernels are imported), which is how the tests
  exercise the kernels on machines without a GPU.
- ``native``: the C++/CUDA extension built from ``csrc/``, on the devices it was built for
  (`superexperts_kernels.native.info()`).

Each implementation also declares the optional op arguments it honours (``with_stats``,
``softcap``, ``attn_mask``). A call that sets one of them away from its default runs on a
backend that honours it. Which backend serves a call on a device type:

1. the one forced by `set_backend` / `use_backend` (an error if it cannot serve the call);
2. else the first of the device's order that runs there and honours the call's optional
   arguments: CUDA triton, native, reference; CPU native, reference (the environment
   variable ``SUPEREXPERTS_CPU_BACKEND`` puts one first on CPU). When the call's arguments
   skip the first backend that runs there, a warning says so once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pkgutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

BACKENDS = ("triton", "native", "reference")
DEVICE_TYPES = ("cpu", "cuda")
_ORDER = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}

_tables: dict[str, OpTable] = {}
_overrides: dict[tuple[str, str], str] = {}
_warned: set[tuple] = set()


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    target: ``"module:attribute"`` of a callable taking the op's arguments (the optional
        ones by keyword, and only when they differ from their defaults).
    devices: device types it runs on; None for any.
    options: the optional op arguments it honours.
    """

    target: str
    devices: tuple[str, ...] | None = None
    options: frozenset[str] | tuple[str, ...] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "options", frozenset(self.options))


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_usable(device_type: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device_type == ("cpu" if triton_interpreter_on() else "cuda")


class OpTable:
    """The implementations of op `op`; `defaults` holds its optional arguments' defaults."""

    def __init__(self, op: str, *, defaults: dict[str, object], **impls: Impl):
        unknown = set(impls) - set(BACKENDS)
        if unknown or "reference" not in impls:
            raise ValueError(f"{op}: backends must be among {BACKENDS} and include reference, got {sorted(impls)}")
        self.op = op
        self.defaults = defaults
        self.impls = impls
        self._resolved: dict[str, Callable] = {}
        _tables[op] = self

    def runs_on(self, backend: str, device_type: str) -> bool:
        impl = self.impls.get(backend)
        if impl is None or (backend == "triton" and not _triton_usable(device_type)):
            return False
        return impl.devices is None or device_type in impl.devices

    def resolve(self, backend: str) -> Callable:
        """The implementation's callable, imported on first use."""
        fn = self._resolved.get(backend)
        if fn is None:
            fn = self._resolved[backend] = pkgutil.resolve_name(self.impls[backend].target)
        return fn

    def choose(self, device_type: str, options: frozenset[str] = frozenset()) -> str:
        """The backend that serves a call on `device_type` setting `options` away from their defaults."""
        forced = _overrides.get((self.op, device_type))
        if forced is not None:
            missing = options - self.impls[forced].options
            if missing:
                raise ValueError(
                    f"superexperts.{self.op}: backend {forced!r} (forced by set_backend/use_backend) does not "
                    f"support {_names(missing)}; supported by: {self._honouring(options)}"
                )
            return forced
        candidates = [b for b in _order(device_type) if self.runs_on(b, device_type)]
        chosen = next((b for b in candidates if options <= self.impls[b].options), "reference")
        first = candidates[0] if candidates else "reference"
        if chosen != first and (self.op, device_type, first, options) not in _warned:
            _warned.add((self.op, device_type, first, options))
            warnings.warn(
                f"superexperts.{self.op} on {device_type}: the {first} backend cannot express "
                f"{_names(options - self.impls[first].options)}; such calls run on the {chosen} backend "
                "(slower, same numbers)",
                stacklevel=4,
            )
        return chosen

    def __call__(self, device_type: str, *args, **options):
        """Run the op: ``args`` are its required arguments, ``options`` its optional ones."""
        used = {k: v for k, v in options.items() if v is not self.defaults[k]}
        return self.resolve(self.choose(device_type, frozenset(used)))(*args, **used)

    def _honouring(self, options: frozenset[str]) -> str:
        return ", ".join(b for b, impl in self.impls.items() if options <= impl.options)


def _names(options) -> str:
    return ", ".join(f"`{o}`" for o in sorted(options))


def _order(device_type: str) -> tuple[str, ...]:
    order = _ORDER.get(device_type, ("reference",))
    env = os.environ.get("SUPEREXPERTS_CPU_BACKEND") if device_type == "cpu" else None
    if env:
        if env not in BACKENDS:
            raise ValueError(f"SUPEREXPERTS_CPU_BACKEND must be one of {BACKENDS}, got {env!r}")
        order = (env, *(b for b in order if b != env))
    return order


def _table(op: str) -> OpTable:
    if op not in _tables:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_tables)}")
    return _tables[op]


def available(op: str, backend: str, device_type: str) -> bool:
    """True when `backend` can run `op` on tensors of `device_type` (imports nothing)."""
    return _table(op).runs_on(backend, device_type)


def select(op: str, device_type: str) -> str:
    """Name of the backend that serves a call of `op` on `device_type` with default options."""
    return _table(op).choose(device_type)


def get_impl(op: str, device_type: str) -> Callable:
    """The callable `select` names (for benchmarks that time a backend directly)."""
    table = _table(op)
    return table.resolve(table.choose(device_type))


def set_backend(op: str, device_type: str, backend: str | None) -> None:
    """Force `backend` for `op` on `device_type` (None restores the default)."""
    table = _table(op)
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {DEVICE_TYPES}, got {device_type!r}")
    if backend is None:
        _overrides.pop((op, device_type), None)
        return
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not table.runs_on(backend, device_type):
        hint = ""
        if backend == "triton" and device_type == "cpu":
            hint = " (Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import)"
        raise ValueError(f"backend {backend!r} cannot run {op!r} on {device_type}{hint}")
    _overrides[(op, device_type)] = backend


@contextlib.contextmanager
def use_backend(op: str, device_type: str, backend: str) -> Iterator[None]:
    """Context manager form of `set_backend`."""
    previous = _overrides.get((op, device_type))
    set_backend(op, device_type, backend)
    try:
        yield
    finally:
        set_backend(op, device_type, previous)


def backends() -> dict[str, dict[str, str]]:
    """``{op: {device_type: backend}}``: which backend serves each op on each device."""
    return {op: {dev: select(op, dev) for dev in DEVICE_TYPES} for op in sorted(_tables)}
