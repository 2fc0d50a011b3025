"""The one output rule and the one atomic writer (erfnet/outputs.py), and what a folder dataset
says about what it reads, each case as a user types it: through the real entry point's
``main`` / ``cli`` in-process, checking that no input changed and that a refusal is one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_cli
import train as train_cli
from erfnet import outputs
from erfnet.checkpoint import save_checkpoint
from erfnet.data.decode import DatasetError
from erfnet.data.folder import FolderDataset, load_spec
from erfnet.evaluation.metrics import format_table
from erfnet.evaluation.reports import MAX_PLOT_CLASSES, write_reports
from erfnet.model import ERFNet
from erfnet.training.process import remove_stale_tmp
from scripts import class_weights, export, predict

SIZE = (32, 64)  # (H, W) of every image here
NAMES = ["road", "car", "sky"]
SPEC = {"names": NAMES, "palette": [[128, 64, 128], [0, 0, 142], [70, 130, 180]]}


def _pair(root: Path, split: str, name: str, value: int = 1, folder: str = "") -> None:
    rng = np.random.default_rng(len(name))
    for kind, array in (
        ("images", rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)),
        ("labels", np.full(SIZE, value, np.uint8)),
    ):
        path = root / kind / split / folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    """A folder dataset: base/classes.json, images/ and labels/ with train and val; and a second
    classes file whose val split lies outside the root (../tvout)."""
    root = tmp_path / "base"
    for split in ("train", "val"):
        _pair(root, split, "s0")
    (root / "classes.json").write_text(json.dumps(SPEC))
    _pair(tmp_path / "tvout", "val", "s0")
    outside = {"train": {"images": "images/train", "labels": "labels/train"}}
    outside["val"] = {"images": "../tvout/images/val", "labels": "../tvout/labels/val"}
    (root / "outside.json").write_text(json.dumps({**SPEC, "splits": outside}))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("outputs_ckpt") / "m.pth"
    save_checkpoint(path, ERFNet(num_classes=3).eval(), meta={**SPEC, "class_names": NAMES})
    return path


def _files(top: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def _refused(main, argv: list[str], capsys) -> str:
    """The one `error:` line ``main(argv)`` stops with; no traceback printed."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    msg = str(info.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert "Traceback" not in capsys.readouterr().err
    return msg


def _eval(base: Path, ckpt: Path, *extra: str, classes: str = "classes.json") -> list[str]:
    return [
        "--checkpoint",
        str(ckpt),
        "--data",
        "folder",
        "--data-root",
        str(base),
        "--classes",
        str(base / classes),
        "--split",
        "val",
        "--scale",
        *map(str, SIZE),
        "--device",
        "cpu",
        "--workers",
        "0",
        *extra,
    ]


def test_outputs_on_inputs_are_refused_before_the_work(base: Path, ckpt: Path, capsys) -> None:
    tvout = base.parent / "tvout"
    before = _files(base.parent)
    cases = [  # (main, argv, what the line says)
        (eval_cli.main, _eval(base, ckpt, "--json", str(base / "labels/val/s0.png")), "inside"),
        (
            eval_cli.main,
            _eval(base, ckpt, "--save-color", str(tvout / "labels/val"), classes="outside.json"),
            "split 'val' labels folder",
        ),
        (eval_cli.main, _eval(base, ckpt, "--json", str(ckpt)), "is the input --checkpoint"),
        (
            class_weights.main,
            [
                str(base),
                "--data",
                "folder",
                "--classes",
                str(base / "classes.json"),
                "--out",
                str(base / "labels/train/s0.png"),
            ],
            "is inside the input",
        ),
        (
            class_weights.main,
            [
                str(base),
                "--data",
                "folder",
                "--classes",
                str(base / "classes.json"),
                "--out",
                str(base / "classes.json"),
            ],
            "is the input --classes",
        ),
        (
            train_cli.cli,
            [
                "--data",
                "folder",
                "--data-root",
                str(base),
                "--classes",
                str(base / "outside.json"),
                "--work-dir",
                str(tvout / "images/val/w"),
            ],
            "is inside the input split 'val' images folder",
        ),
    ]
    for main, argv, expected in cases:
        assert expected in _refused(main, argv, capsys), argv
    assert _files(base.parent) == before  # nothing changed, nothing made
    assert not (tvout / "images/val/w").exists()


def test_export_outputs_collide_or_sit_badly(ckpt: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "v.bin").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--out", "q.onnx", "--report", "q.onnx"], "--report q.onnx is also --out q.onnx"),
        (["--out", "w.xml", "--report", "w.bin"], "the file w.bin written beside --out w.xml"),
        (["--out", "v.xml"], "--out v.xml: the file v.bin written beside it is a folder"),
        (["--out", "a_file/q.onnx"], "'a_file' is a file, not a folder"),
    ]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths, as typed
    try:
        for argv, expected in cases:
            assert expected in _refused(export.main, [str(ckpt), *argv], capsys), argv
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "v.bin"]


def test_reports_replace_planted_links_and_survive_math_names(
    base: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    pytest.importorskip("matplotlib")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "confusion_matrix.npy").symlink_to(victim)
    (out / "w.json").symlink_to(victim)
    spec = {**SPEC, "names": ["$x_$", "$\\frac$", "c"]}  # mathtext fails on both
    (base / "classes.json").write_text(json.dumps(spec))
    argv = _eval(base, ckpt, "--out-dir", str(out), "--json", str(tmp_path / "r.json"))
    assert eval_cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and "not drawn" not in printed.out
    assert "warning: --checkpoint" in printed.err  # names differ from the checkpoint's: said
    assert json.loads((tmp_path / "r.json").read_text())["mIoU"] is not None
    for name in ("confusion_matrix.npy", "confusion_matrix.png", "per_class_iou.png"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    argv = [str(base), "--data", "folder", "--classes", str(base / "classes.json")]
    assert class_weights.main([*argv, "--out", str(out / "w.json"), "--no-progress"]) == 0
    assert not (out / "w.json").is_symlink() and victim.read_text() == "keep me"


def test_a_failing_or_huge_plot_costs_only_the_plot(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    n = MAX_PLOT_CLASSES + 1
    names = [f"c{i}" for i in range(n)]
    written, note = write_reports(tmp_path, np.eye(n, dtype=np.int64), names, [50.0] * n)
    assert "confusion_matrix.png skipped" in note and "\n" not in note
    assert {p.name for p in written} == {
        "confusion_matrix.npy",
        "confusion_matrix.json",
        "per_class_iou.png",
    }
    import matplotlib.figure

    def broken(*args, **kwargs):
        raise RuntimeError("renderer\nbroke")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    written, note = write_reports(tmp_path / "b", np.eye(2, dtype=np.int64), ["a", "b"], [1, 2])
    assert [p.name for p in written] == ["confusion_matrix.npy", "confusion_matrix.json"]
    assert note.count("not drawn") == 2 and "\n" not in note


def _half_then_fail(f) -> None:
    f.write(b"half")
    raise RuntimeError("the writer failed")


def test_the_atomic_writer_and_the_stale_temp_cleaner_agree(tmp_path: Path) -> None:
    target = tmp_path / "args.json"
    stale = outputs.tmp_path(target).name
    assert outputs.TMP_NAME_RE.match(stale), stale
    with pytest.raises(RuntimeError):  # a write that fails leaves no temporary file
        outputs.atomic_write(target, _half_then_fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / stale).write_bytes(b"left by kill -9")
    (tmp_path / "user.tmp").write_bytes(b"not ours")
    assert remove_stale_tmp(tmp_path) == (1, len(b"left by kill -9"))
    assert [p.name for p in tmp_path.iterdir()] == ["user.tmp"]


def test_names_are_plain_text_in_tables_and_classes_files(tmp_path: Path) -> None:
    table = format_table(
        {"IoU": [1.0], "Acc": [2.0], "aAcc": 3.0, "mIoU": 1.0, "mAcc": 2.0},
        ["x\nINFO done: best val mIoU 99.99 \u202e"],
    )
    assert "\\n" in table and "\\u202e" in table and "\u202e" not in table
    assert len(table.splitlines()) == 12  # the name did not add a line
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({**SPEC, "names": ["road", "car\nINFO forged", "sky"]}))
    with pytest.raises(DatasetError, match="control characters") as info:
        load_spec(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"label_map": {"1": 0, "01": 1}}, "names the stored value 1 twice"),
        ({"image_suffix": "png"}, 'with its dot: ".png"'),
    ],
)
def test_classes_file_mistakes_are_one_line(tmp_path: Path, change: dict, expected: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**SPEC, **change}))
    with pytest.raises(DatasetError, match=expected) as info:
        load_spec(path)
    assert "\n" not in str(info.value)


def test_deeply_nested_json_is_one_line(base: Path, capsys) -> None:
    deep = base / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    argv = [str(base), "--data", "folder", "--classes", str(deep), "--out", str(base / "w.json")]
    assert "nested too deeply" in _refused(class_weights.main, argv, capsys)


def test_folder_scan_matches_suffix_case_and_follows_links_once(base: Path) -> None:
    _pair(base, "train", "s1")
    for kind in ("images", "labels"):  # s1.PNG with the suffix ".png"
        os.rename(base / kind / "train/s1.png", base / kind / "train/s1.PNG")
    extra = base.parent / "more"
    _pair(extra, "x", "s2")
    for kind in ("images", "labels"):
        (base / kind / "train" / "linked").symlink_to(extra / kind / "x")
        (base / kind / "train" / "loop").symlink_to(base / kind / "train")  # a loop
    names = sorted(s.name for s in FolderDataset(base, base / "classes.json", "train").samples)
    assert names == ["s0", "s1", "s2"]


def test_predict_skips_only_what_it_wrote(base: Path, ckpt: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    image = base / "images/train/s0.png"
    (photos / "holiday_color.png").write_bytes(image.read_bytes())
    written = predict.main(
        [
            str(photos),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "p"),
            "--scale",
            *map(str, SIZE),
            "--device",
            "cpu",
        ]
    )
    assert sorted(p.name for p in written) == ["holiday_color_blend.png", "holiday_color_color.png"]


def _train(base: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--data",
        "folder",
        "--data-root",
        str(base),
        "--classes",
        str(base / "classes.json"),
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--crop-size",
        *map(str, SIZE),
        "--scale",
        *map(str, SIZE),
        "--val-interval",
        "2",
        "--ckpt-interval",
        "2",
        "--num-vis",
        "0",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
        "--work-dir",
        str(work),
        *extra,
    ]


def test_train_messages_before_a_checkpoint_and_without_labelled_pixels(
    base: Path, tmp_path: Path, capsys
) -> None:
    _pair(base, "train", "s1")
    Image.fromarray(np.full(SIZE, 255, np.uint8)).save(base / "labels/val/s0.png")
    threads = torch.get_num_threads()
    try:
        assert train_cli.cli(_train(base, tmp_path / "w1")) == 0
    finally:
        torch.set_num_threads(threads)
    log = (tmp_path / "w1" / "train.log").read_text()
    assert "best val mIoU n/a" in log and "-1.00" not in log
    Image.fromarray(np.full(SIZE, 7, np.uint8)).save(base / "labels/train/s0.png")
    Image.fromarray(np.full(SIZE, 7, np.uint8)).save(base / "labels/train/s1.png")
    try:
        msg = _refused(train_cli.cli, _train(base, tmp_path / "w2"), capsys)
    finally:
        torch.set_num_threads(threads)
    assert "values [7]" in msg and "--resume" not in msg and "run the same command again" in msg
