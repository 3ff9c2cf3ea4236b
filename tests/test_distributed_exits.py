"""torchrun runs end cleanly on every rank, and a stopped rank ends the run with an error that
names it, the checkpoint intact (issue 9 items 5 and 6). The 20-runs-in-a-row check is
tests/torchrun_repeat.py (not part of the suite)."""

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tiny_models import build_model, tokens
from torchrun_repeat import check_run, torchrun_profile

import superexperts
from superexperts.result import ProfileResult
from superexperts.streaming import stream_profile


def same_stats(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


def _progress(path):
    try:
        return json.loads(path.read_text())["steps"][-1]["progress"]
    except (OSError, ValueError, KeyError):
        return 0


def _pid(lock):
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _running(pid) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_stopped_rank_ends_the_run_naming_it_and_resume_finishes_it_cleanly(tmp_path):
    superexperts.register()
    model_dir, calib = tmp_path / "model", tmp_path / "calib.npy"
    build_model("qwen3_moe", num_hidden_layers=8).save_pretrained(model_dir)
    np.save(calib, tokens(4, 16).numpy())
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"

    log = open(tmp_path / "run.log", "w")
    run = torchrun_profile(model_dir, calib, out, "expert", "--checkpoint-dir", str(ckpt), "--dist-timeout", "4",
                           "--no-plots", log=log)
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while _progress(ckpt / "state.1.json") < 1 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        stopped, rank0 = _pid(ckpt / "lock.1"), _pid(ckpt / "lock.0")
        assert stopped is not None and run.poll() is None, "the run ended before rank 1 could be stopped"
        os.kill(stopped, signal.SIGSTOP)
        while _running(rank0) and time.monotonic() < deadline + 60:
            time.sleep(0.05)
        # torchrun would wait 30 s for the stopped rank to honour its SIGTERM
        os.kill(stopped, signal.SIGKILL)
        run.wait(timeout=120)
    finally:
        log.close()
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    output = (tmp_path / "run.log").read_text()
    assert "rank 0: a collective failed after waiting up to 4 s (--dist-timeout): rank 1 did not answer" in output, output[-3000:]
    assert f"the checkpoint in {ckpt} keeps every finished layer" in output
    saved = _progress(ckpt / "state.0.json")
    assert 1 <= saved < 8

    resumed = torchrun_profile(model_dir, calib, out, "expert", "--checkpoint-dir", str(ckpt), "--resume")
    assert check_run(resumed, out) == [], (resumed.stdout + resumed.stderr)[-3000:]
    from superexperts.calibration import load_calibration

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1): bit-identical stats
    try:
        single = stream_profile(model_dir, load_calibration(calib, seq_len=16, num_samples=4), dtype="float32", progress=False)
    finally:
        torch.set_num_threads(threads)
    same_stats(ProfileResult.load(out), single)
