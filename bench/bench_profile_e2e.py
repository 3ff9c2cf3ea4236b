"""End to end: superexperts against the authors' method, whole processes, model load included.

Model: Qwen3-30B-A3B layer shapes (hidden 2048, 128 experts of 768, top-8, 32 q / 4 kv heads
of 128) with fewer layers, random bf16 weights and two planted Super Experts, saved once as a
safetensors checkpoint in the per-expert layout of the real one. Each method is one fresh
process (``python -m bench.bench_profile_e2e --method ...``) timed from outside: interpreter
start, imports, reading the checkpoint, profiling. Unless ``--warm``, the checkpoint leaves
the page cache before each process.

- ``ours``: ``superexperts.loading.load_model_in_background`` (each tensor copied once from
  the mapped shards into its fused place, the layers read on a background thread while the
  first batch already runs) and ``superexperts.profile`` (fused experts through the profiling op,
  sink attention, massive activations): everything the toolkit reports.
- ``ours_batch_major``: ``ours`` with every batch run through the whole model in turn, as
  before the layer-by-layer schedule of a model loading in the background (what that schedule
  gains).
- ``ours_stream``: ``superexperts.streaming.stream_profile`` (one layer resident, the next
  read in the background).
- ``authors`` / ``authors_stream``: their method in memory, and streamed one layer at a time
  with their 0.1 s pause per layer (``bench/_authors.py``): per-expert ``nn.Linear`` modules
  loaded as views of the mapped shards, a Python loop over the experts, forward hooks
  recording ``abs().max()`` per call, sdpa attention; expert maxima only.
  ``--authors-row0`` adds their released hook's variant (``output[0]``: the first routed
  token's row only).

Prints a table (process seconds, ratios in-memory vs in-memory and streamed vs streamed),
writes JSON.

    python -m bench.bench_profile_e2e --tokens 2048 --model-dir /tmp/e2e_ckpt   # CPU
    python -m bench.bench_profile_e2e --layers 8 --tokens 8192                  # GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ._common import print_table, write_json
from ._compare import (
    add_args, calibration_ids, ensure_checkpoint, measure, median_of, resolve, run_methods, same_super_experts,
)

PLANTED = [(0, 68), (1, 92)]
PAIRS = {"ours": "authors", "ours_stream": "authors_stream"}
BASELINES = {"ours_batch_major": "ours"}  # the row's process time over that of the method it varies


def build_model(layers: int, dtype: torch.dtype, device: str, seed: int = 0):
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
    )
    model = random_model(cfg, dtype, device, seed)
    with torch.no_grad():
        for layer, expert in PLANTED:
            if layer < layers:
                model.model.layers[layer].mlp.experts.down_proj[expert].mul_(100.0)
    return model


def random_model(cfg, dtype: torch.dtype, device: str, seed: int = 0):
    """The causal LM of `cfg` with random weights (norms 1, the rest N(0, 1 / fan_in)), in
    eval mode; built on the meta device and filled in place, so no second copy is made."""
    import transformers

    from superexperts.loading import materialize_buffers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    materialize_buffers(model, torch.device(device))
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            fan_in = p.shape[-1]
            for chunk in p.view(-1, fan_in).split(max(1, (1 << 22) // fan_in)):
                chunk.copy_(torch.randn(chunk.shape, generator=g) / fan_in**0.5)
    return model.eval()


def write_checkpoint(path: Path, layers: int, dtype: torch.dtype) -> None:
    """The model as transformers saves it: per-expert tensors, shards of at most 4 GB."""
    import superexperts

    superexperts.register()
    build_model(layers, dtype, "cpu").save_pretrained(path, max_shard_size="4GB")


def run_ours(args, ids):
    import superexperts
    from superexperts.loading import load_model_in_background

    if args.method == "ours_batch_major":
        import superexperts.profiler

        superexperts.profiler.layers_loading = lambda model: False

    t0 = time.perf_counter()
    with load_model_in_background(args.model_dir, dtype=args.dtype, device=args.device) as (model, _):
        t1 = time.perf_counter()
        result = superexperts.profile(model, ids, batch_size=args.batch_size, progress=False)
    return result.super_experts(), {"until_first_batch_s": t1 - t0, "profile_s": time.perf_counter() - t1}


def run_ours_stream(args, ids):
    from superexperts.streaming import StreamStats, stream_profile

    memory = StreamStats()
    result = stream_profile(args.model_dir, ids, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                            progress=False, memory=memory)
    return result.super_experts(), {"layer_wait_s": round(sum(memory.wait_seconds), 3),
                                    "layer_read_s": round(sum(memory.read_seconds), 3)}


def run_authors(args, ids):
    from ._authors import profile_in_memory, profile_streamed

    dtype = getattr(torch, args.dtype)
    if args.method == "authors_stream":
        return profile_streamed(args.model_dir, ids.to(args.device), batch_size=args.batch_size, dtype=dtype,
                                sleep_s=args.authors_sleep), {}
    return profile_in_memory(args.model_dir, ids.to(args.device), batch_size=args.batch_size, dtype=dtype,
                             row0=args.authors_row0), {}


def import_libraries(ours: bool) -> None:
    """Import what a method needs before its timer starts (the whole-process time counts it)."""
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    if ours:
        import superexperts.streaming  # noqa: F401  (the whole toolkit and its kernels)


def child(args) -> dict:
    import_libraries(ours=args.method.startswith("ours"))
    ids = calibration_ids(args)
    run = {"ours": run_ours, "ours_batch_major": run_ours, "ours_stream": run_ours_stream}.get(args.method, run_authors)
    name = "authors_row0" if args.authors_row0 else args.method
    return measure(name, lambda: run(args, ids), args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, cuda_tokens=8192, cuda_batch=8, cpu_tokens=2048)
    p.add_argument("--authors-sleep", type=float, default=0.1, help="their fixed pause per streamed layer, seconds")
    p.add_argument("--authors-row0", action="store_true", help="also run the authors' output[0] hook variant")
    p.add_argument("--methods", nargs="+", default=["ours", "authors", "ours_stream", "authors_stream"])
    args = p.parse_args(argv)
    resolve(args)
    if args.method:  # child process
        print(json.dumps(child(args)))
        return
    tmp = ensure_checkpoint(args, lambda path: write_checkpoint(path, args.layers, getattr(torch, args.dtype)), "bench_e2e_")
    variants = [(m, []) for m in args.methods] + ([("authors", ["--authors-row0"])] if args.authors_row0 else [])
    rows = run_methods(__spec__.name, variants, args, ["--authors-sleep", str(args.authors_sleep)])
    by_method = {r["method"]: r for r in rows}
    for r in rows:
        pair = next((o for o, a in PAIRS.items() if a == r["method"]), None) or ("ours" if r["method"] == "authors_row0" else None)
        if pair in by_method:
            r["ours_speedup"] = median_of(r, "process_s") / median_of(by_method[pair], "process_s")
            r["same_SEs_as_ours"] = same_super_experts(r, by_method[pair])
        if BASELINES.get(r["method"]) in by_method:
            base = by_method[BASELINES[r["method"]]]
            r[f"over_{base['method']}"] = median_of(r, "process_s") / median_of(base, "process_s")
            r["same_SEs_as_ours"] = same_super_experts(r, base)
    print_table(rows, ["method", "process_s", "seconds", "peak_MB", "ours_speedup", "over_ours", "same_SEs_as_ours",
                       "super_experts"])
    write_json(
        f"profile_e2e_{args.tokens}tok",
        {"layers": args.layers, "tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
         "dtype": args.dtype, "repeat": args.repeat, "page_cache": "warm" if args.warm else "dropped before each process",
         "authors_sleep_s": args.authors_sleep, "planted": PLANTED, "results": rows},
        args.out,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
