"""Whether the real vLLM is importable. Under pytest this directory (tests/vllm) is itself
importable as a namespace package named ``vllm``, so `find_spec` alone would say yes."""

import importlib.util

import pytest

_spec = importlib.util.find_spec("vllm")
HAS_VLLM = _spec is not None and _spec.origin not in (None, "namespace")

requires_vllm = [
    pytest.mark.vllm,
    pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (these tests run in the vLLM venv that .ci/run builds)"),
]
