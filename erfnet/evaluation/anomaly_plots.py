"""``scripts/anomaly.py --out-dir``: a heat-map PNG per image and score, and each set's ROC and
PR curves. matplotlib is an optional extra, imported here only, when called."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from erfnet.errors import UserError
from erfnet.evaluation.anomaly_metrics import AnomalyMetrics, Levels, pr_points, roc_points
from erfnet.evaluation.reports import save_figure
from erfnet.evaluation.visualize import save_png

MATPLOTLIB_HINT = "--out-dir writes plots with matplotlib: pip install matplotlib"
MAX_PLOT_POINTS = 4000  # a curve is drawn through at most this many of its points


def require_matplotlib() -> Any:
    """matplotlib.pyplot (files only, no display); UserError naming the pip package."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(MATPLOTLIB_HINT) from None
    return plt


def write_heatmap(path: Path, scores: np.ndarray) -> None:
    """The score map in the inferno colours, stretched from the image's lowest to its highest
    score (bright = anomalous)."""
    plt = require_matplotlib()
    lo, hi = float(scores.min()), float(scores.max())
    unit = (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)
    save_png((plt.get_cmap("inferno")(unit)[..., :3] * 255.0 + 0.5).astype(np.uint8), path)


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= MAX_PLOT_POINTS:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, MAX_PLOT_POINTS).round().astype(np.int64))
    return x[idx], y[idx]


def write_curves(
    out_dir: Path, set_name: str, curves: dict[str, Levels], metrics: dict[str, AnomalyMetrics]
) -> list[Path]:
    """``<set>_roc.png`` and ``<set>_pr.png`` with one line per score; returns the paths."""
    plt = require_matplotlib()
    written = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5.5, 5.0))
        for name, lv in curves.items():
            m = metrics[name]
            if m.auprc is None:
                continue
            if kind == "roc":
                x, y = _thin(*roc_points(lv))
                label = f"{name} (AUROC {100 * m.auroc:.2f}, FPR95 {100 * m.fpr95:.2f})"
            else:
                x, y = _thin(*pr_points(lv))
                label = f"{name} (AuPRC {100 * m.auprc:.2f})"
            ax.plot(x, y, label=label, drawstyle="steps-post" if kind == "pr" else "default")
        if kind == "roc":
            ax.axhline(0.95, color="grey", linewidth=0.5)
            ax.set(xlabel="false-positive rate", ylabel="true-positive rate")
        else:
            ax.set(xlabel="recall", ylabel="precision")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), title=f"{set_name}: {kind.upper()}")
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "upper right")
        fig.tight_layout()
        written.append(save_figure(out_dir / f"{set_name}_{kind}.png", fig, plt))
    return written
