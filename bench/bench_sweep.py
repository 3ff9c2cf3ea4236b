"""Layer streaming against the in-memory profile of the same model, and against the authors'
streaming, from a checkpoint that is not in the page cache.

The checkpoint (Qwen3-30B-A3B layer shapes, fewer layers, random bf16 weights, two planted
Super Experts; per-expert tensors as transformers saves them) is written once; unless
``--warm``, its shards leave the page cache (``POSIX_FADV_DONTNEED``) before each method, so
each reads the disk, as it would a checkpoint bigger than the page cache. Each method is a
fresh process:

- ``stream``: ``superexperts.streaming.stream_profile``: layer l+1 read (and fused) on a
  background thread while layer l computes, but for the held-back tail of its experts, read
  once layer l is freed; at most two layers resident.
- ``stream_serial``: the same without the background thread: each layer read when it is
  needed, its read not hidden. Its time less its reads (``compute_s``) is what the computation
  takes with no read beside it; against ``stream`` it shows what overlapping gains.
- ``in_memory``: ``load_model`` (the whole model, read up front) then ``superexperts.profile``;
  its profile time (model already in memory) is what the streamed run is held to (<= 1.2x).
- ``authors_stream``: their streaming (``bench/_authors.py``): per-expert modules loaded as
  views of the mapped shards, one layer at a time, hooks, sdpa, a 0.1 s pause per layer.

Peak RSS of the streamed run is compared with its base (the RSS before the first layer is
read: embeddings, hidden states, per-batch layer arguments) plus two layers.

    python -m bench.bench_sweep --layers 4 --tokens 2048 --model-dir /tmp/sweep_ckpt   # CPU
    python -m bench.bench_sweep --layers 8 --tokens 65536                              # GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ._common import peak_rss_mb, print_table, write_json
from ._compare import (
    add_args, calibration_ids, ensure_checkpoint, measure, median_of, resolve, run_methods, same_super_experts,
)
from .bench_profile_e2e import PLANTED, import_libraries, write_checkpoint

MB = 2**20


def run_stream(args, ids, prefetch: bool = True):
    from superexperts.streaming import StreamStats, stream_profile

    memory = StreamStats()
    start = time.perf_counter()
    result = stream_profile(args.model_dir, ids, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                            progress=False, memory=memory, prefetch=prefetch)
    largest = max(memory.layer_param_bytes)
    extra = {
        "compute_s": time.perf_counter() - start - sum(memory.wait_seconds) - sum(memory.tail_wait_seconds),
        "layer_MB": largest / MB,
        "peak_held_layers": memory.peak_held_bytes / largest,
        "layer_read_s": [round(s, 3) for s in memory.read_seconds],
        "layer_wait_s": [round(s, 3) for s in memory.wait_seconds],
        "hold_back_MB": memory.hold_back_bytes / MB,
        "layer_tail_wait_s": [round(s, 3) for s in memory.tail_wait_seconds],
    }
    if memory.base_rss_bytes is not None and torch.device(args.device).type == "cpu":
        extra["base_rss_MB"] = memory.base_rss_bytes / MB
        extra["peak_rss_over_base_MB"] = peak_rss_mb() - memory.base_rss_bytes / MB
        extra["peak_rss_over_base_layers"] = extra["peak_rss_over_base_MB"] / extra["layer_MB"]
    return result.super_experts(), extra


def run_in_memory(args, ids):
    import superexperts
    from superexperts.loading import load_model

    t0 = time.perf_counter()
    model, _ = load_model(args.model_dir, dtype=args.dtype, device=args.device)
    t1 = time.perf_counter()
    result = superexperts.profile(model, ids, batch_size=args.batch_size, progress=False)
    return result.super_experts(), {"load_s": t1 - t0, "profile_s": time.perf_counter() - t1}


def run_authors_stream(args, ids):
    from ._authors import profile_streamed

    found = profile_streamed(args.model_dir, ids.to(args.device), batch_size=args.batch_size,
                             dtype=getattr(torch, args.dtype), sleep_s=args.authors_sleep)
    return found, {}


def child(args) -> dict:
    import_libraries(ours=args.method != "authors_stream")
    ids = calibration_ids(args)
    run = {"stream": run_stream, "stream_serial": lambda a, i: run_stream(a, i, prefetch=False), "in_memory": run_in_memory,
           "authors_stream": run_authors_stream}[args.method]
    return measure(args.method, lambda: run(args, ids), args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, cuda_tokens=65536, cuda_batch=16, cpu_tokens=2048)
    p.add_argument("--authors-sleep", type=float, default=0.1, help="their fixed pause per layer, seconds")
    p.add_argument("--methods", nargs="+", default=["stream", "in_memory", "authors_stream"])
    args = p.parse_args(argv)
    resolve(args)
    if args.method:
        print(json.dumps(child(args)))
        return

    tmp = ensure_checkpoint(args, lambda path: write_checkpoint(path, args.layers, getattr(torch, args.dtype)), "bench_sweep_")
    rows = run_methods(__spec__.name, [(m, []) for m in args.methods], args, ["--authors-sleep", str(args.authors_sleep)])
    by = {r["method"]: r for r in rows}
    summary = {}
    if "stream" in by and "in_memory" in by:  # medians over the runs
        stream_s = median_of(by["stream"], "seconds")
        summary["stream_over_in_memory_profile"] = stream_s / median_of(by["in_memory"], "profile_s")
        summary["stream_over_in_memory_with_load"] = stream_s / median_of(by["in_memory"], "seconds")
        summary["same_SEs"] = same_super_experts(by["stream"], by["in_memory"])
    if "stream" in by and "stream_serial" in by:
        summary["stream_over_stream_serial"] = median_of(by["stream"], "seconds") / median_of(by["stream_serial"], "seconds")
        summary["stream_serial_compute_s"] = median_of(by["stream_serial"], "compute_s")
        summary["stream_compute_s"] = median_of(by["stream"], "compute_s")
    if "stream" in by and "authors_stream" in by:
        summary["authors_stream_over_stream"] = median_of(by["authors_stream"], "seconds") / median_of(by["stream"], "seconds")
        summary["same_SEs_as_authors"] = same_super_experts(by["stream"], by["authors_stream"])
    if "peak_rss_over_base_layers" in by.get("stream", {}):
        summary["stream_peak_rss_over_base_layers"] = max(r["peak_rss_over_base_layers"] for r in by["stream"]["runs"])
    print_table(rows, ["method", "seconds", "process_s", "peak_MB", "super_experts"])
    print(json.dumps(summary, indent=1))
    write_json(
        f"sweep_{args.layers}layers_{args.tokens}tok",
        {"layers": args.layers, "tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
         "dtype": args.dtype, "repeat": args.repeat, "page_cache": "warm" if args.warm else "dropped before each process",
         "authors_sleep_s": args.authors_sleep, "planted": PLANTED, "summary": summary, "results": rows},
        args.out,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
