"""Write what a run found: JSON report, the authors'-format SE list, raw stats, plots.

JSON has no NaN or infinity; in every JSON file written here a non-finite number is the
string ``"nan"``, ``"inf"`` or ``"-inf"`` (``float()`` reads each back), never ``null`` or 0.
A Super Expert whose value is one of them also says so in its ``status``
(``"overflow"`` / ``"nan"``; see `superexperts.rules`).

Each file is written under a temporary name and renamed into place, so a failure (a full
disk) leaves the previous file or none, never a truncated one; when the report cannot be
written, the run's stats are saved in a new temporary directory that the error names.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
import warnings
from pathlib import Path

from .ablation import AblationResult
from .files import write_json_atomic
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


class ReportNotWritten(OSError):
    """The report could not be written; the message names where the stats were kept."""


def json_ready(x):
    """`x` with every non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
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
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {p} ({e.strerror or e})") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise ValueError(f"{flag}: {p} is not a JSON file ({e})") from None
    model = data.get("model") if isinstance(data, dict) else None
    experts = data.get("super_experts") if isinstance(data, dict) else data
    if not isinstance(experts, list):
        raise ValueError(f"{flag}: {p} holds neither a superexperts report.json nor a '{AUTHORS_FILE}' list")
    try:
        return expert_refs(experts), model
    except ValueError as e:
        raise ValueError(f"{flag}: {p}: {e}") from None


def build_report(result: ProfileResult, rule: Rule, super_experts: list[SuperExpert], ablation: AblationResult | None = None) -> dict:
    return json_ready(
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
    by name.

    Raises `ReportNotWritten` (an OSError) when a file cannot be written (after saving the
    stats in a new temporary directory that its message names).
    """
    rule = rule or Rule()
    out = Path(out_dir)
    super_experts = result.super_experts(rule)
    paths = {"report": out / REPORT_FILE, "authors_report": out / AUTHORS_FILE, "stats": out / "stats.safetensors"}
    try:
        out.mkdir(parents=True, exist_ok=True)
        result.save(out)
        write_json_atomic(paths["authors_report"], json_ready(authors_format(super_experts)))
        write_json_atomic(paths["report"], build_report(result, rule, super_experts, ablation))
    except OSError as e:
        kept = _keep_elsewhere("stats", result.save)
        raise ReportNotWritten(
            f"could not write the report to {out}: {e}; {kept}: superexperts.ProfileResult.load(<that directory>) "
            "reads them, and superexperts.write_report writes the report from them"
        ) from e
    if plots and can_plot():
        from . import plots as _plots

        try:
            paths["heatmap"] = _plots.plot_expert_heatmap(result, super_experts, out / "expert_heatmap.png")
            paths["massive_activations"] = _plots.plot_massive_activations(result, out / "massive_activations.png")
            if ablation is not None:
                paths["sink_decay"] = _plot_sink_decay(ablation, out)
        except OSError as e:
            warnings.warn(f"plots not written to {out} ({e}); the reports and stats are", stacklevel=2)
    return paths


def write_ablation(ablation: AblationResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``ablation.json`` and, with `plots` and matplotlib installed (else a warning),
    ``sink_decay.png``. Returns the written paths by name."""
    out = Path(out_dir)
    paths = {"ablation": out / ABLATION_FILE}
    data = json_ready(ablation.to_dict())
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(paths["ablation"], data)
    except OSError as e:
        kept = _keep_elsewhere("results", lambda d: write_json_atomic(d / ABLATION_FILE, data))
        raise ReportNotWritten(f"could not write {ABLATION_FILE} to {out}: {e}; {kept}") from e
    if plots and can_plot():
        try:
            paths["sink_decay"] = _plot_sink_decay(ablation, out)
        except OSError as e:
            warnings.warn(f"plots not written to {out} ({e}); {ABLATION_FILE} is", stacklevel=2)
    return paths


def _keep_elsewhere(what: str, save) -> str:
    """``save(directory)`` into a new temporary directory; say where (or that it failed too)."""
    try:
        kept = Path(tempfile.mkdtemp(prefix=f"superexperts-{what}-"))
        save(kept)
    except OSError as e:
        return f"keeping the {what} in a temporary directory failed too ({e})"
    return f"the {what} are kept in {kept}"


def _plot_sink_decay(ablation: AblationResult, out: Path) -> Path:
    from . import plots as _plots

    return _plots.plot_sink_decay(ablation.sink_decay, ablation.base.sink_mass, ablation.pruned.sink_mass, out / "sink_decay.png")
