"""vLLM throughput with and without the superexperts plugin, at a Qwen3-30B-A3B layer shape.

A Qwen3-MoE checkpoint with Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of
768, top-8, 32 query / 4 KV heads of 128) and `--layers` decoder layers is written once
(random bf16 weights, a word-level tokenizer). Each method then runs in a fresh process
with vLLM's defaults for the device (torch.compile on):

- ``plain``: vLLM as installed (on CPU its fused C++ MoE kernel);
- ``plugin``: the same with ``SUPEREXPERTS_VLLM=1`` (statistics recorded on every token).

Prefill: `--prompts` prompts of `--prompt-len` tokens generating one token each, tokens/s
over the median of `--reps` timed rounds after one warm-up round. Decode: `--decode-seqs`
sequences generating `--decode-tokens` tokens each; decode tokens/s from the difference
with a one-token round over the same prompts. The ratio is plugin / plain.

    python -m bench.bench_vllm                 # CPU defaults; writes bench/results/vllm_<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import print_table, write_json

SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144)
VOCAB = 4096
METHODS = ("plain", "plugin")


def build_checkpoint(path: Path, layers: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.Qwen3MoeConfig(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=4096,
                                         norm_topk_prob=True, eos_token_id=1, **SHAPE)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)


def child(args) -> dict:
    """Run in the method's own process: time prefill and decode."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(0)

    def prompts(num, length):
        return [TokensPrompt(prompt_token_ids=(torch.randint(2, VOCAB, (length,), generator=g)).tolist()) for _ in range(num)]

    start = time.perf_counter()
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=max(args.prompt_len, 64) + args.decode_tokens + 8,
              max_num_seqs=max(args.prompts, args.decode_seqs), max_num_batched_tokens=args.prompts * args.prompt_len,
              enable_prefix_caching=False, seed=0, enforce_eager=args.eager)
    init_s = time.perf_counter() - start

    def timed(batch, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t

    prefill = prompts(args.prompts, args.prompt_len)
    timed(prefill, 1)
    prefill_s = statistics.median(timed(prefill, 1) for _ in range(args.reps))
    decode_prompts = prompts(args.decode_seqs, 16)
    timed(decode_prompts, 2)
    one = statistics.median(timed(decode_prompts, 1) for _ in range(args.reps))
    many = statistics.median(timed(decode_prompts, args.decode_tokens + 1) for _ in range(args.reps))
    out = {
        "init_s": init_s,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": args.prompts * args.prompt_len / prefill_s,
        "decode_s": many - one,
        "decode_tokens_per_s": args.decode_seqs * args.decode_tokens / (many - one),
    }
    if args.method == "plugin":
        from superexperts.vllm import ranks, snapshots

        out["profiled_tokens"] = ranks.merge(snapshots(llm))[0]["tokens"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-seqs", type=int, default=4)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    p.add_argument("--out", default=None)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        print("RESULT " + json.dumps(child(args)))
        return

    import vllm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), args.layers)
        for method in METHODS:
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
            env.pop("SUPEREXPERTS_VLLM", None)
            if method == "plugin":
                env["SUPEREXPERTS_VLLM"] = "1"
            cmd = [sys.executable, "-m", "bench.bench_vllm", "--method", method, "--model-dir", tmp] + [
                a for a in sys.argv[1:] if a != "--out"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rows.append({"method": method, **json.loads(line[len("RESULT "):])})
    plain = rows[0]
    for r in rows:
        r["prefill_ratio"] = r["prefill_tokens_per_s"] / plain["prefill_tokens_per_s"]
        r["decode_ratio"] = r["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
    print_table(rows, ["method", "prefill_tokens_per_s", "prefill_ratio", "decode_tokens_per_s", "decode_ratio", "init_s"])
    config = {k: v for k, v in vars(args).items() if k not in ("method", "model_dir", "out")}
    write_json("vllm", {"vllm": vllm.__version__, "shape": SHAPE, "config": config, "results": rows,
                        "goal": "plugin >= 0.9 x plain on CPU"}, args.out)


if __name__ == "__main__":
    main()
