"""What reading the checkpoint from disk costs the computation beside it, on this machine.

The end-to-end and streaming benchmarks read a checkpoint that is not in the page cache while
the model computes. Whether that reading is free (the disk works, the CPUs compute) or takes
time from the computation (a virtual machine whose disk I/O runs on the same CPUs) decides how
much loading can be hidden. Here the model (the checkpoint of `bench_profile_e2e`) is loaded once
and profiled in turns:

- ``alone``: `superexperts.profile` on the loaded model;
- ``beside_read``: the same while another process reads the checkpoint's shards (dropped from
  the page cache first) into a small buffer, as a background reader would.

The reader's own CPU time is reported beside it. Prints per-mode medians and their ratio,
writes JSON.

    python -m bench.bench_disk_cost --layers 4 --tokens 2048 --model-dir /tmp/e2e_ckpt --repeat 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ._common import print_table, write_json
from ._compare import add_args, calibration_ids, drop_page_cache, ensure_checkpoint, resolve
from .bench_profile_e2e import write_checkpoint

_READ = """
import sys
from pathlib import Path

buf = memoryview(bytearray(8 << 20))
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, cuda_tokens=8192, cuda_batch=8, cpu_tokens=2048)
    args = p.parse_args(argv)
    resolve(args)
    tmp = ensure_checkpoint(args, lambda path: write_checkpoint(path, args.layers, getattr(torch, args.dtype)), "bench_disk_")

    import superexperts
    from superexperts.loading import load_model

    model, _ = load_model(args.model_dir, dtype=args.dtype, device=args.device)
    ids = calibration_ids(args)
    superexperts.profile(model, ids[:1], batch_size=args.batch_size, progress=False)  # first-call costs
    runs: dict[str, list[dict]] = {"alone": [], "beside_read": []}
    for _ in range(args.repeat):
        for mode in runs:
            drop_page_cache(args.model_dir)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            reader = subprocess.Popen([sys.executable, "-c", _READ, args.model_dir]) if mode == "beside_read" else None
            start = time.perf_counter()
            superexperts.profile(model, ids, batch_size=args.batch_size, progress=False)
            seconds = time.perf_counter() - start
            row = {"seconds": seconds}
            if reader is not None:
                if reader.wait() != 0:
                    raise RuntimeError("the reading process failed")
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                row["reader_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            runs[mode].append(row)
    rows = [{"mode": mode, "seconds": statistics.median(r["seconds"] for r in rs), "runs": rs} for mode, rs in runs.items()]
    rows[1]["over_alone"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["reader_cpu_s"] = statistics.median(r["reader_cpu_s"] for r in runs["beside_read"])
    print_table(rows, ["mode", "seconds", "over_alone", "reader_cpu_s"])
    checkpoint_gb = sum(f.stat().st_size for f in Path(args.model_dir).glob("*.safetensors")) / 1e9
    write_json(
        f"disk_cost_{args.tokens}tok",
        {"layers": args.layers, "tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
         "dtype": args.dtype, "repeat": args.repeat, "checkpoint_GB": checkpoint_gb, "results": rows},
        args.out,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
