"""The entry point is loaded by vLLM in every process and changes nothing unless enabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_env import requires_vllm

pytestmark = requires_vllm

PROBE = """
import json
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.custom_op import op_registry_oot
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.worker_base import WorkerBase
print(json.dumps({
    "oot": sorted(op_registry_oot),
    "hook": getattr(GPUModelRunner._model_forward, "_superexperts", False),
    "rpc": hasattr(WorkerBase, "superexperts_snapshot"),
}))
"""


def _probe(**env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SUPEREXPERTS_VLLM"} | env_extra
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_inert_unless_enabled():
    assert _probe() == {"oot": [], "hook": False, "rpc": False}
    assert _probe(SUPEREXPERTS_VLLM="0") == {"oot": [], "hook": False, "rpc": False}
    assert _probe(SUPEREXPERTS_VLLM="1") == {"oot": ["UnquantizedFusedMoEMethod"], "hook": True, "rpc": True}


def test_collect_without_plugin_says_how_to_enable():
    from superexperts.vllm import collect

    class NoPluginLLM:
        def collective_rpc(self, method, args=()):
            raise NotImplementedError(f"Method {method!r} is not implemented.")

    with pytest.raises(RuntimeError, match=r"superexperts.vllm.enable\(\) before LLM"):
        collect(NoPluginLLM())
