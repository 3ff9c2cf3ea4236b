"""The vLLM general plugin (entry point ``vllm.general_plugins: superexperts``).

vLLM calls `register` in every process it starts. It does nothing unless profiling is
enabled, by ``SUPEREXPERTS_VLLM=1`` in the environment of ``vllm serve`` or by
`enable()` in the Python process that creates the ``LLM`` (it sets the variable, which
the engine processes inherit). Enabled, it

- replaces vLLM's ``UnquantizedFusedMoEMethod`` (``CustomOp.register_oot``) with one
  whose experts class records statistics (`superexperts.vllm.method`);
- wraps the V1 model runner's forward to write each step's token references
  (`superexperts.vllm.tokens`);
- adds the ``superexperts_*`` RPC methods to vLLM's workers (`superexperts.vllm.worker`).
"""

from __future__ import annotations

import os

ENV = "SUPEREXPERTS_VLLM"
_installed = False


def is_enabled() -> bool:
    return os.environ.get(ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def enable() -> None:
    """Turn profiling on for the engines this process creates from now on."""
    os.environ[ENV] = "1"
    # The token references hook into the V1 model runner (on CPU it is the only one).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    install()


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    if is_enabled():
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        install()


def install() -> None:
    global _installed
    if _installed:
        return
    from . import method, tokens, worker

    method.register_method_class()
    tokens.install_runner_hook()
    worker.install_rpc_methods()
    _installed = True
