"""Every model type of the installed transformers that has MoE experts, and how superexperts
handles it: through transformers' ExpertsInterface, through an adapter
(`superexperts.adapters.ADAPTERS`), or refused with the reason (`adapters.REFUSED`).

Read from the transformers sources, not from a list of names: a model family
(``transformers/models/<family>/modeling_*.py``) has MoE experts when one of its classes is
decorated with ``@use_experts_implementation``, is named like an experts/MoE module
(``...Experts``, ``...Expert...``, ``...MoE...``/``...Moe...``, ``...SparseMLP``), or sets
``self.experts`` / ``self.num_experts`` / ``self.num_local_experts`` / ``self.n_routed_experts``
/ ``self.moe_num_experts``. A family in none of the three states is *unclassified*: the
test suite fails on it, so a transformers upgrade cannot drop a family silently.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from . import adapters as _adapters

INTERFACE, ADAPTER, REFUSED, UNCLASSIFIED = "ExpertsInterface", "adapter", "refused", "unclassified"
STATES = (INTERFACE, ADAPTER, REFUSED, UNCLASSIFIED)

_MOE_CLASS_NAME = re.compile(r"Experts?$|Expert[A-Z]|MoE|Moe|SparseMLP")
_MOE_ATTRS = {"experts", "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_DECORATOR = "use_experts_implementation"
_MOE_WORDS = ("xpert", "MoE", "Moe", "SparseMLP")  # every name above holds one


@dataclass(frozen=True)
class Family:
    """One model type with MoE experts: its family (``transformers.models.<family>``), its state
    (`STATES`) and the detail: the experts classes, the adapter's declaration, or why refused."""

    model_type: str
    family: str
    state: str
    detail: str


@dataclass(frozen=True)
class _Scan:
    decorated: tuple[str, ...]  # experts classes dispatched through the ExpertsInterface
    moe: tuple[str, ...]  # every class that looks like an MoE part


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def scan_source(source: str) -> _Scan:
    """The experts classes of one modeling file's source."""
    decorated, moe = [], []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs = {
            t.attr
            for n in ast.walk(node)
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
        }
        is_decorated = any(_decorator_name(d) == _DECORATOR for d in node.decorator_list)
        if is_decorated:
            decorated.append(node.name)
        if is_decorated or _MOE_CLASS_NAME.search(node.name) or attrs & _MOE_ATTRS:
            moe.append(node.name)
    return _Scan(tuple(decorated), tuple(moe))


def _models_dir() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


@functools.lru_cache(maxsize=None)
def scan_family(family: str) -> _Scan:
    """The experts classes of one model family's modeling files (empty: no MoE classes)."""
    decorated: tuple[str, ...] = ()
    moe: tuple[str, ...] = ()
    for path in sorted((_models_dir() / family).glob("modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if not any(word in source for word in _MOE_WORDS):  # parsing every file takes ~15 s
            continue
        scan = scan_source(source)
        decorated, moe = decorated + scan.decorated, moe + scan.moe
    return _Scan(decorated, moe)


def moe_families() -> dict[str, _Scan]:
    """``{family: scan}`` of every transformers model family with MoE classes (a few seconds:
    every modeling file that names experts is parsed)."""
    scans = {d.name: scan_family(d.name) for d in sorted(_models_dir().iterdir()) if d.is_dir()}
    return {family: scan for family, scan in scans.items() if scan.moe}


def _model_types() -> dict[str, list[str]]:
    """``{family: model types}``: the types with a task head (in a ``MODEL_FOR_*`` mapping), or all
    of the family's types when none has one (sub-configs such as ``*_vision`` are left out)."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    with_head = set()
    for name in dir(modeling_auto):
        if name.startswith("MODEL_FOR_") and name.endswith("_MAPPING_NAMES"):
            with_head.update(getattr(modeling_auto, name))
    everything: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        everything.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    return {fam: [t for t in types if t in with_head] or types for fam, types in everything.items()}


def classify(family: str, scan: _Scan) -> tuple[str, str]:
    """(state, detail) of one family."""
    if scan.decorated:
        return INTERFACE, ", ".join(scan.decorated)
    adapters = [a for a in _adapters.ADAPTERS if a.family == family]
    if adapters:
        missing = [a.experts_class for a in adapters if a.experts_class not in scan.moe]
        if missing:
            return UNCLASSIFIED, f"the adapter declares {', '.join(missing)}, which this transformers does not define"
        return ADAPTER, "; ".join(a.describe() for a in adapters)
    if family in _adapters.REFUSED:
        return REFUSED, _adapters.REFUSED[family]
    return UNCLASSIFIED, f"MoE classes {', '.join(scan.moe[:4])} are in no state: add an adapter or a refusal"


def families() -> list[Family]:
    """Every model type with MoE experts, sorted by model type."""
    types = _model_types()
    rows = []
    for family, scan in moe_families().items():
        state, detail = classify(family, scan)
        for model_type in types.get(family, [family]):
            rows.append(Family(model_type, family, state, detail))
    return sorted(rows, key=lambda f: f.model_type)


def unclassified() -> list[Family]:
    return [f for f in families() if f.state == UNCLASSIFIED]


@functools.lru_cache(maxsize=1)
def supported_model_types() -> tuple[str, ...]:
    """Every model type (sub-configs included) of a family profiled through the ExpertsInterface
    or an adapter."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return tuple(sorted(t for t in CONFIG_MAPPING_NAMES if is_supported(t)))


def is_supported(model_type: str) -> bool:
    """Whether `model_type`'s family is profiled through the ExpertsInterface or an adapter
    (reading that family's files only)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    if model_type not in CONFIG_MAPPING_NAMES:
        return False
    family = model_type_to_module_name(model_type)
    scan = scan_family(family)
    return bool(scan.moe) and classify(family, scan)[0] in (INTERFACE, ADAPTER)


def refusal_of(model_type: str) -> str | None:
    """Why a model type's family is refused, or None."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    family = model_type_to_module_name(model_type)
    reason = _adapters.REFUSED.get(family)
    return f"{model_type} ({family}) is not supported: {reason}" if reason else None


def format_table(rows: list[Family], *, markdown: bool = False) -> str:
    """The families as a text table (or a Markdown one), then a count per state."""
    import transformers

    how = {INTERFACE: "supported: ExpertsInterface", ADAPTER: "supported: adapter", REFUSED: "refused",
           UNCLASSIFIED: "UNCLASSIFIED"}
    lines = []
    if markdown:
        lines += ["| model type | family | state | detail |", "|---|---|---|---|"]
        lines += [f"| `{f.model_type}` | `{f.family}` | {how[f.state]} | {f.detail} |" for f in rows]
    else:
        width = max((len(f.model_type) for f in rows), default=10)
        lines += [f"{f.model_type:<{width}}  {how[f.state]:<28}  {f.detail}" for f in rows]
    counts = ", ".join(f"{sum(f.state == s for f in rows)} {s}" for s in STATES if any(f.state == s for f in rows))
    lines += ["", f"transformers {transformers.__version__}: {len(rows)} model types with MoE experts, from "
              f"{len({f.family for f in rows})} model families; model types by state: {counts}"]
    return "\n".join(lines)
