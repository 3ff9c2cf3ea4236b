"""Expert importance scores for pruning, from the sums that one profiling pass collects.

For routed expert e of a MoE layer, the sums run over the calibration rows r routed to it
(token t chose e among its top-k), with ``g_r`` the routing weight the model multiplies the
expert's output by (after the family's own top-k renormalisation and scaling, as transformers
passes it to the experts) and ``y_r`` the expert's down_proj output (`DownProjStats` holds
them, per layer, merged over batches, ranks and resumed runs):

- ``frequency``: ``|{r}|``, how many tokens routed to e. The usage count of frequency-based
  expert pruning (the "frequency" baseline of REAP, below).
- ``top1``: how many tokens had e as their top-1 choice (largest routing weight; the first
  of equal weights).
- ``weight``: ``sum_r g_r``, the router-weighted frequency.
- ``ean``: ``sum_r g_r * ||y_r||_2``. Expert activation norm (EAN) as a pruning criterion
  comes from Jaiswal et al. 2025, "Finding Fantastic Experts in MoEs: A Unified Study for
  Expert Dropping Strategies and Observations" (arXiv:2504.05586); this is its router-weighted
  form, which REAP's reference code keeps as ``weighted_ean_sum`` next to the unweighted
  ``ean_sum`` (the unweighted sum is not collected here).
- ``reap``: ``(1 / |{r}|) * sum_r g_r * ||y_r||_2``, the REAP saliency (Router-weighted
  Expert Activation Pruning: Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for
  One-Shot MoE compression", arXiv:2510.13999). 0 for an expert that got no token.

REAP's code takes g from the softmax over the router logits (renormalised over the top-k when
the model does); g here is what the model applies, which differs from that only by a
per-layer constant (e.g. DeepSeek-V3's ``routed_scaling_factor``), so rankings within a layer
agree. Scores rank experts within a layer: pruning keeps the highest.
"""

from __future__ import annotations

import math

import torch

from .collector import DownProjStats

CRITERIA = ("reap", "ean", "frequency", "weight", "top1")


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


def scores(stats: DownProjStats, criterion: str) -> torch.Tensor:
    """Importance of each unit of `stats` under `criterion`: ``[n]`` fp64."""
    check_criterion(criterion)
    if criterion == "frequency":
        return stats.rows.double()
    if criterion == "top1":
        return stats.top1.double()
    if criterion == "weight":
        return stats.weight_sum.double()
    if criterion == "ean":
        return stats.norm_sum.double()
    return stats.norm_sum.double() / stats.rows.clamp(min=1).double()


def ranking(stats: DownProjStats, criterion: str) -> list[tuple[int, float]]:
    """``(expert, score)`` of every unit of `stats`, most important first (lower ids first on
    ties; a NaN score, from an overflowed output, ranks above every number)."""
    values = scores(stats, criterion).tolist()
    order = sorted(range(len(values)), key=lambda e: (not math.isnan(values[e]), -values[e] if values[e] == values[e] else 0.0, e))
    return [(e, values[e]) for e in order]
