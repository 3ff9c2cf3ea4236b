"""Build script: the pure-Python package always; the native extension from csrc/ when it can.

The extension (``superexperts_kernels._native``) is built against the torch already
installed, so install with ``pip install --no-build-isolation .`` to get it (a build-system
requirement on torch would make pip fetch a torch of its own). Without torch, without a C++
compiler, or with ``SUPEREXPERTS_NO_EXT=1``, the package installs without it and runs on the
torch reference / Triton paths.

- CPU: ``csrc/*.cpp`` with OpenMP. When the build machine's CPU has AVX2 and FMA they are
  enabled (``-mavx2 -mfma``, ATen's AVX2 vector types), so the extension is built for the
  machine it is installed on; ``SUPEREXPERTS_PORTABLE=1`` leaves them off.
- CUDA: ``csrc/*.cu`` too, when the installed torch was built with CUDA and finds a CUDA
  toolkit (``SUPEREXPERTS_NO_CUDA=1`` skips them). A CPU-only torch wheel ships no CUDA
  libraries to link against, so with it the CUDA sources are skipped.

Sources compile in parallel with ninja when it is on PATH, one after the other without it.
"""

import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
NAME = "superexperts_kernels._native"


def _say(message):
    print(f"superexperts: {message}", file=sys.stderr)


def _has_avx2_fma():
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("SUPEREXPERTS_PORTABLE") == "1":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags.split())


def _extensions():
    if os.environ.get("SUPEREXPERTS_NO_EXT") == "1":
        return [], {}
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    if not cpp:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch not importable at build time; skipping the native extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("no C++ compiler; skipping the native extension")
        return [], {}

    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]
    if _has_avx2_fma():
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    cu = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    if cu and os.environ.get("SUPEREXPERTS_NO_CUDA") != "1":
        if cpp_extension.CUDA_HOME is None:
            _say("torch has no CUDA (or no CUDA toolkit was found); building the CPU kernels only")
        else:
            kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
            ext = cpp_extension.CUDAExtension(
                NAME, cpp + cu, define_macros=[("SUPEREXPERTS_WITH_CUDA", "1")], **kwargs
            )
            return [ext], _cmdclass(cpp_extension)
    return [cpp_extension.CppExtension(NAME, cpp, **kwargs)], _cmdclass(cpp_extension)


def _cmdclass(cpp_extension):
    use_ninja = shutil.which("ninja") is not None
    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
