"""Metric maths: hand-computed cases, input checks, the console table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from erfnet.config import IGNORE_INDEX
from erfnet.evaluation.metrics import ConfusionMatrix, format_table, metrics_from_confusion
from erfnet.labels import CLASS_NAMES

# 4 classes. Class 2 is predicted once on a labelled pixel but never labelled (IoU 0, counts;
# Acc NaN); class 3 is predicted only on an ignored pixel (zero union: NaN, skipped).
TARGET = [0, 0, 0, 1, 1, IGNORE_INDEX, IGNORE_INDEX]
PRED = [0, 0, 1, 1, 2, 2, 3]


def _hand_case() -> ConfusionMatrix:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor(PRED), torch.tensor(TARGET))
    return cm


def test_hand_computed_case():
    r = _hand_case().compute()
    # class 0: I=2, L=3, P=2 -> U=3; class 1: I=1, L=2, P=2 -> U=3; class 2: I=0, L=0, P=1 -> U=1.
    assert r["IoU"][:3] == pytest.approx([200 / 3, 100 / 3, 0.0])
    assert math.isnan(r["IoU"][3])
    assert r["Acc"][:2] == pytest.approx([200 / 3, 50.0])
    assert math.isnan(r["Acc"][2]) and math.isnan(r["Acc"][3])
    assert r["mIoU"] == pytest.approx((200 / 3 + 100 / 3 + 0) / 3)
    assert r["mAcc"] == pytest.approx((200 / 3 + 50) / 2)
    assert r["aAcc"] == pytest.approx(60.0)
    assert r["area_label"] == [3, 2, 0, 0]
    assert r["area_pred"] == [2, 2, 1, 0]


def test_batches_accumulate_like_one_update():
    torch.manual_seed(0)
    n = 5
    target = torch.randint(0, n, (3, 7, 9))
    target[torch.rand(target.shape) < 0.2] = IGNORE_INDEX
    pred = torch.randint(0, n, (3, 7, 9))
    one = ConfusionMatrix(n)
    one.update(pred, target)
    split = ConfusionMatrix(n)
    for i in range(3):
        split.update(pred[i], target[i])
    assert torch.equal(one.mat, split.mat)
    # Against a plain loop over the pixels.
    expected = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != IGNORE_INDEX:
            expected[t, p] += 1
    np.testing.assert_array_equal(one.mat.numpy(), expected)


def test_perfect_prediction_and_empty():
    cm = ConfusionMatrix(3)
    t = torch.tensor([[0, 1], [2, IGNORE_INDEX]])
    cm.update(t.clone().clamp(max=2), t)
    r = cm.compute()
    assert r["mIoU"] == pytest.approx(100.0) and r["aAcc"] == pytest.approx(100.0)
    empty = ConfusionMatrix(3).compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"])


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        ([0, 1], [0, 19], r"labels contain \[19\]"),
        ([0, 1], [0, 254], r"labels contain \[254\]"),
        ([0, 1], [0, -1], r"labels contain \[-1\]"),
        ([0, 19], [1, 0], r"predictions contain \[19\]"),
        ([0, -3], [1, 0], r"predictions contain \[-3\]"),
    ],
)
def test_out_of_range_values_are_errors(pred, target, match):
    cm = ConfusionMatrix(19)
    with pytest.raises(ValueError, match=match):
        cm.update(torch.tensor(pred), torch.tensor(target))
    assert int(cm.mat.sum()) == 0


def test_bad_shapes_and_types():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_metrics_from_confusion_matches_matrix():
    mat = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    r = metrics_from_confusion(mat)
    assert r["IoU"][0] == pytest.approx(5 / (6 + 7 - 5) * 100)
    assert r["IoU"][1] == pytest.approx(3 / (5 + 4 - 3) * 100)
    assert math.isnan(r["IoU"][2])
    assert r["aAcc"] == pytest.approx(8 / 11 * 100)


def test_format_table():
    cm = ConfusionMatrix(19)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    text = format_table(cm.compute(), CLASS_NAMES)
    assert "road" in text and "bicycle" in text
    assert "| road" in text and " 50.00 |" in text  # road IoU 1/2
    assert "nan" in text  # classes that never occur
    assert "66.67" in text  # aAcc 2/3
    with pytest.raises(ValueError, match="class names"):
        format_table(cm.compute(), CLASS_NAMES[:3])


def test_void_predictions_count_as_misses():
    # Two scored classes plus a "void" output (class 2) that is predicted but never labelled.
    cm = ConfusionMatrix(3)
    target = torch.tensor([0, 0, 0, 1, 1, 255])
    pred = torch.tensor([0, 2, 2, 1, 0, 2])
    cm.update(pred, target)
    r = cm.compute(num_scored=2)
    # class 0: I=1, L=3, P=2 -> 1/4; class 1: I=1, L=2, P=1 -> 1/2; void never counts as a hit.
    assert r["IoU"] == pytest.approx([25.0, 50.0])
    assert r["Acc"] == pytest.approx([100 / 3, 50.0])
    assert r["aAcc"] == pytest.approx(40.0)
    assert len(r["area_label"]) == 2
