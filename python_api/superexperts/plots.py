"""PNG plots of a profile (matplotlib, an optional dependency: ``pip install superexperts-kernels[plot]``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .rules import SuperExpert
from .result import ProfileResult


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install 'superexperts-kernels[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_expert_heatmap(result: ProfileResult, super_experts: list[SuperExpert], path: str | Path) -> Path:
    """Layer x expert heatmap of max |down_proj output| (log color scale), Super Experts circled.
    Shared experts are the rightmost columns, after a white separator line. Overflowed (inf)
    experts are red, above the scale; NaN experts are marked with a black x."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    m = result.expert_matrix()  # NaN also where an expert saw no row
    num_routed = max((s.out_absmax.numel() for s in result.routed.values()), default=0)
    positive = m[(m > 0) & m.isfinite()]
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.08 * m.shape[1] + 2), min(12, 2 + 0.25 * m.shape[0] + 2)))
    if positive.numel():
        norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
        cmap = plt.get_cmap("viridis").with_extremes(over="red")
        im = ax.imshow(torch.where(m > 0, m, float("nan")).numpy(), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="max |down_proj output|", extend="max" if m.isinf().any() else "neither")
    nan_cells = _nan_cells(result, num_routed)
    if nan_cells:
        ax.scatter([c for _, c in nan_cells], [layer for layer, _ in nan_cells], marker="x", color="black", s=30)
    if m.shape[1] > num_routed:
        ax.axvline(num_routed - 0.5, color="white", linewidth=2)
    for se in super_experts:
        col = se.expert if isinstance(se.expert, int) else num_routed + (0 if se.expert == "shared" else int(se.expert.split(":")[1]))
        ax.scatter([col], [se.layer], s=160, facecolors="none", edgecolors="red", linewidths=2)
        ax.annotate(f"{se.layer},{se.expert}", (col, se.layer), color="red", fontsize=8, xytext=(6, -6), textcoords="offset points")
    ax.set_xlabel("expert" + (" (then shared)" if m.shape[1] > num_routed else ""))
    ax.set_ylabel("layer")
    ax.set_title(f"{result.model_type}: max |down_proj output| per expert ({len(super_experts)} Super Experts circled)")
    return _save(fig, plt, path)


def _nan_cells(result: ProfileResult, num_routed: int) -> list[tuple[int, int]]:
    """(layer, column) of the experts of `expert_matrix` that saw rows and have a NaN max."""
    cells = []
    for offset, table in ((0, result.routed), (num_routed, result.shared)):
        for layer, s in table.items():
            cells += [(layer, offset + i) for i in torch.nonzero((s.rows > 0) & s.out_absmax.isnan()).flatten().tolist()]
    return cells


def plot_massive_activations(result: ProfileResult, path: str | Path) -> Path:
    """Per decoder layer: max |hidden state| of its output and the mean |hidden state| (log scale)."""
    plt = _pyplot()
    rows = result.massive_activations()
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, [r["max"] for r in rows], marker="o", label="max |h|")
    ax.plot(layers, [r["mean_abs"] for r in rows], marker=".", label="mean |h|")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|hidden state| of the layer output")
    ax.set_title(f"{result.model_type}: massive activations")
    ax.legend()
    return _save(fig, plt, path)


def plot_sink_decay(sink_decay: dict[int, float], before: dict[int, torch.Tensor], after: dict[int, torch.Tensor], path: str | Path) -> Path:
    """Per layer D_sink (bars) and the head-mean sink mass before and after pruning (lines)."""
    plt = _pyplot()
    layers = sorted(sink_decay)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.bar(layers, [0.0 if math.isnan(sink_decay[k]) else 100 * sink_decay[k] for k in layers], color="tab:red")
    ax1.set_ylabel("D_sink (%)")
    ax1.set_title("attention-sink decay after pruning")
    ax2.plot(layers, [float(before[k].mean()) for k in layers], marker="o", label="before")
    ax2.plot(layers, [float(after[k].mean()) for k in layers], marker="o", label="after pruning")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean sink mass")
    ax2.legend()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
