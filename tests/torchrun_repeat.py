"""Run the CLI under torchrun (2 gloo ranks) many times in a row and count unclean exits.

Not part of the default suite (tests/test_distributed_exits.py runs it once). A run is
clean when torchrun exits 0, no rank printed an abort ("terminate called ...") or a
traceback, and rank 0 wrote every report file and plot.

    /work/heavy python tests/torchrun_repeat.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

REPORT_FILES = ("report.json", "Super Experts Report.json", "profile.json", "stats.safetensors",
                "expert_heatmap.png", "massive_activations.png")
UNCLEAN = ("terminate called", "Traceback", "core dumped", "Aborted", "SIGABRT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_inputs(root: Path, family: str = "qwen3_moe") -> tuple[Path, Path]:
    """A tiny saved checkpoint and a calibration file of 4 windows of 16 token ids."""
    import superexperts
    from tiny_models import build_model, tokens

    superexperts.register()
    model_dir = root / "model"
    build_model(family).save_pretrained(model_dir)
    calib = root / "calib.npy"
    np.save(calib, tokens(4, 16).numpy())
    return model_dir, calib


def torchrun_profile(model_dir: Path, calib: Path, out: Path, mode: str, *extra: str,
                     timeout: float = 300, log=None):
    """Run ``superexperts profile`` with 2 ranks: a CompletedProcess; or, given a `log` file,
    start it with its output going there and return the Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "superexperts", "profile", "--model", str(model_dir), "--calib", str(calib), "--seq-len", "16",
           "--num-samples", "4", "--parallel", mode, "--dtype", "float32", "--out", str(out), *extra]
    if log is not None:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def check_run(done: subprocess.CompletedProcess, out: Path) -> list[str]:
    """What was unclean about one run (empty: clean)."""
    problems = []
    if done.returncode != 0:
        problems.append(f"exit {done.returncode}")
    output = done.stdout + done.stderr
    problems += [f"printed {word!r}" for word in UNCLEAN if word in output]
    problems += [f"no {name}" for name in REPORT_FILES if not (out / name).is_file()]
    if (out / "report.json").is_file():
        json.loads((out / "report.json").read_text())
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mode", choices=["expert", "data", "both"], default="both",
                        help="parallel mode; 'both' alternates")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, calib = build_inputs(root)
        failures = 0
        for i in range(args.runs):
            mode = args.mode if args.mode != "both" else ("expert", "data")[i % 2]
            out = root / f"out{i}"
            start = time.perf_counter()
            done = torchrun_profile(model_dir, calib, out, mode)
            problems = check_run(done, out)
            failures += bool(problems)
            print(f"run {i + 1:>3}/{args.runs} {mode:>6}: {'clean' if not problems else '; '.join(problems)} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            if problems:
                print((done.stdout + done.stderr)[-3000:], flush=True)
        print(f"{args.runs - failures} of {args.runs} runs clean")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
