"""Semantic segmentation metrics with mmsegmentation's semantics (IoU, Acc, mIoU, mAcc, aAcc).

One ``num_classes x num_classes`` confusion matrix (rows: label, columns: prediction) is summed
over the whole dataset, on the device, with one ``bincount`` per batch. Per-class IoU is
``I / (P + L - I)`` and Acc is ``I / L``; a class with zero union (or, for Acc, no labelled pixel)
is NaN and skipped by the means, while a class predicted but absent from the labels has IoU 0 and
counts. These are also the official Cityscapes evaluator's class IoUs (its false positives on
ignored ground truth are dropped here with the ignored pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from erfnet.config import IGNORE_INDEX
from erfnet.outputs import printable


class ConfusionMatrix:
    """Dataset-wide confusion matrix accumulated on ``device``.

    ``update(pred, target)`` takes integer tensors of the same shape (any batch layout); pixels
    whose target is ``ignore_index`` are dropped. Any other target or prediction outside
    ``0 .. num_classes - 1`` is an error (it would otherwise silently alias another cell).
    """

    def __init__(
        self, num_classes: int, device: str | torch.device = "cpu", ignore_index: int = IGNORE_INDEX
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``pred`` and ``target`` hold class indices, same shape."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("ConfusionMatrix.update expects integer class maps, not scores")
        n = self.num_classes
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        # Row/column ``n`` collects out-of-range values, so that one bincount both counts and
        # validates: a label of 19 cannot alias class 0 of the next row.
        stride = n + 1
        idx = target.clamp(max=n) * stride + pred.clamp(max=n)
        try:
            counts = torch.bincount(idx, minlength=stride * stride)
        except RuntimeError as e:  # negative values
            raise ValueError(self._range_message(pred, target)) from e
        counts = counts.view(stride, stride)
        if bool(counts[n].any() | counts[:, n].any()):
            raise ValueError(self._range_message(pred, target))
        self.mat += counts[:n, :n]

    def _range_message(self, pred: torch.Tensor, target: torch.Tensor) -> str:
        n = self.num_classes
        bad_t = torch.unique(target[(target < 0) | (target >= n)]).tolist()[:10]
        bad_p = torch.unique(pred[(pred < 0) | (pred >= n)]).tolist()[:10]
        parts = []
        if bad_t:
            parts.append(
                f"labels contain {bad_t} (expected 0..{n - 1} or {self.ignore_index} = ignore)"
            )
        if bad_p:
            parts.append(f"predictions contain {bad_p} (expected 0..{n - 1})")
        return "; ".join(parts) or "values out of range"

    def compute(self, num_scored: int | None = None) -> dict:
        """Metrics in percent, unrounded: IoU/Acc per class (lists, NaN where undefined), mIoU,
        mAcc, aAcc, plus the raw per-class areas.

        ``num_scored`` < ``num_classes`` scores only the first classes; predictions of the others
        (a "void" output, as in erfnet_pytorch's 20-class model) count as misses.
        """
        mat = self.mat.detach().to("cpu", torch.float64)
        return metrics_from_confusion(mat[: num_scored or self.num_classes])


def metrics_from_confusion(mat: torch.Tensor) -> dict:
    """mmseg's metrics from a label x prediction confusion matrix (any numeric dtype).

    The matrix may have more prediction columns than label rows: those extra predicted classes
    are never right, so they only add to the labels' areas (false negatives).
    """
    mat = torch.as_tensor(mat, dtype=torch.float64)
    n = mat.shape[0]
    intersect = mat[:, :n].diagonal()
    area_label = mat.sum(1)
    area_pred = mat[:, :n].sum(0)
    union = area_label + area_pred - intersect
    # 0 / 0 -> NaN marks a class that neither occurs nor is predicted (IoU) / is not labelled (Acc).
    iou = intersect / union * 100.0
    acc = intersect / area_label * 100.0
    total = float(area_label.sum())
    return {
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(intersect.sum()) / total * 100.0 if total > 0 else math.nan,
        "area_intersect": intersect.long().tolist(),
        "area_union": union.long().tolist(),
        "area_label": area_label.long().tolist(),
        "area_pred": area_pred.long().tolist(),
    }


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else math.nan


def _fmt(v: float) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:.2f}"


def format_table(results: dict, class_names: Sequence[str] | None = None) -> str:
    """mmseg-style console table: per-class IoU and Acc, then the summary (two decimals)."""
    iou, acc = results["IoU"], results["Acc"]
    # Names escaped: a control character in a class name cannot forge a line of train.log.
    given = class_names if class_names is not None else [str(i) for i in range(len(iou))]
    names = [printable(n) for n in given]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for {len(iou)} classes")
    w = max(8, *(len(n) for n in names))
    sep = f"+{'-' * (w + 2)}+{'-' * 8}+{'-' * 8}+"
    lines = ["per class results:", sep, f"| {'Class':<{w}} | {'IoU':>6} | {'Acc':>6} |", sep]
    for n, i, a in zip(names, iou, acc, strict=True):
        lines.append(f"| {n:<{w}} | {_fmt(i):>6} | {_fmt(a):>6} |")
    keys, ssep = ("aAcc", "mIoU", "mAcc"), f"+{'-' * 8}" * 3 + "+"
    head = " | ".join(f"{k:>6}" for k in keys)
    values = " | ".join(f"{_fmt(results[k]):>6}" for k in keys)
    lines += [sep, "Summary:", ssep, f"| {head} |", ssep, f"| {values} |", ssep]
    return "\n".join(lines)
