"""Compile the Triton kernels for real GPUs without one, and check what the compiler made.

The interpreter runs code that the compiler may pipeline wrongly, and says nothing about
registers, shared-memory buffers or fences. Here the kernels are compiled ahead of time
(`superexperts_kernels._triton.offline`) for sm_90 (H100) and sm_80 (A100) with the
installed Triton and with Triton 3.7.1, which the CUDA wheel of torch 2.13 pins (found in
``$SUPEREXPERTS_TRITON_371`` or ``.triton-3.7.1/`` at the repository root, a
``pip install --target`` folder that ``.ci/run`` makes; skipped without it).

down_proj, at the configs that ship for an H100 / A100 at 4096 tokens of Qwen3-30B-A3B,
DeepSeek-V3 and Mixtral-8x7B:

- the pipeliner gives x and w ``num_stages`` shared-memory buffers each, with and without
  statistics (an x tile with a second use got fewer buffers than stages: a race between
  the cp.async of step i+2 and the wgmma of step i);
- with statistics: at most 16 registers more (the launcher caps them there, ``maxnreg``,
  from the same config without statistics) without spilling, and the same CTAs per SM
  (from registers and shared memory); with channel statistics too (uncapped), the same
  CTAs per SM; no spills anywhere;
- stats atomics are relaxed: no ``MEMBAR.*.GPU`` in the kernel; the tile reductions are
  32-bit (no ``[BLOCK_M x BLOCK_N]`` i64 tensor in the TTGIR);
- tensor cores: ``wgmma`` on sm_90, ``mma.sync`` on sm_80, for 16-bit inputs.

attention, at every config of the autotune list for D = 128 (and the non-autotuned
default): tensor cores, pipelined K/V loads, no spills, the same occupancy with the sink.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name: (experts, hidden H, intermediate I, top-k)
    "qwen3": (128, 2048, 768, 8),
    "deepseek-v3": (256, 7168, 2048, 8),
    "mixtral": (8, 4096, 14336, 2),
}
TOKENS = 4096
GPU_OF_ARCH = {90: "NVIDIA H100 80GB HBM3", 80: "NVIDIA A100-SXM4-80GB"}
STATS = ("off", "stats", "channels")


def triton_371_path() -> Path | None:
    path = Path(os.environ.get("SUPEREXPERTS_TRITON_371", ROOT / ".triton-3.7.1"))
    return path if (path / "triton" / "__init__.py").is_file() else None


def cases() -> dict:
    """``{name: (kind, arch, dtype name, config, variant)}``."""
    import torch

    from superexperts_kernels._triton import attention, down_proj

    out = {}
    for arch, gpu in GPU_OF_ARCH.items():
        for model, (e, h, i, k) in MODELS.items():
            cfg = down_proj.config_for_device(gpu, TOKENS * k, e, h, i, torch.bfloat16)
            for variant in STATS:
                out[f"down_proj-{arch}-{model}-{variant}"] = ("down_proj", arch, "bfloat16", cfg, variant)
        for dtype in ("float16", "float32"):
            cfg = down_proj.config_for_device(gpu, TOKENS * 8, 128, 2048, 768, getattr(torch, dtype))
            out[f"down_proj-{arch}-qwen3-{dtype}-stats"] = ("down_proj", arch, dtype, cfg, "stats")
        listed = attention.candidate_configs(128, torch.bfloat16, arch)
        listed.append(attention.get_config(4096, 128, torch.bfloat16, torch.device("cuda")))
        for n, cfg in enumerate(listed):
            for variant in ("nosink", "sink"):
                out[f"attention-{arch}-bfloat16-{n}-{variant}"] = ("attention", arch, "bfloat16", cfg, variant)
        out[f"attention-{arch}-float16-sink-window-pad-logits-softcap"] = (
            "attention", arch, "float16", listed[-1], "all")
    return out


def compile_all() -> dict:
    import torch

    from superexperts_kernels._triton import offline
    from superexperts_kernels._triton.down_proj import stats_register_cap

    results, plain_registers = {}, {}
    for name, (kind, arch, dtype_name, cfg, variant) in cases().items():
        dtype = getattr(torch, dtype_name)
        if kind == "down_proj":
            spec = offline.down_proj_kernel_args(dtype, cfg, with_stats=variant != "off", channel_stats=variant == "channels")
            if variant == "stats" and dtype != torch.float32:  # capped as the launcher caps it
                key = (arch, dtype_name, json.dumps(cfg, sort_keys=True))
                if key not in plain_registers:
                    plain = offline.down_proj_kernel_args(dtype, cfg, with_stats=False)
                    plain_registers[key] = offline.compile_and_analyze(plain, arch)["registers"]
                spec["maxnreg"] = stats_register_cap(plain_registers[key])
        else:
            extra = dict(window=True, pad=True, sink_logits=True, softcap=True) if variant == "all" else {}
            spec = offline.attention_kernel_args(dtype, cfg, 128, with_sink=variant != "nosink", **extra)
        got = offline.compile_and_analyze(spec, arch)
        if variant == "off":
            plain_registers[(arch, dtype_name, json.dumps(cfg, sort_keys=True))] = got["registers"]
        results[name] = {"config": cfg, **got}
    return results


def pipelined_buffers(arch: int, num_stages: int) -> int:
    """Shared-memory buffers the pipeliner gives an operand: ``num_stages`` on sm_90 (the
    wgmma pipeline), ``num_stages - 1`` before (cp.async multi-buffering)."""
    return num_stages if arch >= 90 else num_stages - 1


@pytest.fixture(scope="module")
def compiled():
    """Both Triton versions compile in parallel subprocesses without TRITON_INTERPRET (the
    test session has the kernels decorated for the interpreter)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    runs = {"installed": env}
    alt = triton_371_path()
    if alt is not None:
        runs["3.7.1"] = {**env, "PYTHONPATH": os.pathsep.join([str(alt), str(ROOT), env.get("PYTHONPATH", "")])}
    procs = {
        version: subprocess.Popen([sys.executable, __file__], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for version, e in runs.items()
    }
    out = {}
    for version, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        out[version] = json.loads(stdout.strip().splitlines()[-1])
    return out


VERSIONS = ["installed", "3.7.1"]


def results_of(compiled, version):
    if version not in compiled:
        pytest.skip("Triton 3.7.1 not found: set SUPEREXPERTS_TRITON_371 to a `pip install --target` folder of "
                    "triton==3.7.1, or make .triton-3.7.1/ as .ci/run does")
    return compiled[version]


@pytest.mark.parametrize("version", VERSIONS)
def test_compiled_with_the_expected_triton(compiled, version):
    got = results_of(compiled, version)
    assert got["_triton"]["version"] == ("3.7.1" if version == "3.7.1" else __import__("triton").__version__)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("model", list(MODELS))
def test_down_proj_stats_cost_no_buffers_registers_or_occupancy(compiled, version, arch, model):
    got = results_of(compiled, version)
    off, on, chan = (got[f"down_proj-{arch}-{model}-{v}"] for v in STATS)
    want = pipelined_buffers(arch, off["config"]["num_stages"])
    # The race: both operands get the pipeliner's full buffer count, with and without stats.
    for r in (off, on, chan):
        assert [b["buffers"] for b in r["buffers"]] == [want, want], r["buffers"]
        assert r["spill_bytes"] == 0
        assert r["wgmma"] if arch == 90 else r["mma_sync"]
        assert r["cp_async"]
    assert on["registers"] <= off["registers"] + 16, (on["registers"], off["registers"])
    assert on["ctas_per_sm"] == off["ctas_per_sm"] == chan["ctas_per_sm"] >= 1
    # Relaxed atomics, no fences; 32-bit tile reductions.
    assert off["atomics"] == []
    for r in (on, chan):
        assert r["atomics"] and r["gpu_fences"] == 0, (r["atomics"], r["gpu_fences"])
        assert not r["i64_tiles"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_down_proj_other_dtypes(compiled, version, arch, dtype):
    r = results_of(compiled, version)[f"down_proj-{arch}-qwen3-{dtype}-stats"]
    assert r["spill_bytes"] == 0 and r["gpu_fences"] == 0 and r["cp_async"]
    if dtype == "float32":  # exact fp32 FMAs (input_precision="ieee"), not TF32 MMAs
        assert not r["wgmma"] and not r["mma_sync"]
    else:
        assert r["wgmma"] if arch == 90 else r["mma_sync"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("arch", [90, 80])
def test_attention_configs_compile_without_spills(compiled, version, arch):
    got = results_of(compiled, version)
    names = sorted(n for n in got if n.startswith(f"attention-{arch}-bfloat16-") and n.endswith("-sink"))
    assert names
    for name in names:
        sink, nosink = got[name], got[name[: -len("-sink")] + "-nosink"]
        for r in (sink, nosink):
            assert r["spill_bytes"] == 0, (name, r["config"], r["spill_bytes"])
            assert r["wgmma"] if arch == 90 else r["mma_sync"]
            assert r["cp_async"] and r["atomics"] == []
            assert {b["buffers"] for b in r["buffers"]} == {pipelined_buffers(arch, r["config"]["num_stages"])}
        assert sink["ctas_per_sm"] == nosink["ctas_per_sm"] >= 1, name
    everything = got[f"attention-{arch}-float16-sink-window-pad-logits-softcap"]
    assert everything["spill_bytes"] == 0 and (everything["wgmma"] if arch == 90 else everything["mma_sync"])


if __name__ == "__main__":
    import triton

    results = compile_all()
    results["_triton"] = {"version": triton.__version__}
    print(json.dumps(results))
