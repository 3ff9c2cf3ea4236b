"""Super Expert detection rules over the per-expert down_proj output maxima ``a[l, e]``.

Candidates are routed and shared experts; dense MLPs are not. Every rule pools the
candidate values of the layers in ``L`` (default: the first ``round(0.75 * num_layers)``
decoder layers, as the authors' code does) into ``A`` and keeps the candidates in ``L``
whose value passes its threshold:

- ``paper`` (arXiv 2507.23279, Eq. 6): ``a > P99.5(A)`` and ``a > max(A) // 10`` (floor
  division, as the authors' code computes ``np.max(A) // 10``);
- ``std``: ``a > mean(A) + k * std(A)``;
- ``quantile``: ``a > Pq(A)``;
- ``mean_multiple``: ``a > k * mean(A)``.

Percentiles interpolate linearly between order statistics (numpy's default).

The pool ``A``: the authors' tool pins transformers 4.51.3, whose Qwen3-MoE, Qwen2-MoE and
Mixtral blocks call every expert, with zero rows when it got no token, and their hook
records 0 for it; so an expert that saw no calibration token is in ``A`` with ``a = 0``.
The candidates passed to `detect` follow that by default (`ProfileResult.candidates`);
``Rule(exclude_unrouted=True)`` leaves unrouted experts out of ``A``.

Non-finite values are findings, never dropped: the thresholds come from the finite values of
``A``, and a candidate whose ``a`` is ``inf`` (its down_proj output overflowed the run's dtype)
or NaN (``inf - inf`` or ``inf * 0`` in its output) is a Super Expert under every rule, ranked
before the finite ones (overflowed first, then NaN, each in layer order: a NaN in a later layer
often follows from an earlier overflow), marked in `SuperExpert.status`, with a warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

RULES = ("paper", "std", "quantile", "mean_multiple")
# SuperExpert.status: what its value is.
FINITE, OVERFLOW, NAN = "finite", "overflow", "nan"


@dataclass(frozen=True)
class Rule:
    """A detection rule. `k` is the std multiple (std) or mean multiple (mean_multiple);
    `quantile` the percentile in [0, 100] (paper, quantile); `max_ratio` the paper's 10;
    `layer_fraction` / `layers` choose L (explicit `layers` win); `exclude_unrouted` leaves
    experts that saw no calibration token out of the pool A (default: in A with a = 0)."""

    name: str = "paper"
    quantile: float = 99.5
    max_ratio: float = 10.0
    k: float | None = None
    layer_fraction: float = 0.75
    layers: tuple[int, ...] | None = None
    exclude_unrouted: bool = False

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.name!r}")
        if not 0.0 <= self.quantile <= 100.0:
            raise ValueError(f"quantile must be in [0, 100], got {self.quantile}")
        if not 0.0 < self.layer_fraction <= 1.0:
            raise ValueError(f"layer_fraction must be in (0, 1], got {self.layer_fraction}")
        if not self.max_ratio > 0.0:
            raise ValueError(f"max_ratio must be > 0 (the paper rule keeps a > max(A) / max_ratio), got {self.max_ratio}")
        if self.k is not None and not self.k >= 0.0:
            raise ValueError(f"k must be >= 0, got {self.k}")

    def layer_set(self, num_layers: int) -> set[int]:
        """The candidate layers L; explicit `layers` outside ``0 .. num_layers - 1`` raise."""
        if self.layers is not None:
            outside = sorted(layer for layer in self.layers if not 0 <= layer < num_layers)
            if outside:
                raise ValueError(f"layers {outside} are outside the model's {num_layers} decoder layers (0-{num_layers - 1})")
            return set(self.layers)
        return set(range(round(self.layer_fraction * num_layers)))

    def describe(self) -> str:
        if self.name == "paper":
            return f"a > P{self.quantile:g}(A) and a > max(A)//{self.max_ratio:g}"
        if self.name == "std":
            return f"a > mean(A) + {self.k_value:g}*std(A)"
        if self.name == "quantile":
            return f"a > P{self.quantile:g}(A)"
        return f"a > {self.k_value:g}*mean(A)"

    @property
    def k_value(self) -> float:
        if self.k is not None:
            return self.k
        return 3.0 if self.name == "std" else 10.0


@dataclass(frozen=True)
class SuperExpert:
    """One detected Super Expert. expert: routed expert id, or "shared" (or "shared:i").
    status: "finite", "overflow" (value inf: its output overflowed the run's dtype) or "nan"."""

    layer: int
    expert: int | str
    value: float
    rank: int
    status: str = FINITE

    def to_dict(self) -> dict:
        return asdict(self)


def threshold(values: torch.Tensor, rule: Rule) -> float:
    """The value a candidate must exceed under `rule`, given the pooled values ``A`` (1-D);
    non-finite values are left out of ``A`` (inf when no finite value is left)."""
    a = values.double()
    a = a[a.isfinite()]
    if a.numel() == 0:
        return math.inf
    if rule.name == "paper":
        return max(float(torch.quantile(a, rule.quantile / 100.0)), float(a.max()) // rule.max_ratio)
    if rule.name == "quantile":
        return float(torch.quantile(a, rule.quantile / 100.0))
    if rule.name == "std":
        return float(a.mean() + rule.k_value * a.std(unbiased=False))
    return float(rule.k_value * a.mean())


def detect(candidates: list[tuple[int, int | str, float]], num_layers: int, rule: Rule | None = None) -> list[SuperExpert]:
    """Apply `rule` to candidates ``(layer, expert, a)``; return the Super Experts: the
    non-finite ones first (overflowed, then NaN; warned about), then the others largest first."""
    rule = rule or Rule()
    layers = rule.layer_set(num_layers)
    pool = [(layer, expert, float(value)) for layer, expert, value in candidates if layer in layers]
    if not pool:
        return []
    by_layer = sorted(pool, key=lambda c: c[0])
    overflowed = [(c, OVERFLOW) for c in by_layer if math.isinf(c[2])]
    nans = [(c, NAN) for c in by_layer if math.isnan(c[2])]
    cut = threshold(torch.tensor([v for _, _, v in pool]), rule)
    finite = sorted((c for c in pool if math.isfinite(c[2]) and c[2] > cut), key=lambda c: -c[2])
    _warn_non_finite(overflowed, nans)
    found = overflowed + nans + [(c, FINITE) for c in finite]
    return [
        SuperExpert(layer, expert, value, rank, status)
        for rank, ((layer, expert, value), status) in enumerate(found, 1)
    ]


def _warn_non_finite(overflowed: list, nans: list) -> None:
    def where(found):
        shown = ", ".join(f"layer {layer} expert {expert}" for (layer, expert, _), _ in found[:8])
        return shown + (f" and {len(found) - 8} more" if len(found) > 8 else "")

    if overflowed:
        warnings.warn(
            f"down_proj output overflowed (inf) in {where(overflowed)}: reported as Super Experts first; "
            "profile in a wider dtype (--dtype float32) to measure their values",
            RuntimeWarning,
            stacklevel=3,
        )
    if nans:
        warnings.warn(
            f"down_proj output max is NaN in {where(nans)}: reported as Super Experts (status 'nan'); "
            "a NaN often follows an overflow in an earlier layer: profile in a wider dtype (--dtype float32)",
            RuntimeWarning,
            stacklevel=3,
        )
