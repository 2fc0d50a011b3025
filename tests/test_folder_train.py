"""A 5-class folder dataset end to end: train.py (--init-from a 19-class checkpoint), eval.py with
the dataset's names and the report files, predict.py with its palette, the checkpoint's meta."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import train as train_cli
from erfnet import load_model
from erfnet.checkpoint import save_checkpoint
from erfnet.config import MEAN_RGB, STD_RGB
from erfnet.data.cityscapes import load_image
from erfnet.data.folder import FolderDataset
from erfnet.data.transforms import EvalTransform
from erfnet.deploy.exported import load_exported
from erfnet.evaluation.cityscapes_submission import SubmissionWriter
from erfnet.evaluation.inference import TestSettings, predict
from erfnet.model import ERFNet
from scripts import export
from scripts import predict as predict_cli

SIZE = (32, 48)  # (H, W)
NAMES = ["background", "red box", "green box", "blue box", "yellow box"]
PALETTE = [[0, 0, 0], [220, 20, 60], [0, 160, 0], [30, 60, 200], [230, 200, 0]]
STORED = [10, 20, 30, 40, 50]  # stored label value of each class; 0 = not labelled


def make_shapes(root: Path, split: str, count: int, seed: int) -> None:
    """Noisy JPEGs with one coloured box per class; labels store 10..50, a 0 border."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    for i in range(count):
        rgb = rng.integers(60, 120, size=(h, w, 3)).astype(np.uint8)
        label = np.full((h, w), STORED[0], dtype=np.uint8)
        for cls in range(1, len(NAMES)):
            y, x = rng.integers(0, h - 10), rng.integers(0, w - 12)
            rgb[y : y + 10, x : x + 12] = PALETTE[cls]
            label[y : y + 10, x : x + 12] = STORED[cls]
        label[:2] = 0
        (root / "img" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "img" / split / f"shape_{i:02d}.jpg", quality=95)
        Image.fromarray(label).save(root / "ann" / split / f"shape_{i:02d}_mask.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("folder5")
    root = tmp / "data"
    make_shapes(root, "train", 6, seed=0)
    make_shapes(root, "val", 2, seed=1)
    spec = {
        "names": NAMES,
        "palette": PALETTE,
        "label_map": {str(v): i for i, v in enumerate(STORED)},
        "splits": {s: {"images": f"img/{s}", "labels": f"ann/{s}"} for s in ("train", "val")},
        "image_suffix": ".jpg",
        "label_suffix": "_mask.png",
    }
    classes = tmp / "shapes.json"
    classes.write_text(json.dumps(spec))
    torch.manual_seed(1)
    source = ERFNet(num_classes=19)
    save_checkpoint(tmp / "city19.pth", source)
    work = tmp / "work"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = train_cli.cli(
            [
                "--data",
                "folder",
                "--data-root",
                str(root),
                "--classes",
                str(classes),
                "--init-from",
                str(tmp / "city19.pth"),
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
                "1",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--no-progress",
                "--work-dir",
                str(work),
            ]
        )
    finally:
        torch.set_num_threads(old_threads)
    assert code == 0
    return {"tmp": tmp, "root": root, "classes": classes, "work": work}


def test_checkpoint_is_self_describing(trained):
    model = load_model(trained["work"] / "best.pth")
    assert model.num_classes == 5
    assert model.meta["class_names"] == NAMES and model.meta["palette"] == PALETTE
    assert model.meta["mean"] == list(MEAN_RGB) and model.meta["std"] == list(STD_RGB)
    assert model.meta["ignore_index"] == 255
    log = (trained["work"] / "train.log").read_text()
    assert "re-initialised for 5 classes (the file has 19)" in log
    assert "head.classifier.weight, head.classifier.bias" in log
    assert "red box=" in log  # validation's per-class IoU by the dataset's names


def test_eval_uses_the_names_and_writes_the_reports(trained, tmp_path: Path, capsys):
    out = tmp_path / "report"
    eval_script.main(
        [
            "--checkpoint",
            str(trained["work"] / "best.pth"),
            "--data",
            "folder",
            "--data-root",
            str(trained["root"]),
            "--classes",
            str(trained["classes"]),
            "--scale",
            *map(str, SIZE),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "r.json"),
            "--out-dir",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "| yellow box" in printed and "| road" not in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data["IoU"]) == NAMES and data["num_images"] == 2
    matrix = np.load(out / "confusion_matrix.npy")
    labelled = sum(
        int((np.asarray(Image.open(p)) != 0).sum())
        for p in (trained["root"] / "ann" / "val").glob("*.png")
    )
    assert matrix.shape == (5, 5) and int(matrix.sum()) == labelled
    as_json = json.loads((out / "confusion_matrix.json").read_text())
    assert as_json["class_names"] == NAMES and np.array_equal(as_json["matrix"], matrix)
    if importlib.util.find_spec("matplotlib") is None:  # optional: the plots are left out
        assert not (out / "confusion_matrix.png").exists()
    else:
        for name in ("confusion_matrix.png", "per_class_iou.png"):
            with Image.open(out / name) as im:
                assert im.size[0] > 100 and im.size[1] > 100
    assert not list(out.rglob("*_leftImg8bit.png"))  # no Cityscapes submission files


def test_eval_refuses_the_test_server_writer_and_a_wrong_class_count(trained, tmp_path: Path):
    common = [
        "--data",
        "folder",
        "--data-root",
        str(trained["root"]),
        "--classes",
        str(trained["classes"]),
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit) as info:
        eval_script.main(
            [
                "--checkpoint",
                str(trained["work"] / "best.pth"),
                *common,
                "--split",
                "test",
                "--out-dir",
                str(tmp_path / "sub"),
            ]
        )
    msg = str(info.value.code)
    assert msg.startswith("error: split 'test' of classes file") and "Cityscapes only" in msg
    assert str(trained["classes"]) in msg and "\n" not in msg
    with pytest.raises(SystemExit) as info:
        eval_script.main(["--checkpoint", str(trained["tmp"] / "city19.pth"), *common])
    msg = str(info.value.code)
    assert msg.startswith("error: --checkpoint") and "city19.pth" in msg and "needs 5" in msg


def test_predict_uses_the_checkpoint_palette(trained, tmp_path: Path):
    image = next((trained["root"] / "img" / "val").glob("*.jpg"))
    predict_cli.main(
        [
            str(image),
            "--checkpoint",
            str(trained["work"] / "best.pth"),
            "--out",
            str(tmp_path),
            "--scale",
            *map(str, SIZE),
            "--device",
            "cpu",
        ]
    )
    color = np.asarray(Image.open(tmp_path / f"{image.stem}_color.png").convert("RGB"))
    model = load_model(trained["work"] / "best.pth")
    pred = predict(model, load_image(image)[None], SIZE, TestSettings(scale=SIZE))[0].numpy()
    assert np.array_equal(color, np.asarray(PALETTE, dtype=np.uint8)[pred])


def test_onnx_export_and_int8_calibration_on_the_folder_dataset(trained, tmp_path: Path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    report = export.main(
        [
            str(trained["work"] / "best.pth"),
            "--out",
            str(tmp_path / "m.onnx"),
            "--size",
            *map(str, SIZE),
            "--precision",
            "int8",
            "--calib-data",
            str(trained["root"]),
            "--calib-classes",
            str(trained["classes"]),
            "--calib-images",
            "2",
            "--min-agreement",
            "0",
            "--max-miou-drop",
            "100",
        ]
    )
    meta = load_exported(tmp_path / "m.onnx").meta
    assert meta["class_names"] == NAMES and meta["palette"] == PALETTE
    assert report["gate"]["scored_images"] == 2 and 0.0 <= report["gate"]["fp32_miou"] <= 100.0
    assert len(report["calibration_files"]) == 2
    assert not set(report["calibration_files"]) & set(report["scored_files"])


def test_int8_calibration_on_other_classes_is_refused(
    trained, tmp_path: Path, random_bn_checkpoint: Path
):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    with pytest.raises(SystemExit) as info:
        export.main(
            [
                str(random_bn_checkpoint),
                "--out",
                str(tmp_path / "m.onnx"),
                "--precision",
                "int8",
                "--calib-data",
                str(trained["root"]),
                "--calib-classes",
                str(trained["classes"]),
            ]
        )
    msg = str(info.value.code)
    assert msg.startswith("error: --calib-data") and "5 classes" in msg and "19" in msg
    assert "\n" not in msg and list(tmp_path.iterdir()) == []


def test_the_test_server_writer_refuses_other_classes(trained, tmp_path: Path):
    val = FolderDataset(trained["root"], trained["classes"], "val", EvalTransform(SIZE))
    with pytest.raises(ValueError, match="Cityscapes test server's label-id PNGs"):
        SubmissionWriter(tmp_path, val.classes)
    assert not list(tmp_path.iterdir())
