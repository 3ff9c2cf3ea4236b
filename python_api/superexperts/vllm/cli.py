"""``superexperts vllm-report DUMP``: turn a vLLM statistics dump into the usual report.

A dump is what ``superexperts_dump`` (``vllm serve`` in dev mode, ``POST /collective_rpc``)
or `superexperts.vllm.dump` wrote. The report is `write_report`'s, plus a ``"vllm"``
section in report.json: the profiled token count, the request id of each request uid,
and the request id and position of each Super Expert's maximum.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    from ..cli import _add_rule_args

    p = sub.add_parser("vllm-report", help="report the Super Experts of a statistics dump of vLLM (superexperts.vllm)")
    p.add_argument("dump", help="directory with rank<r>.safetensors / rank<r>.json files")
    _add_rule_args(p)
    p.add_argument("--out", default="superexperts_vllm_report", help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_vllm_report)


def cmd_vllm_report(args: argparse.Namespace) -> int:
    from ..cli import _rule, print_super_experts
    from ..report import write_report
    from .collect import load_dump

    rule = _rule(args)
    result, request_ids, tokens = load_dump(args.dump)
    print(f"{tokens} tokens profiled in {len(request_ids)} requests (sample = request uid, pos = position in the request)")
    print_super_experts(result, rule)
    paths = write_report(result, args.out, rule=rule, plots=not args.no_plots)
    report_path = Path(paths["report"])
    report = json.loads(report_path.read_text())
    units = {(u["layer"], u["expert"]): u for u in result.units()}
    report["vllm"] = {
        "tokens": tokens,
        "request_ids": request_ids,
        "super_experts": [
            {"layer": se.layer, "expert": se.expert, "request_id": request_ids[units[(se.layer, se.expert)]["sample"]],
             "position": units[(se.layer, se.expert)]["position"]}
            for se in result.super_experts(rule)
        ],
    }
    report_path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0
