"""The evaluation reports people look at: the confusion matrix and per-class IoU, as files.

``write_reports`` writes the raw matrix (``confusion_matrix.npy`` and ``.json``: rows are labels,
columns predictions, counts of pixels) and, when matplotlib is installed, two PNGs: the
row-normalised matrix with class names (``confusion_matrix.png``) and a per-class IoU bar chart
(``per_class_iou.png``). matplotlib is an optional extra, imported here only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MATPLOTLIB_HINT = "the report plots need matplotlib: pip install matplotlib"


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
    IoU in percent (NaN for classes neither labelled nor predicted). The note says why the PNGs
    are missing when matplotlib is not installed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mat = np.asarray(matrix, dtype=np.int64)
    names = list(class_names)
    cols = list(output_names) if output_names is not None else _column_names(names, mat.shape[1])
    cols = _column_names(cols[: mat.shape[1]], mat.shape[1])
    written = [out / "confusion_matrix.npy", out / "confusion_matrix.json"]
    np.save(written[0], mat)
    data = {
        "rows": "label",
        "columns": "prediction",
        "class_names": names,
        "prediction_names": cols,
        "matrix": mat.tolist(),
        "IoU": {n: (None if math.isnan(v) else v) for n, v in zip(names, iou, strict=True)},
    }
    written[1].write_text(json.dumps(data, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return written, MATPLOTLIB_HINT
    written.append(_plot_confusion(out / "confusion_matrix.png", mat, names, cols, plt))
    written.append(_plot_iou(out / "per_class_iou.png", names, iou, plt))
    return written, None


def _plot_confusion(path: Path, mat: np.ndarray, rows: list[str], cols: list[str], plt) -> Path:
    norm = row_normalised(mat)
    size = max(4.0, 0.35 * max(len(rows), len(cols)) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=7)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_iou(path: Path, names: list[str], iou: Sequence[float], plt) -> Path:
    values = [0.0 if math.isnan(v) else float(v) for v in iou]
    fig, ax = plt.subplots(figsize=(7.0, max(3.0, 0.3 * len(names) + 1.0)))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    ax.invert_yaxis()  # first class on top, as in the table
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    valid = [v for v in iou if not math.isnan(v)]
    miou = sum(valid) / len(valid) if valid else math.nan
    ax.set_title(f"per-class IoU (mIoU {miou:.2f})")
    for i, v in enumerate(iou):
        ax.text(
            min(values[i] + 1.0, 88.0),
            i,
            "n/a" if math.isnan(v) else f"{v:.1f}",
            va="center",
            fontsize=6,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
