"""scripts/class_weights.py: ERFNet's 1 / ln(c + p) and median-frequency weights on a hand-counted
example, written as the file train.py --class-weights reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erfnet.labels import CLASS_NAMES
from erfnet.training.loss import load_class_weights
from scripts import class_weights as script

NAMES = ["road", "car", "sky", "boat"]  # "boat" never occurs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two 2x4 labels. A: road x4, car x2, ignored x2. B: road x2, car x1, sky x5."""
    a = np.array([[0, 0, 0, 0], [1, 1, 255, 255]], dtype=np.uint8)
    b = np.array([[0, 0, 1, 2], [2, 2, 2, 2]], dtype=np.uint8)
    for name, label in (("a", a), ("b", b)):
        (tmp_path / "images/train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "labels/train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / f"images/train/{name}.png")
        Image.fromarray(label).save(tmp_path / f"labels/train/{name}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"names": NAMES, "palette": [[0, 0, 0]] * 4}))
    return tmp_path


def run(root: Path, *extra: str) -> dict:
    out = root / "w.json"
    argv = [str(root), "--data", "folder", "--classes", str(root / "classes.json")]
    assert script.main([*argv, "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads(out.read_text())


def test_erfnet_weights_by_hand(root: Path):
    data = run(root)
    # 14 labelled pixels: road 6, car 3, sky 5, boat 0
    assert data["pixel_counts"] == [6, 3, 5, 0] and data["images"] == 2
    expected = [
        1 / math.log(1.10 + 6 / 14),
        1 / math.log(1.10 + 3 / 14),
        1 / math.log(1.10 + 5 / 14),
        1 / math.log(1.10),
    ]
    assert data["weights"] == pytest.approx(expected, rel=1e-12)
    assert data["names"] == NAMES and data["method"] == "erfnet" and data["c"] == 1.10
    assert load_class_weights(root / "w.json", NAMES) == pytest.approx(expected, rel=1e-12)


def test_median_frequency_weights_by_hand(root: Path):
    data = run(root, "--method", "median")
    # freq = class pixels / labelled pixels of the images containing the class:
    # road 6/14 (A and B: 6 + 8), car 3/14, sky 5/8 (B only); median 6/14
    median = 6 / 14
    expected = [median / (6 / 14), median / (3 / 14), median / (5 / 8), 0.0]
    assert data["weights"] == pytest.approx(expected, rel=1e-12)
    assert data["weights"][:2] == pytest.approx([1.0, 2.0])


def test_cityscapes_and_errors(synthetic_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "cs.json"
    assert script.main([str(synthetic_root), "--out", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["names"] == list(CLASS_NAMES) and len(data["weights"]) == 19
    assert sum(data["pixel_counts"]) > 0
    with pytest.raises(SystemExit) as info:  # a flag error: argparse's usage, exit 2
        script.main([str(tmp_path), "--data", "folder", "--out", str(tmp_path / "x.json")])
    assert info.value.code == 2 and "--data folder needs --classes FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        script.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")])
    message = str(info.value.code)
    assert message.startswith("error: ") and "nowhere' does not exist" in message
