"""Exact pixel-level anomaly metrics: AuPRC, FPR at 95 % TPR, AUROC (numpy only).

The definitions are scikit-learn's, which the road-anomaly literature uses (through the
``ood_metrics`` package for FPR95), computed without binning and with ties treated as
scikit-learn treats them (all pixels of one score value form one threshold):

- AuPRC = ``average_precision_score(labels, scores)``, anomaly positive: the sum over thresholds
  of (recall step) x precision.
- FPR95 = ``np.interp(0.95, tpr, fpr)`` over ``roc_curve(labels, scores)``: the ROC is linearly
  interpolated at 95 % TPR (``ood_metrics.fpr_at_95_tpr``). ``fpr95_step`` is the other convention
  found in the field: the FPR at the first threshold whose TPR reaches 95 % (the SMIYC benchmark
  code does this on binned thresholds; here on the exact ones).
- AUROC = ``roc_auc_score``: the trapezoid area, equal to P(anomaly score > known score) plus
  half of P(equal), which is how it is computed here.

Only the anomaly scores (positives, few) and the known scores (negatives, most pixels) are needed,
each as a float array. The negatives are sorted in place and never copied, so the memory is the
arrays themselves plus a few arrays of the *distinct positive* scores; every ROC / PR point that
matters is one of two points per distinct positive score (see ``roc_points``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TPR_TARGET = 0.95


@dataclass(frozen=True)
class Levels:
    """Per distinct anomaly score v, highest first: how many anomaly pixels score v
    (``count``), score >= v (``tp``), and how many known pixels score >= v (``fp_ge``) and > v
    (``fp_gt``). ``positives`` / ``negatives``: the totals."""

    values: np.ndarray
    count: np.ndarray
    tp: np.ndarray
    fp_ge: np.ndarray
    fp_gt: np.ndarray
    positives: int
    negatives: int


@dataclass(frozen=True)
class AnomalyMetrics:
    """Fractions in [0, 1] (None when a set has no anomaly or no known pixel)."""

    auprc: float | None
    fpr95: float | None
    fpr95_step: float | None
    auroc: float | None
    anomaly_pixels: int
    known_pixels: int


def levels(positives: np.ndarray, negatives_sorted: np.ndarray) -> Levels:
    """``Levels`` of anomaly scores ``positives`` (any order) against known scores
    ``negatives_sorted`` (ascending; see ``sort_in_place``)."""
    pos = np.sort(np.asarray(positives).ravel())[::-1]
    neg = negatives_sorted
    first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]]) if pos.size else np.zeros(0, int)
    values = pos[first]
    count = np.diff(np.r_[first, pos.size])
    tp = np.cumsum(count)
    n = neg.size
    fp_ge = n - np.searchsorted(neg, values, side="left")
    fp_gt = n - np.searchsorted(neg, values, side="right")
    return Levels(values, count, tp, fp_ge, fp_gt, int(pos.size), int(n))


def sort_in_place(scores: np.ndarray) -> np.ndarray:
    """Sort a 1-D score array ascending without a copy; returns it."""
    scores.sort(kind="quicksort")
    return scores


def roc_points(lv: Levels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the exact ROC, from (0, 0) to (1, 1), every corner of the curve included.

    Between two distinct anomaly scores the curve only moves right (known pixels alone pass the
    threshold), so it is fully described by two points per distinct anomaly score v: the corner
    just before v (known pixels above v, anomaly pixels above v) and the point at v. Lying on the
    same segments as scikit-learn's ``roc_curve`` points, with the last point of every flat run
    kept, ``np.interp`` over them returns the same FPR95.
    """
    tp_before = np.r_[0, lv.tp[:-1]]
    fps = np.empty(2 * lv.values.size + 2, np.float64)
    tps = np.empty_like(fps)
    fps[0], tps[0] = 0, 0
    fps[1:-1:2], tps[1:-1:2] = lv.fp_gt, tp_before
    fps[2:-1:2], tps[2:-1:2] = lv.fp_ge, lv.tp
    fps[-1], tps[-1] = lv.negatives, lv.positives
    return fps / max(lv.negatives, 1), tps / max(lv.positives, 1)


def pr_points(lv: Levels) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct anomaly score, highest score first: the points
    whose recall steps make the AuPRC."""
    return lv.tp / max(lv.positives, 1), lv.tp / (lv.tp + lv.fp_ge)


def metrics_from_levels(lv: Levels) -> AnomalyMetrics:
    """AuPRC, FPR95 (both conventions) and AUROC of ``lv``."""
    p, n = lv.positives, lv.negatives
    if p == 0 or n == 0:
        return AnomalyMetrics(None, None, None, None, p, n)
    precision = lv.tp / (lv.tp + lv.fp_ge)
    auprc = float(np.sum(lv.count * precision) / p)
    fpr, tpr = roc_points(lv)
    fpr95 = float(np.interp(TPR_TARGET, tpr, fpr))
    reached = np.flatnonzero(lv.tp >= TPR_TARGET * p)
    fpr95_step = float(lv.fp_ge[reached[0]] / n)
    # Mann-Whitney: known pixels below each anomaly score, plus half of those equal to it.
    below = (n - lv.fp_ge).astype(np.float64)
    equal = (lv.fp_ge - lv.fp_gt).astype(np.float64)
    auroc = float(np.sum(lv.count * (below + 0.5 * equal)) / (float(p) * float(n)))
    return AnomalyMetrics(auprc, fpr95, fpr95_step, auroc, p, n)


def split_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly scores, known scores sorted ascending) from per-pixel scores and labels
    (true / 1 = anomaly); a copy each."""
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    return scores[labels], sort_in_place(scores[~labels])


def anomaly_metrics(scores: np.ndarray, labels: np.ndarray) -> AnomalyMetrics:
    """All metrics of per-pixel ``scores`` (higher = more anomalous) against boolean
    ``labels`` (anomaly = True)."""
    return metrics_from_levels(levels(*split_scores(scores, labels)))
