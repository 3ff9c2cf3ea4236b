#!/usr/bin/env bash
# Build the native extension with its CUDA kernels (csrc/*.cu) for sm_90 against the CUDA
# wheel of torch 2.13.0, on a machine without a GPU or a CUDA toolkit, and report what was
# built. Not part of CI (it downloads about 5 GB); README's "GPU kernels, compiled offline"
# says how to run it:
#
#     bash csrc/build_cuda.sh [VENV]      # default VENV: .venv-cuda at the repository root
#
# The toolkit comes from pip: nvidia-cuda-nvcc, -crt, -cccl and nvidia-nvvm, all 13.0 (nvcc, its
# headers, libcu++, the NVVM compiler: a newer NVVM emits PTX the 13.0 ptxas rejects), next to the CUDA runtime
# that the torch wheel depends on. CUDA_HOME points at that pip folder, with two shims that
# torch's build helper expects from a system toolkit: lib64 -> lib, libcudart.so -> .so.13.
# The build goes to VENV/build (the source tree and its CPU build are left alone).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-cuda}"

python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# PyPI's torch 2.13.0 is the CUDA 13.0 build; a find-links folder in the pip config may hold
# the CPU one, so pip runs --isolated from the config (keeping the system CA bundle).
CERT=()
[ -f /etc/ssl/certs/ca-certificates.crt ] && CERT=(--cert /etc/ssl/certs/ca-certificates.crt)
pip install --isolated "${CERT[@]}" -q "torch==2.13.0" "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" setuptools ninja
python -c "import torch; assert torch.version.cuda, 'got a CPU torch: ' + torch.__version__"

SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
NVCC="$(find "$SITE/nvidia" -path '*/bin/nvcc' -type f | head -n 1)"
[ -n "$NVCC" ] || { echo "nvcc not found under $SITE/nvidia" >&2; exit 1; }
export CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
[ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
CUDART="$(find "$CUDA_HOME/lib" -name 'libcudart.so.*' | sort | head -n 1)"
[ -e "$CUDA_HOME/lib/libcudart.so" ] || ln -s "$(basename "$CUDART")" "$CUDA_HOME/lib/libcudart.so"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="9.0"
export MAX_JOBS="${MAX_JOBS:-2}"

cd "$ROOT"
python setup.py -q build_ext --build-temp "$VENV/build/temp" --build-lib "$VENV/build/lib"
SO="$(find "$VENV/build/lib" -name '_native*.so' | head -n 1)"

# cuobjdump: the one bundled with Triton (a dependency of the torch wheel).
CUOBJDUMP="$(find "$SITE/triton" -path '*/bin/cuobjdump' -type f | head -n 1)"
python - "$SO" "$CUOBJDUMP" <<'EOF'
import importlib.util
import subprocess
import sys

import torch

path = sys.argv[1]
spec = importlib.util.spec_from_file_location("superexperts_kernels._native", path)
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
op = "superexperts::moe_down_proj_profile_native"
has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
elf = subprocess.run([sys.argv[2], "--list-elf", path], capture_output=True, text=True).stdout
print(f"built {path}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); WITH_CUDA={native.WITH_CUDA}; {op} has a CUDA kernel: {has_cuda}")
print("device code:", " ".join(sorted({w for w in elf.split() if w.startswith("sm_") or ".sm_" in w})) or "none")
sys.exit(0 if native.WITH_CUDA and has_cuda else 1)
EOF
