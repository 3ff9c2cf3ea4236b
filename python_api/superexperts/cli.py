"""The ``superexperts`` command line: ``profile``, ``prune-eval``, ``demo`` and ``families``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .rules import RULES, Rule


def _add_data_args(p: argparse.ArgumentParser, *, file_flag: str, defaults: tuple[int, int]) -> None:
    p.add_argument(file_flag, required=True, help=".txt, .jsonl/.json (text field), a datasets save_to_disk folder, or token ids in .npy/.pt/.safetensors")
    p.add_argument("--num-samples", type=int, default=defaults[0], help="windows to use (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=defaults[1], help="tokens per window (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the window choice")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/datasets input")
    p.add_argument("--no-bos", action="store_true", help="do not start each window with the tokenizer's BOS token")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="transformers checkpoint directory (config.json + safetensors)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--num-sink-tokens", type=int, default=1, help="first tokens whose attention mass counts as sink")


def _add_rule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", default="paper", choices=RULES, help="Super Expert rule (default: the paper's Eq. 6)")
    p.add_argument("--quantile", type=float, default=99.5, help="percentile for the paper and quantile rules")
    p.add_argument("--k", type=float, default=None, help="multiple for the std (default 3) and mean_multiple (default 10) rules")
    p.add_argument("--max-ratio", type=float, default=10.0, help="the paper rule's a > max/ratio")
    p.add_argument("--layer-fraction", type=float, default=0.75, help="candidate layers: the first round(f * num_layers)")
    p.add_argument("--layers", default=None, help="explicit candidate layers, e.g. '0-35' or '1,2,3'")


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part.strip():
            out.append(int(part))
    return tuple(out)


def _rule(args) -> Rule:
    return Rule(
        name=args.rule,
        quantile=args.quantile,
        max_ratio=args.max_ratio,
        k=args.k,
        layer_fraction=args.layer_fraction,
        layers=_parse_layers(args.layers),
    )


def _load_tokens(path, tokenizer, config, args):
    from .calibration import load_calibration
    from .layers import text_config

    return load_calibration(
        path,
        tokenizer,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        seed=args.seed,
        text_field=args.text_field,
        add_bos=not args.no_bos,
        max_seq_len=getattr(text_config(config), "max_position_embeddings", None),
    )


def print_super_experts(result, rule: Rule) -> None:
    ses = result.super_experts(rule)
    units = {(u["layer"], u["expert"]): u for u in result.units()}
    print(f"\nSuper Experts ({rule.name}: {rule.describe()}; candidate layers 0-{max(rule.layer_set(result.num_layers), default=-1)})")
    print(f"{'rank':>4} {'layer':>5} {'expert':>8} {'output max':>11} {'input max':>10} {'rows':>7} {'sample':>6} {'pos':>5} {'channel':>7}")
    for se in ses:
        u = units[(se.layer, se.expert)]
        print(
            f"{se.rank:>4} {se.layer:>5} {str(se.expert):>8} {se.value:>11.2f} {u['input_max']:>10.2f} {u['rows']:>7} "
            f"{u['sample']:>6} {u['position']:>5} {u['channel']:>7}"
        )
    if not ses:
        print("  (none)")
    others = sorted((u for u in result.units() if (u["layer"], u["expert"]) not in {(s.layer, s.expert) for s in ses} and u["kind"] != "dense"), key=lambda u: -u["output_max"])
    if others:
        u = others[0]
        print(f"  next largest: layer {u['layer']} expert {u['expert']} output max {u['output_max']:.2f}")


def print_massive(result) -> None:
    print("\nMassive activations (max |hidden state| of each layer's output)")
    print(f"{'layer':>5} {'max':>10} {'pos':>5} {'channel':>7} {'max/mean':>9}")
    for r in result.massive_activations():
        print(f"{r['layer']:>5} {r['max']:>10.2f} {r['position']:>5} {r['channel']:>7} {r['max_over_mean']:>9.1f}")


def print_ablation(ablation) -> None:
    print(f"\nPruned {len(ablation.experts)} experts: {'; '.join(f'{l},{e}' for l, e in ablation.experts)}")
    print(f"perplexity: {ablation.base.perplexity:.3f} -> {ablation.pruned.perplexity:.3f}  ({ablation.base.tokens} tokens)")
    print(f"{'layer':>5} {'sink mass before':>17} {'after':>8} {'D_sink':>8}")
    for layer, d in ablation.sink_decay.items():
        before = float(ablation.base.sink_mass[layer].mean())
        after = float(ablation.pruned.sink_mass[layer].mean())
        print(f"{layer:>5} {before:>17.3f} {after:>8.3f} {100 * d:>7.1f}%")


def cmd_profile(args) -> int:
    from .calibration import check_source
    from .loading import check_model_dir, load_model_in_background, load_tokenizer, resolve_device
    from .profiler import profile
    from .report import write_report

    rule = _rule(args)
    config = check_model_dir(args.model)
    check_source(args.calib)
    if args.stream or args.parallel:
        from .streaming import stream_profile

        tokens = _load_tokens(args.calib, load_tokenizer(args.model), config, args)
        result = stream_profile(
            args.model, tokens, batch_size=args.batch_size, dtype=args.dtype, device=str(resolve_device(args.device)),
            num_sink_tokens=args.num_sink_tokens, offload_hidden=args.offload_hidden, parallel=args.parallel,
            checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        )
        if result is None:  # not rank 0: rank 0 reports
            return 0
    else:
        tokens = _load_tokens(args.calib, load_tokenizer(args.model), config, args)
        with load_model_in_background(args.model, dtype=args.dtype, device=args.device) as (model, _):
            result = profile(
                model, tokens, batch_size=args.batch_size, num_sink_tokens=args.num_sink_tokens,
                checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
            )
    print(f"profiled {result.num_tokens} tokens in {result.elapsed_s:.1f} s ({result.tokens_per_s:.0f} tokens/s)")
    print_super_experts(result, rule)
    print_massive(result)
    paths = write_report(result, args.out, rule=rule, plots=not args.no_plots)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _experts_from_report(path: str):
    from .ablation import expert_refs

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("super_experts")
    if not isinstance(data, list):
        raise ValueError(f"--super-experts: {path} holds neither a superexperts report.json nor a 'Super Experts Report.json' list")
    try:
        return expert_refs(data)
    except ValueError as e:
        raise ValueError(f"--super-experts: {path}: {e}") from None


def cmd_prune_eval(args) -> int:
    from .ablation import ablate, parse_experts
    from .calibration import check_source
    from .loading import check_model_dir, load_model
    from .report import write_ablation

    experts = parse_experts(args.experts) if args.experts else _experts_from_report(args.super_experts)
    if not experts:
        raise ValueError("no experts to prune")
    check_model_dir(args.model)
    check_source(args.eval)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    tokens = _load_tokens(args.eval, tokenizer, model.config, args)
    ablation = ablate(model, experts, tokens, batch_size=args.batch_size, num_sink_tokens=args.num_sink_tokens)
    print_ablation(ablation)
    if args.out:
        write_ablation(ablation, args.out, plots=not args.no_plots)
        print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .ablation import ablate
    from .calibration import load_calibration
    from .demo import build_demo
    from .loading import load_model
    from .profiler import profile
    from .report import write_report

    start = time.perf_counter()
    out = Path(args.out)
    demo = build_demo(out)
    print(f"built the demo model (tiny Qwen3-MoE: 6 layers x 128 experts, top-8) in {demo.model_dir}")
    model, tokenizer = load_model(demo.model_dir, device=args.device)
    calib = load_calibration(demo.calibration, tokenizer, seq_len=64, num_samples=32, seed=0)
    result = profile(model, calib, batch_size=8)
    rule = Rule()
    print(f"profiled {result.num_tokens} tokens in {result.elapsed_s:.1f} s ({result.tokens_per_s:.0f} tokens/s)")
    print_super_experts(result, rule)
    print_massive(result)
    eval_tokens = load_calibration(demo.eval, tokenizer, seq_len=64, num_samples=32, seed=1)
    ablation = ablate(model, result.super_experts(rule), eval_tokens, batch_size=8)
    print_ablation(ablation)
    paths = write_report(result, out / "report", rule=rule, ablation=ablation, plots=not args.no_plots)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    print(f"planted: {demo.planted}; demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_families(args) -> int:
    from .families import UNCLASSIFIED, families, format_table

    rows = families()
    print(format_table(rows, markdown=args.markdown))
    return 1 if any(f.state == UNCLASSIFIED for f in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superexperts", description="Find and measure Super Experts in MoE LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="profile a model on calibration data and report its Super Experts")
    _add_model_args(p)
    _add_data_args(p, file_flag="--calib", defaults=(128, 2048))
    _add_rule_args(p)
    p.add_argument("--out", default="superexperts_out", help="output directory")
    p.add_argument("--no-plots", action="store_true")
    scale = p.add_argument_group("scale")
    scale.add_argument("--stream", action="store_true",
                       help="load one decoder layer at a time from the checkpoint (models larger than memory)")
    scale.add_argument("--offload-hidden", action="store_true", help="with --stream: keep hidden states between layers in CPU memory")
    scale.add_argument("--parallel", choices=["expert", "data"], default=None,
                       help="under torchrun: split each layer's experts (expert) or the calibration sequences (data) across ranks; implies --stream")
    scale.add_argument("--checkpoint-dir", default=None, help="save finished work here (every layer when streaming, else every --checkpoint-every batches)")
    scale.add_argument("--checkpoint-every", type=int, default=1, help="batches between checkpoints without --stream")
    scale.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("prune-eval", help="prune experts and measure perplexity and attention-sink decay")
    _add_model_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experts", help="'layer,expert' pairs separated by ';', e.g. '1,68;2,92' or '8,shared'")
    which.add_argument("--super-experts", help="a report.json of `superexperts profile` or a 'Super Experts Report.json'")
    _add_data_args(p, file_flag="--eval", defaults=(64, 2048))
    p.add_argument("--out", default=None, help="write ablation.json (and sink_decay.png) here")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_prune_eval)

    p = sub.add_parser("demo", help="build a tiny MoE with planted Super Experts, profile it, prune them")
    p.add_argument("--out", default="superexperts_demo", help="output directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("families", help="list the installed transformers' MoE model types and how each is handled")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_families)

    from .vllm.cli import add_parser as add_vllm_report

    add_vllm_report(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", False) and not args.checkpoint_dir:
        print("superexperts: error: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"superexperts {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
