"""Layer-streaming sweep throughput: superexperts against the authors' streaming approach.

Both stream the same safetensors checkpoint (Qwen3-30B-A3B layer shapes, fewer layers,
random bf16 weights, two planted Super Experts) one decoder layer at a time over the same
calibration tokens:

- ``ours``: ``superexperts.streaming.stream_profile`` (fused experts through the profiling
  op, sink attention, massive activations, hidden states kept on the device).
- ``authors``: the same layer loading, but each layer's experts run as per-expert
  ``nn.Linear`` modules in a Python loop with a forward hook per expert ``down_proj``
  recording ``abs().max()`` of input and output into Python lists, sdpa attention, and the
  fixed 0.1 s pause after each layer that their tool takes (``--authors-sleep``).

Each method runs in a fresh subprocess (peak memory is per process: CUDA max allocated, or
max RSS on CPU). Prints a table, writes JSON.

    python -m bench.bench_sweep --layers 2 --tokens 512           # CPU-sized
    python -m bench.bench_sweep --layers 8 --tokens 65536         # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ._common import sync, write_json
from ._compare import add_args, calibration_ids, compare, measure, resolve
from .bench_profile_e2e import PLANTED, HookedExperts, build_model


def write_checkpoint(path: Path, layers: int, dtype: torch.dtype) -> None:
    import superexperts

    superexperts.register()
    build_model(layers, dtype, "cpu").save_pretrained(path)


def run_ours(model_dir, ids, args, device):
    from superexperts.streaming import stream_profile

    result = stream_profile(model_dir, ids, batch_size=args.batch_size, dtype=args.dtype, device=str(device), progress=False)
    return result.super_experts()


def run_authors(model_dir, ids, args, device):
    from superexperts.layers import find_layers
    from superexperts.rules import detect
    from superexperts.streaming import LayerLoader, build_skeleton, layer_arguments

    dtype = getattr(torch, args.dtype)
    model = build_skeleton(model_dir, dtype=dtype, device=device)
    model.set_attn_implementation("sdpa")
    parts = find_layers(model)
    loader = LayerLoader(model, model_dir, dtype=dtype, device=device)
    loader.load_base()
    batches = list(ids.split(args.batch_size))
    with torch.inference_mode():
        hidden = [layer_arguments(model, b.to(device))[0][0] for b in batches]
        candidates = []
        for p in parts:
            layer = loader.load_layer(p.index, p)
            records: dict[int, list] = {}
            fused = layer.mlp.experts
            layer.mlp.experts = HookedExperts(fused, records, row0=False)
            for b, batch in enumerate(batches):
                _, a, kw = layer_arguments(model, batch.to(device))[p.index]
                hidden[b] = layer(hidden[b], *a, **kw)
            layer.mlp.experts = fused
            candidates += [(p.index, e, float(max(o for _, o in rows))) for e, rows in records.items()]
            loader.free_layer(layer)
            sync(device)
            time.sleep(args.authors_sleep)
    return detect(candidates, len(parts))


def child(args) -> dict:
    device = torch.device(args.device)
    ids = calibration_ids(args)
    run = run_ours if args.method == "ours" else run_authors
    return measure(args.method, lambda: run(args.model_dir, ids, args, device), args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, cuda_tokens=65536, cuda_batch=16)
    p.add_argument("--authors-sleep", type=float, default=0.1, help="their fixed pause per layer, seconds")
    p.add_argument("--model-dir", default=None, help="reuse a checkpoint written by an earlier run")
    args = p.parse_args(argv)
    resolve(args)
    if args.method:
        print(json.dumps(child(args)))
        return

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_sweep_")
        args.model_dir = tmp.name
        write_checkpoint(Path(tmp.name), args.layers, getattr(torch, args.dtype))
    forward = ["--model-dir", args.model_dir, "--authors-sleep", str(args.authors_sleep)]
    rows = compare(__spec__.name, [("ours", []), ("authors", [])], args, forward)
    write_json(
        "sweep",
        {"layers": args.layers, "tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
         "dtype": args.dtype, "authors_sleep_s": args.authors_sleep, "planted": PLANTED, "results": rows},
        args.out,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
