"""Worker-side RPC methods (added to vLLM's ``WorkerBase`` when the plugin is enabled),
reached with ``collective_rpc``: from `LLM.collective_rpc`, or over HTTP from
``vllm serve`` in dev mode (``VLLM_SERVER_DEV_MODE=1``, ``POST /collective_rpc``).

- ``superexperts_snapshot()``: this rank's statistics (one host sync), see `snapshot`;
- ``superexperts_reset()``: clear them, in place;
- ``superexperts_dump(directory)``: write them to ``directory/rank<r>.safetensors`` and
  ``rank<r>.json`` (`superexperts vllm-report directory` merges the ranks into a report).
"""

from __future__ import annotations

from . import ranks as _ranks
from . import stats as _stats
from . import tokens as _tokens

METHODS = ("superexperts_snapshot", "superexperts_reset", "superexperts_dump")


def snapshot(rank: int, model_config) -> dict:
    """``{"meta": {...}, "stats": safetensors bytes}`` of this rank (msgpack-friendly)."""
    refs = _tokens.current()
    meta = {
        "rank": rank,
        "model_type": getattr(model_config.hf_text_config, "model_type", "unknown"),
        "num_layers": model_config.hf_text_config.num_hidden_layers,
        "span": refs.span if refs is not None else model_config.max_model_len,
        "request_ids": list(refs.request_ids) if refs is not None else [],
        "tokens": refs.tokens_profiled() if refs is not None else 0,
    }
    return {"meta": meta, "stats": _ranks.to_bytes(_stats.layers())}


def superexperts_snapshot(self) -> dict:
    return snapshot(self.rank, self.vllm_config.model_config)


def superexperts_reset(self) -> None:
    _stats.reset_all()
    refs = _tokens.current()
    if refs is not None:
        refs.reset_count()


def superexperts_dump(self, directory: str) -> str:
    return str(_ranks.write_rank(directory, snapshot(self.rank, self.vllm_config.model_config)))


def install_rpc_methods() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    for name in METHODS:
        setattr(WorkerBase, name, globals()[name])
