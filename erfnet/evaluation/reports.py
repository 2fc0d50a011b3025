"""The evaluation reports people look at: the confusion matrix and per-class IoU, as files.

``write_reports`` writes the raw matrix (``confusion_matrix.npy`` and ``.json``: rows are labels,
columns predictions, counts of pixels) and, when matplotlib is installed, two PNGs: the
row-normalised matrix with class names (``confusion_matrix.png``) and a per-class IoU bar chart
(``per_class_iou.png``). matplotlib is an optional extra, imported here only.

Every file goes through the one atomic writer (a link planted in the folder is replaced, not
written through); the matrix files come first, and a plot that fails (or a confusion matrix of
more than ``MAX_PLOT_CLASSES`` classes, which would take minutes and gigabytes to draw) costs
only that plot and a note. Class names are drawn as plain text (no mathtext: "$x$" stays "$x$"),
control characters escaped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from erfnet.errors import one_line
from erfnet.outputs import atomic_write, atomic_write_text, printable

MATPLOTLIB_HINT = "the report plots need matplotlib: pip install matplotlib"
REPORT_FILES = (
    "confusion_matrix.npy",
    "confusion_matrix.json",
    "confusion_matrix.png",
    "per_class_iou.png",
)
# Above this many classes the confusion-matrix plot is skipped (the .npy / .json are written):
# a 255-class one is a 9275x9175 image that takes over a minute and gigabytes to draw.
MAX_PLOT_CLASSES = 60


def _column_names(class_names: Sequence[str], columns: int) -> list[str]:
    """Prediction columns: the classes, then extra outputs (erfnet_pytorch's "void")."""
    names = list(class_names)
    return names + [f"output {i}" for i in range(len(names), columns)]


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each label row divided by its pixel count (a row without pixels stays 0)."""
    mat = np.asarray(matrix, dtype=np.float64)
    rows = mat.sum(axis=1, keepdims=True)
    return np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)


def write_reports(
    out_dir: str | Path,
    matrix: np.ndarray,
    class_names: Sequence[str],
    iou: Sequence[float],
    *,
    output_names: Sequence[str] | None = None,
) -> tuple[list[Path], str | None]:
    """Write the report files into ``out_dir``; returns (paths written, a note or None).

    ``matrix`` is the label x prediction pixel count matrix [C, M] (M >= C), ``iou`` the per-class
    IoU in percent (NaN for classes neither labelled nor predicted). The note says why a PNG is
    missing (no matplotlib, too many classes, a failed plot).
    """
    out = Path(out_dir)
    mat = np.asarray(matrix, dtype=np.int64)
    names = list(class_names)
    given = output_names if output_names is not None else names
    cols = _column_names(list(given)[: mat.shape[1]], mat.shape[1])
    written = [out / "confusion_matrix.npy", out / "confusion_matrix.json"]
    atomic_write(written[0], lambda f: np.save(f, mat))
    data = {
        "rows": "label",
        "columns": "prediction",
        "class_names": names,
        "prediction_names": cols,
        "matrix": mat.tolist(),
        "IoU": {n: (None if math.isnan(v) else v) for n, v in zip(names, iou, strict=True)},
    }
    atomic_write_text(written[1], json.dumps(data, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return written, MATPLOTLIB_HINT
    shown_rows, shown_cols = [printable(n) for n in names], [printable(n) for n in cols]
    notes = []
    plots = [("per_class_iou.png", _plot_iou, (shown_rows, iou))]
    if len(names) <= MAX_PLOT_CLASSES:
        plots.insert(0, ("confusion_matrix.png", _plot_confusion, (mat, shown_rows, shown_cols)))
    else:
        notes.append(
            f"confusion_matrix.png skipped: {len(names)} classes (drawn up to"
            f" {MAX_PLOT_CLASSES}; the matrix is in confusion_matrix.npy / .json)"
        )
    for name, plot, plot_args in plots:
        try:
            written.append(save_figure(out / name, plot(*plot_args, plt), plt))
        except Exception as e:  # a plot is an extra: the matrix files above are written
            notes.append(f"{name} not drawn ({type(e).__name__}: {one_line(e)})")
    return written, "; ".join(notes) or None


def save_figure(path: Path, fig, plt) -> Path:
    """``fig`` as a PNG by the one atomic writer, then closed."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def _plot_confusion(mat: np.ndarray, rows: list[str], cols: list[str], plt):
    norm = row_normalised(mat)
    size = max(4.0, 0.35 * max(len(rows), len(cols)) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=90, fontsize=7, parse_math=False)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=7, parse_math=False)
    ax.set_xlabel("prediction")
    ax.set_ylabel("label")
    ax.set_title("confusion matrix (each label row sums to 1)")
    if len(rows) <= 25:  # numbers stay legible up to about this many classes
        for i in range(norm.shape[0]):
            for j in range(norm.shape[1]):
                if norm[i, j] >= 0.005:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def _plot_iou(names: list[str], iou: Sequence[float], plt):
    values = [0.0 if math.isnan(v) else float(v) for v in iou]
    fig, ax = plt.subplots(figsize=(7.0, max(3.0, 0.3 * len(names) + 1.0)))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), labels=names, fontsize=7, parse_math=False)
    ax.invert_yaxis()  # first class on top, as in the table
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    valid = [v for v in iou if not math.isnan(v)]
    miou = sum(valid) / len(valid) if valid else math.nan
    ax.set_title(f"per-class IoU (mIoU {miou:.2f})")
    for i, v in enumerate(iou):
        label = "n/a" if math.isnan(v) else f"{v:.1f}"
        ax.text(min(values[i] + 1.0, 88.0), i, label, va="center", fontsize=6)
    fig.tight_layout()
    return fig
