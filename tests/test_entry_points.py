"""Every entry point under the one error convention (erfnet/errors.py): a flag bad in itself
exits 2 with argparse's usage and one error line; a bad file exits 1 with one ``error:`` line and
no traceback. Run in-process: what ``SystemExit`` carries is what Python prints on the way out."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest

import eval as eval_script
import train

SCRIPTS = ("benchmark", "class_weights", "convert_checkpoint", "export")
SCRIPTS += ("make_synthetic_cityscapes", "predict", "prepare_cityscapes", "video")


def entry(name: str) -> Callable[[list[str]], object]:
    if name == "train":
        return train.cli
    if name == "eval":
        return eval_script.main
    if name == "video":
        pytest.importorskip(
            "av", reason="scripts/video.py needs the optional PyAV (pip install av)"
        )
    return importlib.import_module(f"scripts.{name}").main


def outcome(main: Callable, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list]:
    """(exit status, the lines on stderr) as the shell would see them."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # Python prints it to stderr and exits 1
        err, code = err + code + "\n", 1
    return code, err.strip().splitlines()


def bad_flags(tmp: Path) -> dict[str, list[str]]:
    """A flag bad in itself, per entry point (values, not unknown names: the checks' own)."""
    ckpt, out = str(tmp / "c.pth"), str(tmp / "out")
    return {
        "train": ["--threads", "0"],
        "eval": ["--checkpoint", ckpt, "--threads", "0"],
        "benchmark": ["--batch", "0"],
        "class_weights": [str(tmp), "--data", "folder"],
        "convert_checkpoint": ["--from", "nothing", ckpt, out],
        "export": [ckpt, "--out", str(tmp / "m.onnx"), "--opset", "99"],
        "make_synthetic_cityscapes": ["--root", out, "--train", "0", "--val", "0"],
        "predict": [str(tmp), "--checkpoint", ckpt, "--out", out, "--alpha", "2"],
        "prepare_cityscapes": ["--workers", "0"],
        "video": [str(tmp), "--checkpoint", ckpt, "--every", "0"],
    }


def bad_files(tmp: Path) -> dict[str, list[str]]:
    """A missing or wrong input file, per entry point."""
    missing, out = str(tmp / "missing.pth"), str(tmp / "out")
    (tmp / "a_file").write_text("not a folder")
    return {
        "train": ["--data", "synthetic", "--work-dir", out, "--resume", missing],
        "eval": ["--checkpoint", missing],
        "benchmark": ["--checkpoint", missing, "--device", "cpu"],
        "class_weights": [str(tmp / "no_dataset")],
        "convert_checkpoint": ["--from", "mmseg", missing, str(tmp / "o.pth")],
        "export": [missing, "--out", str(tmp / "m.onnx")],
        "make_synthetic_cityscapes": ["--root", str(tmp / "a_file")],
        "predict": [str(tmp / "missing.png"), "--checkpoint", missing, "--out", out],
        "prepare_cityscapes": ["--root", str(tmp / "no_dataset")],
        "video": [str(tmp / "missing.mp4"), "--checkpoint", missing],
    }


NAMES = ("train", "eval", *SCRIPTS)


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_flag_exits_2_with_usage_and_one_error_line(name, tmp_path, capsys) -> None:
    code, lines = outcome(entry(name), bad_flags(tmp_path)[name], capsys)
    assert code == 2, lines
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert lines[0].startswith("usage:") and "Traceback" not in "\n".join(lines)


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_file_exits_1_with_one_error_line(name, tmp_path, capsys) -> None:
    code, lines = outcome(entry(name), bad_files(tmp_path)[name], capsys)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
