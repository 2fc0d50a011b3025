"""A dataset of one's own: 5 classes with their own names, colours and ignore index, trained
through the real train.py, then evaluated, predicted and run on the fast path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import train as train_cli
from erfnet import load_model
from erfnet.config import MEAN_RGB, STD_RGB
from erfnet.data import normalize
from erfnet.evaluation.evaluate import build_eval_loader, evaluate
from erfnet.evaluation.inference import TestSettings
from erfnet.evaluation.visualize import colorize
from scripts import predict as predict_cli

SIZE = (32, 48)  # (H, W) of every image


class Shapes(Dataset):
    """Noisy images with one coloured rectangle per class; a 2-pixel ignored border."""

    classes = ("background", "red box", "green box", "blue box", "yellow box")
    palette = ((0, 0, 0), (220, 20, 60), (0, 160, 0), (30, 60, 200), (230, 200, 0))
    ignore_index = 255

    def __init__(self, count: int, seed: int, normalised: bool = True) -> None:
        self.normalised = normalised  # train items are normalised, val items 0-255
        rng = np.random.default_rng(seed)
        h, w = SIZE
        self.rgb, self.labels = [], []
        for _ in range(count):
            rgb = rng.integers(60, 120, size=(h, w, 3)).astype(np.uint8)
            label = np.zeros((h, w), dtype=np.int64)
            for cls in range(1, len(self.classes)):
                y, x = rng.integers(0, h - 10), rng.integers(0, w - 12)
                rgb[y : y + 10, x : x + 12] = self.palette[cls]
                label[y : y + 10, x : x + 12] = cls
            label[:2], label[-2:] = self.ignore_index, self.ignore_index
            self.rgb.append(rgb)
            self.labels.append(label)

    def __len__(self) -> int:
        return len(self.rgb)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.rgb[i]).permute(2, 0, 1)
        return {
            "image": normalize(x, MEAN_RGB, STD_RGB) if self.normalised else x,
            "label": torch.from_numpy(self.labels[i]),
            "name": f"shapes_{i:03d}",
            "city": "shapes",
        }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Shapes]:
    work = tmp_path_factory.mktemp("shapes")
    val_set = Shapes(2, seed=1, normalised=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(train_cli, "get_dataset", lambda args, dist_info: (Shapes(8, seed=0), val_set))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = train_cli.parse_args(
            train_cli.get_args_parser(),
            [
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
            ],
        )
        assert train_cli.main(args) == 0
    finally:
        torch.set_num_threads(old_threads)
        mp.undo()
    return work, val_set


def test_training_takes_classes_from_the_dataset(trained):
    work, _ = trained
    for name in ("latest.pth", "best.pth", "iter_2.pth", "args.json", "train.log"):
        assert (work / name).is_file(), name
    model = load_model(work / "best.pth")
    assert model.num_classes == 5
    assert model.meta["class_names"] == list(Shapes.classes)
    assert model.meta["palette"] == [list(c) for c in Shapes.palette]
    assert model.meta["ignore_index"] == 255
    log = (work / "train.log").read_text()
    assert "val at iteration 2" in log and "red box=" in log  # per-class IoU by the dataset's names
    assert json.loads((work / "args.json").read_text())["iters"] == 2


def test_eval_predict_and_fast_path_on_the_result(trained, tmp_path: Path):
    work, val_set = trained
    model = load_model(work / "best.pth")
    images = torch.stack([val_set[i]["image"] for i in range(len(val_set))])
    images = normalize(images, MEAN_RGB, STD_RGB)
    labels = torch.stack([val_set[i]["label"] for i in range(len(val_set))])
    with torch.no_grad():
        logits = model(images)
    pred = logits.argmax(1)

    # evaluate(): the images are already at the test scale, so its predictions are the plain
    # model's argmax, and its pixel accuracy is that of these predictions.
    loader = build_eval_loader(val_set, workers=0, pin_memory=False)
    metrics = evaluate(
        model, loader, "cpu", TestSettings(scale=SIZE), num_classes=5, progress=False
    )
    assert metrics["num_images"] == 2 and len(metrics["IoU"]) == 5
    labelled = labels != Shapes.ignore_index
    expected_acc = 100.0 * (pred[labelled] == labels[labelled]).double().mean().item()
    assert metrics["aAcc"] == pytest.approx(expected_acc, abs=1e-6)

    # Colours from the checkpoint's palette; ignored pixels black.
    palette = model.meta["palette"]
    rgb = colorize(pred[0].numpy(), palette)
    assert rgb.shape == (*SIZE, 3)
    assert np.array_equal(rgb[5, 7], palette[int(pred[0, 5, 7])])
    assert not colorize(labels[0].numpy(), palette)[0].any()  # the ignored border

    # scripts/predict.py (the fast path by default) writes the same colours.
    Image.fromarray(val_set.rgb[0]).save(tmp_path / "img.png")
    predict_cli.main(
        [
            str(tmp_path / "img.png"),
            "--checkpoint",
            str(work / "best.pth"),
            "--out",
            str(tmp_path / "out"),
            "--scale",
            *map(str, SIZE),
            "--device",
            "cpu",
        ]
    )
    written = np.asarray(Image.open(tmp_path / "out" / "img_color.png").convert("RGB"))
    assert np.array_equal(written, colorize(pred[0].numpy(), palette))

    # The fast path (BatchNorm folded, channels_last): the plain model's predictions.
    fast = load_model(work / "best.pth", fast=True)
    assert fast.meta == model.meta
    with torch.no_grad():
        fast_logits = fast(images)
    torch.testing.assert_close(fast_logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast_logits.argmax(1), pred)
