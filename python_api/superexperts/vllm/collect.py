"""Client side: read, clear and save the statistics of a running ``vllm.LLM``."""

from __future__ import annotations

from pathlib import Path

from . import ranks as _ranks
from .result_bridge import build_result


def _rpc(llm, method: str, *args) -> list:
    try:
        return llm.collective_rpc(method, args=args)
    except Exception as e:  # the engine process re-raises the worker's NotImplementedError as Exception
        if "not implemented" not in str(e) or method not in str(e):
            raise
        raise RuntimeError(
            f"superexperts.vllm: the engine's workers have no {method!r}: the plugin was not enabled when "
            "the LLM was created. Call superexperts.vllm.enable() before LLM(...) (or set SUPEREXPERTS_VLLM=1)."
        ) from e


def snapshots(llm) -> list[dict]:
    """Every worker's raw snapshot (see `superexperts.vllm.ranks`)."""
    return _rpc(llm, "superexperts_snapshot")


def collect(llm):
    """The routed-expert statistics of every request `llm` ran since it started (or since
    `reset`), merged over its workers, as a `superexperts.ProfileResult`: its
    ``super_experts()``, rules and ``write_report`` work as for `superexperts.profile`.

    Locations read back with ``result.locate(token) -> (request_uid, position)``;
    `request_ids` maps the uid to vLLM's request id. Tokens served from the prefix cache
    were not recomputed and are not in the statistics.
    """
    meta, tables = _ranks.merge(snapshots(llm))
    return build_result(meta, tables)


def request_ids(llm) -> list[str]:
    """vLLM's request id of each request uid (the "sample" of a location)."""
    return _ranks.merge(snapshots(llm))[0]["request_ids"]


def reset(llm) -> None:
    """Clear the statistics on every worker (in place; no recompilation)."""
    _rpc(llm, "superexperts_reset")


def dump(llm, directory: str | Path) -> Path:
    """Write every worker's statistics to `directory` (``superexperts vllm-report`` reads it)."""
    for snap in snapshots(llm):
        _ranks.write_rank(directory, snap)
    return Path(directory)


def load_dump(directory: str | Path):
    """``(ProfileResult, request_ids, profiled_tokens)`` of a dump directory."""
    meta, tables = _ranks.merge(_ranks.read_dir(directory))
    return build_result(meta, tables), meta["request_ids"], meta["tokens"]
