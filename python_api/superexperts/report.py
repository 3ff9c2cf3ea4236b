"""Write what a run found: JSON report, the authors'-format SE list, raw stats, plots."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

from .ablation import AblationResult
from .result import ProfileResult
from .rules import Rule, SuperExpert

REPORT_FILE = "report.json"
AUTHORS_FILE = "Super Experts Report.json"
ABLATION_FILE = "ablation.json"


def can_plot() -> bool:
    """True when matplotlib is installed; else warn that plots are skipped."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    warnings.warn("plots skipped: matplotlib is not installed (pip install 'superexperts-kernels[plot]')", stacklevel=3)
    return False


def authors_format(super_experts: list[SuperExpert]) -> list[dict]:
    """The list the authors' tool writes to ``Super Experts Report.json``."""
    return [
        {"expert_index": se.expert, "layer_index": se.layer, "output_max": se.value, "rank": se.rank}
        for se in super_experts
    ]


def _finite(x):
    """JSON has no NaN/inf: write null for them."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def read_report(path: str | Path, flag: str = "--super-experts") -> tuple[list, dict | None]:
    """The Super Experts of a report: a superexperts ``report.json``, the authors' ``Super
    Experts Report.json``, or a directory holding one of them. Returns ``(layer, expert)``
    pairs and the report's model metadata (None for the authors' list, which has none)."""
    from .ablation import expert_refs

    p = Path(path)
    if p.is_dir():
        p = next((p / f for f in (REPORT_FILE, AUTHORS_FILE) if (p / f).is_file()), p / REPORT_FILE)
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: {p} does not exist")
    data = json.loads(p.read_text())
    model = data.get("model") if isinstance(data, dict) else None
    experts = data.get("super_experts") if isinstance(data, dict) else data
    if not isinstance(experts, list):
        raise ValueError(f"{flag}: {p} holds neither a superexperts report.json nor a '{AUTHORS_FILE}' list")
    try:
        return expert_refs(experts), model
    except ValueError as e:
        raise ValueError(f"{flag}: {p}: {e}") from None


def build_report(result: ProfileResult, rule: Rule, super_experts: list[SuperExpert], ablation: AblationResult | None = None) -> dict:
    return _finite(
        {
            "model": result.metadata(),
            "calibration": {
                "sequences": result.num_sequences,
                "seq_len": result.seq_len,
                "tokens": result.num_tokens,
                "elapsed_s": result.elapsed_s,
                "tokens_per_s": result.tokens_per_s,
            },
            "rule": {
                "name": rule.name,
                "description": rule.describe(),
                "layers": sorted(rule.layer_set(result.num_layers)),
                "pool": result.pool(rule),
            },
            "super_experts": [se.to_dict() for se in super_experts],
            "experts": result.units(),
            "massive_activations": result.massive_activations(),
            "sink_mass": {str(k): v.tolist() for k, v in result.sink_mass().items()},
            "ablation": ablation.to_dict() if ablation is not None else None,
        }
    )


def write_report(
    result: ProfileResult,
    out_dir: str | Path,
    *,
    rule: Rule | None = None,
    ablation: AblationResult | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``Super Experts Report.json``, ``profile.json`` +
    ``stats.safetensors`` (raw stats, reloadable with `ProfileResult.load`) and, with
    `plots` and matplotlib installed (else a warning), the PNGs. Returns the written paths
    by name."""
    rule = rule or Rule()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    super_experts = result.super_experts(rule)
    paths = {"report": out / REPORT_FILE, "authors_report": out / AUTHORS_FILE}
    with open(paths["report"], "w") as f:
        json.dump(build_report(result, rule, super_experts, ablation), f, indent=2)
    with open(paths["authors_report"], "w") as f:
        json.dump(authors_format(super_experts), f, indent=2)
    result.save(out)
    paths["stats"] = out / "stats.safetensors"
    if plots and can_plot():
        from . import plots as _plots

        paths["heatmap"] = _plots.plot_expert_heatmap(result, super_experts, out / "expert_heatmap.png")
        paths["massive_activations"] = _plots.plot_massive_activations(result, out / "massive_activations.png")
        if ablation is not None:
            paths["sink_decay"] = _plot_sink_decay(ablation, out)
    return paths


def write_ablation(ablation: AblationResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``ablation.json`` and, with `plots` and matplotlib installed (else a warning),
    ``sink_decay.png``. Returns the written paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"ablation": out / ABLATION_FILE}
    paths["ablation"].write_text(json.dumps(_finite(ablation.to_dict()), indent=2))
    if plots and can_plot():
        paths["sink_decay"] = _plot_sink_decay(ablation, out)
    return paths


def _plot_sink_decay(ablation: AblationResult, out: Path) -> Path:
    from . import plots as _plots

    return _plots.plot_sink_decay(ablation.sink_decay, ablation.base.sink_mass, ablation.pruned.sink_mass, out / "sink_decay.png")
