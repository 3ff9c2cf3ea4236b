"""Build script: the pure-Python package always; the native extension from csrc/ when it can.

The extension (``superexperts_kernels._native``) is built against the torch already
installed, so install with ``pip install --no-build-isolation .`` to get it (a build-system
requirement on torch would make pip fetch a torch of its own). Without torch, without a C++
compiler, or with ``SUPEREXPERTS_NO_EXT=1``, the package installs without it and runs on the
torch reference / Triton paths.

- CPU: ``csrc/*.cpp`` with OpenMP and no ``-m`` flag: the binary does not depend on the build
  machine's CPU. The vector loops are compiled once per instruction set (``csrc/cpu_isa_*.cpp``
  set their own target) and chosen at run time (``csrc/cpu_isa.h``).
- CUDA: ``csrc/*.cu`` too, when the installed torch was built with CUDA and finds a CUDA
  toolkit (``SUPEREXPERTS_NO_CUDA=1`` skips them). A CPU-only torch wheel ships no CUDA
  libraries to link against, so with it the CUDA sources are skipped.

Sources compile in parallel with ninja when it is on PATH, one after the other without it.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
NAME = "superexperts_kernels._native"


def _say(message):
    print(f"superexperts: {message}", file=sys.stderr)


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

    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi"]
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
