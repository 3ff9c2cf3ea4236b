"""Which implementation serves each op on each device type.

Backends:

- ``reference``: pure torch; the test oracle and the fallback everywhere.
- ``triton``: the Triton kernels; on CUDA, and on CPU tensors only under
  ``TRITON_INTERPRET=1`` (set before the kernels are imported), which is how the tests
  exercise the kernels on machines without a GPU.
- ``native``: the C++/CUDA extension built from ``csrc/`` when it is installed.

The default per device is the fastest backend present (CUDA: triton, then native, then
reference; CPU: native, then reference). ``set_backend`` / ``use_backend`` or the
environment variable ``SUPEREXPERTS_CPU_BACKEND`` override it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

BACKENDS = ("triton", "native", "reference")
DEVICE_TYPES = ("cpu", "cuda")

_impls: dict[str, dict[str, Callable]] = {}
_overrides: dict[tuple[str, str], str] = {}
_loaders: dict[str, list[Callable[[], None]]] = {}


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Make `fn` the `backend` implementation of `op` (same signature as the op)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _impls.setdefault(op, {})[backend] = fn


def register_loader(backend: str, loader: Callable[[], None]) -> None:
    """`loader()` imports a backend lazily (and calls `register_impl`) on first use."""
    _loaders.setdefault(backend, []).append(loader)


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_usable(device_type: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        return not triton_interpreter_on()
    return device_type == "cpu" and triton_interpreter_on()


def _ensure_loaded(backend: str) -> None:
    for loader in _loaders.pop(backend, []):
        loader()


def available(op: str, backend: str, device_type: str) -> bool:
    """True when `backend` can run `op` on tensors of `device_type`."""
    if backend == "triton" and not _triton_usable(device_type):
        return False
    _ensure_loaded(backend)
    impl = _impls.get(op, {}).get(backend)
    if impl is None:
        return False
    supports = getattr(impl, "device_types", None)
    return supports is None or device_type in supports


def _default(op: str, device_type: str) -> str:
    env = os.environ.get("SUPEREXPERTS_CPU_BACKEND") if device_type == "cpu" else None
    if env:
        if env not in BACKENDS:
            raise ValueError(f"SUPEREXPERTS_CPU_BACKEND must be one of {BACKENDS}, got {env!r}")
        if available(op, env, device_type):
            return env
    order = ("triton", "native", "reference") if device_type == "cuda" else ("native", "reference")
    for backend in order:
        if available(op, backend, device_type):
            return backend
    return "reference"


def select(op: str, device_type: str) -> str:
    """Name of the backend that serves `op` on `device_type` now."""
    chosen = _overrides.get((op, device_type))
    if chosen is not None:
        return chosen
    return _default(op, device_type)


def get_impl(op: str, device_type: str) -> Callable:
    backend = select(op, device_type)
    _ensure_loaded(backend)
    return _impls[op][backend]


def set_backend(op: str, device_type: str, backend: str | None) -> None:
    """Force `backend` for `op` on `device_type` (None restores the default)."""
    if op not in _impls:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_impls)}")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {DEVICE_TYPES}, got {device_type!r}")
    if backend is None:
        _overrides.pop((op, device_type), None)
        return
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not available(op, backend, device_type):
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
    return {op: {dev: select(op, dev) for dev in DEVICE_TYPES} for op in sorted(_impls)}
