"""Build script: the pure-Python package always; the native extension from csrc/ when it can.

The extension is built against the torch already installed, so install with
``pip install --no-build-isolation .`` to get it (a build-system requirement on torch
would make pip fetch a torch of its own). Without torch, without a C++ compiler, or with
``SUPEREXPERTS_NO_EXT=1``, the package installs without it and runs on the torch
reference / Triton paths. The CUDA sources are compiled only when torch sees a CUDA
toolkit.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _extensions():
    if os.environ.get("SUPEREXPERTS_NO_EXT") == "1":
        return [], {}
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    if not cpp:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("superexperts: torch not importable at build time; skipping the native extension", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("superexperts: no C++ compiler; skipping the native extension", file=sys.stderr)
        return [], {}

    cu = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    with_cuda = bool(cu) and cpp_extension.CUDA_HOME is not None and os.environ.get("SUPEREXPERTS_NO_CUDA") != "1"
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
        ext = cpp_extension.CUDAExtension(
            "superexperts_kernels._native",
            cpp + cu,
            extra_compile_args=extra,
            define_macros=[("SUPEREXPERTS_WITH_CUDA", "1")],
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "superexperts_kernels._native", cpp, extra_compile_args=extra, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
