"""The data command-line scripts, run as a user would (subprocess; some flag errors in-process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import make_synthetic_cityscapes

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_synthetic_then_prepare(tmp_path: Path):
    root = tmp_path / "syn"
    r = run(
        "make_synthetic_cityscapes.py",
        "--root",
        str(root),
        "--train",
        "3",
        "--val",
        "1",
        "--test",
        "1",
        "--size",
        "24",
        "40",
        "--seed",
        "7",
    )
    assert r.returncode == 0, r.stderr
    assert "3 train / 1 val / 1 test images of 24x40 (HxW)" in r.stdout
    images = sorted(root.glob("leftImg8bit/*/*/*_leftImg8bit.png"))
    labels = sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    assert [p.parts[-3] for p in images] == ["test", "train", "train", "train", "val"]
    assert len(labels) == 5
    assert Image.open(images[0]).size == (40, 24) and Image.open(images[0]).mode == "RGB"
    assert Image.open(labels[0]).mode == "L"

    r = run("prepare_cityscapes.py", "--root", str(root), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote 5, up to date 0, failed 0" in r.stdout
    prepared = sorted(root.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(prepared) == 5
    values = set(np.unique(np.asarray(Image.open(prepared[1]))).tolist())
    assert values <= set(range(19)) | {255} and len(values) > 3


def test_make_synthetic_rejects_a_bad_size(tmp_path: Path, capsys):
    r = run("make_synthetic_cityscapes.py", "--root", str(tmp_path / "x"), "--size", "64by", "32")
    assert r.returncode == 2
    assert "--size" in r.stderr and "a height and a width" in r.stderr and "64by" in r.stderr
    # The other sizes through the same parser in this process (a subprocess costs seconds).
    # The old WxH form is one value: refused, not read as some other size.
    for size, message in ((["64x32"], "expected 2 arguments"), (["4", "64"], "'4'")):
        with pytest.raises(SystemExit) as exc:
            make_synthetic_cityscapes.main(["--root", str(tmp_path / "x"), "--size", *size])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "--size" in err and message in err
    assert not (tmp_path / "x").exists()


def test_prepare_reports_a_wrong_root(tmp_path: Path):
    (tmp_path / "leftImg8bit").mkdir()
    r = run("prepare_cityscapes.py", "--root", str(tmp_path / "leftImg8bit"), "--quiet")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert f"use its parent '{tmp_path}'" in r.stderr


def test_make_synthetic_refuses_a_non_empty_root(tmp_path: Path):
    real = tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real Cityscapes image")
    r = run(
        "make_synthetic_cityscapes.py",
        "--root",
        str(tmp_path),
        "--train",
        "1",
        "--val",
        "0",
        "--size",
        "8",
        "16",
    )
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not empty" in r.stderr
    assert real.read_bytes() == b"a real Cityscapes image"
