"""The ``superexperts`` command line: ``profile``, ``prune-eval``, ``prune``, ``protect``, ``demo`` and ``families``."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .importance import CRITERIA
from .distributed import DEFAULT_TIMEOUT_S as DEFAULT_DIST_TIMEOUT_S
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
    p.add_argument("--exclude-unrouted", action="store_true",
                   help="leave experts that saw no calibration token out of the pool A (default: in A with a = 0, as the authors' tool)")


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out += range(int(lo), int(hi) + 1)
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected layer indices and ranges, e.g. '0-35' or '1,2,3'") from None
    if not out:
        raise ValueError(f"--layers {text!r} names no layer")
    return tuple(out)


def _rule(args) -> Rule:
    return Rule(
        name=args.rule,
        quantile=args.quantile,
        max_ratio=args.max_ratio,
        k=args.k,
        layer_fraction=args.layer_fraction,
        layers=_parse_layers(args.layers),
        exclude_unrouted=args.exclude_unrouted,
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
        vocab_size=getattr(text_config(config), "vocab_size", None),
    )


def _check_data_args(args) -> None:
    from .calibration import check_sink_tokens

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-samples", args.num_samples, 1),
                             ("--seq-len", args.seq_len, 2)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    check_sink_tokens(args.num_sink_tokens, args.seq_len)


def _check_model_args(args):
    """The checkpoint's config (after checking its shards) and the device, before any load."""
    from .loading import check_model_dir, resolve_device

    config = check_model_dir(args.model)
    resolve_device(args.device)
    return config


def _check_profile_args(args, config) -> Rule:
    """Everything `profile` can check before loading a model; returns the rule."""
    from .layers import text_config

    if args.offload_hidden and not (args.stream or args.parallel):
        raise ValueError("--offload-hidden applies to layer streaming: add --stream (or --parallel)")
    if args.hold_back_mb is not None:
        if not (args.stream or args.parallel):
            raise ValueError("--hold-back-mb applies to layer streaming: add --stream (or --parallel)")
        if not args.hold_back_mb >= 0:
            raise ValueError(f"--hold-back-mb must be >= 0, got {args.hold_back_mb}")
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.checkpoint_every != 1 and (args.stream or args.parallel):
        raise ValueError("--checkpoint-every applies without --stream: streamed runs save after every layer")
    if args.dist_timeout is not None:
        if args.parallel is None:
            raise ValueError("--dist-timeout applies to --parallel runs under torchrun")
        if not args.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    rule = _rule(args)
    try:
        rule.layer_set(text_config(config).num_hidden_layers)
    except ValueError as e:
        raise ValueError(f"--layers: {e}") from None
    _check_data_args(args)
    return rule


def print_super_experts(result, rule: Rule) -> None:
    ses = result.super_experts(rule)
    units = {(u["layer"], u["expert"]): u for u in result.units()}
    pool = result.pool(rule)
    print(f"\nSuper Experts ({rule.name}: {rule.describe()}; candidate layers 0-{max(rule.layer_set(result.num_layers), default=-1)})")
    cut = "none" if pool["threshold"] is None else f"{pool['threshold']:.2f}"
    print(f"pool A: {pool['candidates']} candidates; {pool['unrouted']} experts of L saw no token "
          f"({'in A with a = 0' if pool['unrouted_in_pool'] else 'left out of A'}); threshold {cut}")
    print(f"{'rank':>4} {'layer':>5} {'expert':>8} {'output max':>11} {'input max':>10} {'rows':>7} {'sample':>6} {'pos':>5} {'channel':>7}")
    for se in ses:
        u = units[(se.layer, se.expert)]
        note = {"overflow": "  OVERFLOW: the output exceeded the dtype", "nan": "  NaN in the output"}.get(se.status, "")
        print(
            f"{se.rank:>4} {se.layer:>5} {str(se.expert):>8} {se.value:>11.2f} {u['input_max']:>10.2f} {u['rows']:>7} "
            f"{u['sample']:>6} {u['position']:>5} {u['channel']:>7}{note}"
        )
    if not ses:
        print("  (none)")
    found = {(s.layer, s.expert) for s in ses}
    others = [u for u in result.units() if (u["layer"], u["expert"]) not in found and u["kind"] != "dense"]
    if others:  # NaN sorts first: a non-finite value is the finding to show
        u = max(others, key=lambda u: (math.isnan(u["output_max"]), u["output_max"]))
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
    from .files import check_output_dir
    from .loading import load_model_in_background, load_tokenizer, resolve_device
    from .profiler import profile

    config = _check_model_args(args)
    rule = _check_profile_args(args, config)
    check_source(args.calib)
    check_output_dir(args.out, "--out")
    if args.checkpoint_dir is not None:
        check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
    # The tokens before the model: a bad calibration file fails before the long load.
    tokens = _load_tokens(args.calib, load_tokenizer(args.model), config, args)
    if args.stream or args.parallel:
        from . import distributed
        from .streaming import stream_profile

        timeout_s = args.dist_timeout or distributed.DEFAULT_TIMEOUT_S
        with distributed.process_group(timeout_s, args.checkpoint_dir):
            result = stream_profile(
                args.model, tokens, batch_size=args.batch_size, dtype=args.dtype, device=str(resolve_device(args.device)),
                num_sink_tokens=args.num_sink_tokens, offload_hidden=args.offload_hidden, parallel=args.parallel,
                checkpoint_dir=args.checkpoint_dir, resume=args.resume, dist_timeout_s=timeout_s,
                hold_back=None if args.hold_back_mb is None else int(args.hold_back_mb * 2**20),
            )
            if result is not None:  # rank 0 (or one process) reports; the others wait for it
                _report_profile(result, rule, args)
        return 0
    # Reading the checkpoint overlaps the first batch's forward (`load_model_in_background`).
    with load_model_in_background(args.model, dtype=args.dtype, device=args.device) as (model, _):
        result = profile(
            model, tokens, batch_size=args.batch_size, num_sink_tokens=args.num_sink_tokens,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
        )
    _report_profile(result, rule, args)
    return 0


def _report_profile(result, rule: Rule, args) -> None:
    from .report import write_report

    print(f"profiled {result.num_tokens} tokens in {result.elapsed_s:.1f} s ({result.tokens_per_s:.0f} tokens/s)")
    print_super_experts(result, rule)
    print_massive(result)
    paths = write_report(result, args.out, rule=rule, plots=not args.no_plots)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def _experts_from_report(path: str):
    from .report import read_report

    return read_report(path)[0]


def cmd_prune_eval(args) -> int:
    from .ablation import ablate, parse_experts
    from .calibration import check_source
    from .files import check_output_dir
    from .loading import load_model, load_tokenizer
    from .report import write_ablation

    experts = parse_experts(args.experts) if args.experts else _experts_from_report(args.super_experts)
    if not experts:
        raise ValueError("no experts to prune")
    config = _check_model_args(args)
    _check_data_args(args)
    check_source(args.eval)
    if args.out:
        check_output_dir(args.out, "--out")
    tokens = _load_tokens(args.eval, load_tokenizer(args.model), config, args)
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    ablation = ablate(model, experts, tokens, batch_size=args.batch_size, num_sink_tokens=args.num_sink_tokens)
    print_ablation(ablation)
    if args.out:
        write_ablation(ablation, args.out, plots=not args.no_plots)
        print(f"wrote {args.out}")
    return 0


def cmd_prune(args) -> int:
    from .compress import plan_pruning, summary, write_pruned
    from .loading import check_model_dir, load_model
    from .report import read_report
    from .result import META_FILE, ProfileResult

    protect = read_report(args.protect_super_experts, "--protect-super-experts")[0] if args.protect_super_experts else []
    profile_dir = args.profile
    if profile_dir is None and args.protect_super_experts:
        report = Path(args.protect_super_experts)
        profile_dir = report if report.is_dir() else report.parent
    if profile_dir is None or not (Path(profile_dir) / META_FILE).is_file():
        raise ValueError(
            "prune needs the importance sums of a profile: pass --profile DIR (an output directory of "
            "`superexperts profile`), or a --protect-super-experts report that sits in one"
        )
    result = ProfileResult.load(profile_dir)
    plan = plan_pruning(result, criterion=args.criterion, keep_ratio=args.keep_ratio, protect=protect)
    check_model_dir(args.model)
    model, _ = load_model(args.model, dtype=args.dtype, device="cpu")
    out = write_pruned(model, plan, args.out, source_dir=args.model)
    print(summary(plan))
    print(f"wrote {out}")
    return 0


def cmd_protect(args) -> int:
    from .protect import module_names, names_from_model, protection, render
    from .report import read_report

    experts, model_meta = read_report(args.report, "--report")
    if args.model:
        import torch

        from .loading import auto_model_class, check_model_dir

        config = check_model_dir(args.model)
        with torch.device("meta"):
            names = names_from_model(auto_model_class(config).from_config(config))
    elif model_meta is None:
        raise ValueError(f"--report: {args.report} is the authors' list, which does not name the model's modules: pass --model")
    else:
        names = module_names(model_meta)
    text = json.dumps(render(protection(experts, names), args.format), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_demo(args) -> int:
    from .ablation import ablate
    from .calibration import load_calibration
    from .demo import build_demo
    from .files import check_output_dir
    from .loading import load_model, resolve_device
    from .profiler import profile
    from .report import write_report

    start = time.perf_counter()
    out = check_output_dir(args.out, "--out")
    resolve_device(args.device)
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
    scale.add_argument("--hold-back-mb", type=float, default=None, metavar="MB",
                       help="with --stream on CPU: MB of each layer's expert weights read only once the layer before is freed, "
                            "so that resident memory stays within two layers (default: an estimate of one batch's working "
                            "memory; 0: none)")
    scale.add_argument("--parallel", choices=["expert", "data"], default=None,
                       help="under torchrun: split each layer's experts (expert) or the calibration sequences (data) across ranks; implies --stream")
    scale.add_argument("--checkpoint-dir", default=None, help="save finished work here (every layer when streaming, else every --checkpoint-every batches)")
    scale.add_argument("--checkpoint-every", type=int, default=1, help="batches between checkpoints without --stream")
    scale.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    scale.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                       help="with --parallel: how long a rank waits for the others in a collective before the run "
                            f"stops with an error naming the ranks that did not answer (default {DEFAULT_DIST_TIMEOUT_S:g})")
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

    p = sub.add_parser("prune", help="write a smaller checkpoint without the least important routed experts")
    p.add_argument("--model", required=True, help="transformers checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--criterion", default="reap", choices=CRITERIA, help="expert importance (default %(default)s)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="routed experts kept per MoE layer (default %(default)s)")
    p.add_argument("--protect-super-experts", default=None, metavar="REPORT",
                   help="never prune these: a report.json, a 'Super Experts Report.json', or a profile output directory")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="the `superexperts profile` output with the importance sums (default: the REPORT's directory)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("protect", help="ignore lists that keep Super Experts in high precision through quantization")
    p.add_argument("--report", required=True, help="a report.json, a 'Super Experts Report.json', or a profile output directory")
    p.add_argument("--format", default="json", choices=["json", "llmcompressor", "modelopt"])
    p.add_argument("--model", default=None, help="checkpoint directory to read module names from (needed for the authors' list)")
    p.add_argument("--out", default=None, help="write here instead of stdout")
    p.set_defaults(func=cmd_protect)

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
    """Run the command line; 0 on success, 2 for bad arguments or inputs, 1 when the run
    failed on the way (a report that cannot be written, a distributed timeout)."""
    from .distributed import DistributedFailure
    from .files import LockedError
    from .report import ReportNotWritten

    args = build_parser().parse_args(argv)
    if getattr(args, "resume", False) and not args.checkpoint_dir:
        print("superexperts: error: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ReportNotWritten, DistributedFailure) as e:
        print(f"superexperts {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, ImportError, LockedError) as e:
        print(f"superexperts {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
