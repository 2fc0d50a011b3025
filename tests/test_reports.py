"""erfnet.evaluation.reports: the raw matrix always; plots with matplotlib, else one clear line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erfnet.evaluation.reports import MATPLOTLIB_HINT, row_normalised, write_reports

MATRIX = np.array([[8, 2, 0, 0], [1, 3, 0, 0], [0, 0, 0, 5]])  # 3 classes + a "void" output
NAMES = ["road", "car", "sky"]


def test_row_normalised_matrix():
    norm = row_normalised(MATRIX)
    np.testing.assert_allclose(norm[0], [0.8, 0.2, 0, 0])
    np.testing.assert_allclose(norm[1], [0.25, 0.75, 0, 0])
    np.testing.assert_allclose(norm[2], [0, 0, 0, 1])
    assert not row_normalised(np.zeros((2, 2))).any()  # no pixels: a zero row, not NaN


def test_reports_with_matplotlib(tmp_path: Path):
    pytest.importorskip("matplotlib")  # an optional extra
    written, note = write_reports(
        tmp_path, MATRIX, NAMES, [100 * 8 / 11, 50.0, math.nan], output_names=[*NAMES, "void"]
    )
    assert note is None
    assert {p.name for p in written} == {
        "confusion_matrix.npy",
        "confusion_matrix.json",
        "confusion_matrix.png",
        "per_class_iou.png",
    }
    assert np.array_equal(np.load(tmp_path / "confusion_matrix.npy"), MATRIX)
    data = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert data["prediction_names"] == [*NAMES, "void"] and data["IoU"]["sky"] is None
    for name in ("confusion_matrix.png", "per_class_iou.png"):
        with Image.open(tmp_path / name) as im:
            assert min(im.size) > 100


def test_reports_without_matplotlib(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written, note = write_reports(tmp_path, MATRIX, NAMES, [72.7, 50.0, math.nan])
    assert note == MATPLOTLIB_HINT and "pip install matplotlib" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion_matrix.json",
        "confusion_matrix.npy",
    ]
    assert [p.name for p in written] == ["confusion_matrix.npy", "confusion_matrix.json"]
