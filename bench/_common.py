"""Shared benchmark plumbing: machine record, timers, peak memory, table and JSON output."""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).parent / "results"


def run_child(module: str, args: list[str], *, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh process from the repository root (peak memory is
    per process), its output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, check=check)


def machine() -> dict:
    """Device name and library versions, recorded with every number."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        from superexperts_kernels import native

        native_info = native.info()
        info["native_cpu_capability"] = native_info.get("cpu_capability")
        info["native_cpu_gemm_dtype"] = native_info.get("cpu_gemm_dtype")
    except ImportError:
        pass
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    return info


def _cpuinfo(field: str) -> str | None:
    """The value of the first /proc/cpuinfo line naming `field`, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU's feature flags (/proc/cpuinfo), or [] where that is not readable."""
    return (_cpuinfo("flags") or "").split()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 1, reps: int = 5
) -> dict[str, float]:
    """Median wall time in ms of each of `fns`, timed in turns (one call of each per round),
    so that a change of machine load during the run reaches every method alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated during `fn()` above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def peak_rss_mb(reset: bool = False) -> float:
    """Peak RSS of this process in MB (Linux VmHWM). `reset` first hands freed heap memory back
    to the OS (else a method could reuse pages that building its inputs left resident, and show
    no growth) and restarts the peak at the current RSS.

    Not ``ru_maxrss``: that survives fork and exec, so a child would start at its parent's peak.
    """
    if reset:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def write_json(name: str, payload: dict, out: str | None = None) -> Path:
    """Write `payload` with the machine record to bench/results/<name>_<device>.json (or `out`)."""
    info = machine()
    device = info["device"].replace(" ", "_")
    path = Path(out) if out else RESULTS_DIR / f"{name}_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": info, **payload}, f, indent=2)
    print(f"wrote {path}")
    return path
