"""What profiling costs over plain inference: ``superexperts.profile`` against the same model's
plain transformers forward, same tokens, same process, runs alternating.

- ``plain``: the decoder forward (``model.base_model``, no lm_head, no KV cache) on
  transformers' default implementations (``grouped_mm`` experts, ``sdpa`` attention), batch by
  batch under ``torch.inference_mode``: inference, nothing recorded.
- ``profile``: ``superexperts.profile(model, tokens)`` on the same batches: our experts
  (the profiling op), sink attention, the shared/dense and hidden-state hooks, the result.

Each run's time is split in phases by forward hooks on every decoder layer's experts module
and attention module: ``experts``, ``attention``, and ``other`` (everything else: embeddings,
norms, routers, the profiler's own work). Per phase the JSON and the table give
``throughput = plain / profile`` (>= 0.9: profiling runs at >= 90% of inference speed).

Shapes: ``qwen3`` (Qwen3-30B-A3B layers: H=2048, 128 experts of 768, top-8, 32/4 heads of
128) and ``mixtral`` (Mixtral-8x7B layers: H=4096, 8 experts of 14336, top-2, 32/8 heads), with
random weights. ``--rounds`` rounds of (plain, profile) after one warm-up of each; medians.

    python -m bench.bench_overhead                                  # both shapes, CPU defaults
    python -m bench.bench_overhead --shapes qwen3 --layers 4 --sequences 4 --seq-len 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import superexperts
from superexperts.layers import find_layers

from ._common import print_table, write_json
from .bench_profile_e2e import random_model

VOCAB = 4096
PHASES = ("experts", "attention", "other", "total")


def config(shape: str, layers: int):
    import transformers

    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=32, head_dim=128,
                  max_position_embeddings=40960)
    if shape == "qwen3":
        return transformers.Qwen3MoeConfig(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_key_value_heads=4,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, **common,
        )
    return transformers.MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        **common,
    )


class PhaseTimer:
    """Wall time spent inside the experts modules and the attention modules, via hooks."""

    def __init__(self, model: torch.nn.Module):
        self.spent = {"experts": 0.0, "attention": 0.0}
        self.handles = []
        for parts in find_layers(model):
            modules = [("experts", parts.experts)] if parts.experts is not None else []
            modules += [("attention", m) for m in parts.attention]
            for phase, module in modules:
                self.handles.append(module.register_forward_pre_hook(self._start))
                self.handles.append(module.register_forward_hook(lambda m, i, o, phase=phase: self._stop(m, phase)))

    def _start(self, module, inputs):
        module._bench_started = time.perf_counter()

    def _stop(self, module, phase):
        self.spent[phase] += time.perf_counter() - module._bench_started

    def measure(self, fn) -> dict:
        self.spent = {"experts": 0.0, "attention": 0.0}
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
        return {**self.spent, "other": total - sum(self.spent.values()), "total": total}

    def remove(self):
        for h in self.handles:
            h.remove()


def bench_shape(shape: str, args) -> tuple[list[dict], dict]:
    dtype = getattr(torch, args.dtype)
    layers = args.layers or (4 if shape == "qwen3" else 1)
    sequences = args.sequences or (4 if shape == "qwen3" else 1)
    seq_len = args.seq_len or (512 if shape == "qwen3" else 256)
    model = random_model(config(shape, layers), dtype, "cpu")
    experts_impl, attn_impl = model.config._experts_implementation, model.config._attn_implementation
    tokens = torch.randint(0, VOCAB, (sequences, seq_len), generator=torch.Generator().manual_seed(1))
    batches = tokens.split(args.batch_size)

    def plain():
        with torch.inference_mode():
            for batch in batches:
                model.base_model(input_ids=batch, use_cache=False)

    def profile():
        superexperts.profile(model, tokens, batch_size=args.batch_size, progress=False)

    timer = PhaseTimer(model)
    runs = {"plain": [], "profile": []}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for method, fn in (("plain", plain), ("profile", profile)):
                times = timer.measure(fn)
                if round_:
                    runs[method].append(times)
                print(f"{shape} round {round_} {method}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()),
                      flush=True)
    finally:
        timer.remove()
    assert model.config._experts_implementation == experts_impl, "profile() must restore the implementations"

    median = {m: {p: statistics.median(r[p] for r in rs) for p in PHASES} for m, rs in runs.items()}
    rows = [
        {
            "shape": shape,
            "phase": phase,
            "plain_s": median["plain"][phase],
            "profile_s": median["profile"][phase],
            "throughput": median["plain"][phase] / median["profile"][phase],
        }
        for phase in PHASES
    ]
    setup = {
        "shape": shape, "layers": layers, "sequences": sequences, "seq_len": seq_len, "batch_size": args.batch_size,
        "dtype": args.dtype, "plain_implementations": {"experts": experts_impl, "attention": attn_impl},
        "runs": runs, "median": median,
    }
    del model
    return rows, setup


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["qwen3", "mixtral"], choices=["qwen3", "mixtral"])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4 qwen3, 1 mixtral)")
    p.add_argument("--sequences", type=int, default=None, help="calibration sequences (default 4 qwen3, 1 mixtral)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512 qwen3, 256 mixtral)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward, both methods")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of (plain, profile) after one warm-up")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/overhead_<device>.json)")
    args = p.parse_args(argv)

    all_rows, setups = [], []
    for shape in args.shapes:
        rows, setup = bench_shape(shape, args)
        all_rows += rows
        setups.append(setup)
        print()
        print_table(rows, ["shape", "phase", "plain_s", "profile_s", "throughput"])
        print()
    write_json("overhead", {"results": all_rows, "setups": setups}, args.out)


if __name__ == "__main__":
    main()
