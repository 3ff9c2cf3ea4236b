"""Which runs give bit-identical statistics, and which agree only to the last bits.

One saved Qwen3-MoE checkpoint with random weights and one planted Super Expert is profiled
layer by layer (`stream_profile`) under several settings; every stat tensor of each run is
compared with a reference run (one process, one ATen thread, batches of 2 sequences):
identical bits, or how many tensors differ, the largest relative difference of the
floating-point stats (and in which tensor), and whether the Super Experts agree.

- ``--size small``: 4 layers, hidden 512, 32 experts of 256, top-4, 64-token sequences;
- ``--size qwen3``: 2 layers of Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of 768,
  top-8, 32/4 heads of 128), 256-token sequences.

Parallel runs use 2 gloo ranks (processes started here, one thread each), as torchrun would.

    python -m bench.bench_reproducibility                      # CPU, float32 and bfloat16
    python -m bench.bench_reproducibility --size qwen3 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ._common import print_table, write_json

PLANTED = (1, 5)
SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4),
    "qwen3": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8),
}
SEQ_LEN = {"small": 64, "qwen3": 256}


def save_checkpoint(path: Path, size: str) -> None:
    import transformers

    import superexperts

    superexperts.register()
    cfg = transformers.Qwen3MoeConfig(vocab_size=1024, norm_topk_prob=True, max_position_embeddings=1024, **SIZES[size])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        model.model.layers[PLANTED[0]].mlp.experts.down_proj[PLANTED[1]].mul_(100.0)
    model.save_pretrained(path)


def calibration(sequences: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 1024, (sequences, seq_len), generator=torch.Generator().manual_seed(1))


def one_process(model_dir, sequences, seq_len, dtype, *, threads=1, batch_size=2, interrupt_at=None, checkpoint_dir=None):
    """A single-process streamed run; with `interrupt_at`, stopped before that layer and resumed."""
    from superexperts.streaming import LayerLoader, stream_profile

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    kwargs = dict(batch_size=batch_size, dtype=dtype, progress=False)
    try:
        if interrupt_at is None:
            return stream_profile(model_dir, calibration(sequences, seq_len), **kwargs)
        real = LayerLoader.load_layer

        def stop(self, index, *args, **kw):
            if index == interrupt_at:
                raise KeyboardInterrupt
            return real(self, index, *args, **kw)

        LayerLoader.load_layer = stop
        try:
            stream_profile(model_dir, calibration(sequences, seq_len), checkpoint_dir=checkpoint_dir, **kwargs)
        except KeyboardInterrupt:
            pass
        finally:
            LayerLoader.load_layer = real
        return stream_profile(model_dir, calibration(sequences, seq_len), checkpoint_dir=checkpoint_dir, resume=True, **kwargs)
    finally:
        torch.set_num_threads(before)


def _rank_main(rank, port, model_dir, sequences, seq_len, dtype, mode, out):
    import torch.distributed as dist

    from superexperts.streaming import stream_profile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    result = stream_profile(model_dir, calibration(sequences, seq_len), batch_size=2, dtype=dtype, progress=False, parallel=mode)
    if result is not None:
        result.save(out)
    dist.destroy_process_group()


def two_ranks(model_dir, sequences, seq_len, dtype, mode, out: Path):
    from superexperts.result import ProfileResult

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(model_dir), sequences, seq_len, dtype, mode, str(out)), nprocs=2)
    return ProfileResult.load(out)


def compare(a, b) -> dict:
    """Identical bits? Else the largest relative difference over the float stats, and how many
    tensors differ; whether the Super Experts are the same."""
    ta, tb = a.tensors(), b.tensors()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    worst, where = 0.0, None
    for k in differ:
        if ta[k].is_floating_point():  # the others are locations (token, channel) and counts
            x, y = ta[k].double(), tb[k].double()
            rel = float(((x - y).abs() / y.abs().clamp_min(1e-30)).max())
            worst, where = max((worst, where), (rel, k), key=lambda t: t[0])
    return {
        "identical": not differ,
        "tensors_differing": f"{len(differ)}/{len(ta)}",
        "differing": differ,
        "max_rel_diff": worst,
        "max_rel_diff_in": where,
        "same_super_experts": [(s.layer, s.expert) for s in a.super_experts()] == [(s.layer, s.expert) for s in b.super_experts()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n = SEQ_LEN[args.size]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        save_checkpoint(model_dir, args.size)
        for dtype in args.dtypes:
            ref4 = one_process(model_dir, 4, n, dtype)
            ref5 = one_process(model_dir, 5, n, dtype)
            runs = [
                ("same settings again", ref4, one_process(model_dir, 4, n, dtype)),
                ("interrupted at layer 1, resumed", ref4,
                 one_process(model_dir, 4, n, dtype, interrupt_at=1, checkpoint_dir=root / f"ckpt_{dtype}")),
                ("2 ranks expert parallel (1 thread each)", ref4, two_ranks(model_dir, 4, n, dtype, "expert", root / f"e_{dtype}")),
                ("2 ranks data parallel, 2+2 sequences", ref4, two_ranks(model_dir, 4, n, dtype, "data", root / f"d4_{dtype}")),
                ("2 ranks data parallel, 3+2 sequences", ref5, two_ranks(model_dir, 5, n, dtype, "data", root / f"d5_{dtype}")),
                ("2 ATen threads instead of 1", ref4, one_process(model_dir, 4, n, dtype, threads=2)),
                ("batches of 1 sequence instead of 2", ref4, one_process(model_dir, 4, n, dtype, batch_size=1)),
            ]
            for name, reference, other in runs:
                rows.append({"dtype": dtype, "run vs 1 process, 1 thread, batch 2": name, **compare(other, reference)})
    print_table(rows, ["dtype", "run vs 1 process, 1 thread, batch 2", "identical", "tensors_differing", "max_rel_diff",
                       "max_rel_diff_in", "same_super_experts"])
    name = "reproducibility" if args.size == "small" else f"reproducibility_{args.size}"
    write_json(name, {"size": args.size, "config": SIZES[args.size], "seq_len": SEQ_LEN[args.size], "rows": rows}, args.out)


if __name__ == "__main__":
    main()
