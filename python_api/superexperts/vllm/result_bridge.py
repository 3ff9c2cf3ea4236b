"""Builds the toolkit's `ProfileResult` from merged vLLM statistics (the only module here
that knows the result's constructor)."""

from __future__ import annotations

import torch

from ..collector import DownProjStats
from ..result import ProfileResult


def build_result(meta: dict, tables: dict[int, dict[str, torch.Tensor]]) -> ProfileResult:
    """Routed-expert tables ``{layer: {field: [E]}}`` -> `ProfileResult`.

    Token references are ``request_uid * span + position``, so with ``seq_len = span`` and
    one "sequence" per request, ``result.locate(token)`` reads back ``(request_uid,
    position)``; ``meta["request_ids"][request_uid]`` is vLLM's request id. Only routed
    experts are measured (no shared experts, dense MLPs, hidden states or sinks).
    """
    num_layers = meta["num_layers"]
    return ProfileResult(
        model_type=meta["model_type"],
        num_layers=num_layers,
        seq_len=meta["span"],
        num_sequences=len(meta["request_ids"]),
        num_sink_tokens=1,
        layer_kinds=["moe" if layer in tables else "dense" for layer in range(num_layers)],
        routed={layer: DownProjStats(**{k: t.cpu() for k, t in fields.items()}) for layer, fields in sorted(tables.items())},
    )
