"""eval.py end to end on the synthetic Cityscapes: official-evaluator agreement, PNG round trip,
torchrun equivalence, ms+flip / slide runs, the test-server output and clear errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
from erfnet import ERFNet, save_checkpoint
from erfnet.config import MEAN_RGB, STD_RGB
from erfnet.data import CityscapesDataset, EvalTransform
from erfnet.data.transforms import normalize
from erfnet.errors import UserError
from erfnet.evaluation.metrics import ConfusionMatrix

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "eval.py"
SCALE = ["--scale", "64", "128"]  # the synthetic images' own size: no resize

# The official evaluator's 19 evaluated label ids, in trainId order (cityscapesScripts labels.py).
EVAL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        **kw,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Random weights with a large-variance classifier, so that predictions cover many classes."""
    torch.manual_seed(0)
    model = ERFNet()
    torch.nn.init.normal_(model.head.classifier.weight, std=1.0)
    path = tmp_path_factory.mktemp("ckpt") / "random.pth"
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    """3 val images: an odd count, so that a sharding that pads or repeats images shows."""
    from erfnet.data import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("val3") / "cityscapes"
    return make_synthetic_cityscapes(root, train=0, val=3, test=0, seed=1, extras=False)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, val_root, checkpoint) -> Path:
    """One single-process subprocess run with every output; the folder holding them."""
    out = tmp_path_factory.mktemp("single")
    r = _run(
        [
            str(EVAL),
            "--checkpoint",
            str(checkpoint),
            "--data-root",
            str(val_root),
            *SCALE,
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(out / "r.json"),
            "--out-dir",
            str(out / "sub"),
            "--save-color",
            str(out / "color"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mIoU" in r.stdout and "| road" in r.stdout
    return out


def official_class_iou(gt_root: Path, results: Path) -> list[float]:
    """cityscapesScripts evalPixelLevelSemanticLabeling's class IoU, in numpy: label-id PNGs,
    confusion over all label ids, TP / (TP + FP + FN) with FP on ignored ground truth dropped."""
    n = 256
    conf = np.zeros((n, n), dtype=np.int64)
    gts = sorted(gt_root.rglob("*_gtFine_labelIds.png"))
    assert gts
    for gt_path in gts:
        stem = gt_path.name[: -len("_gtFine_labelIds.png")]
        matches = list(results.rglob(f"{stem}*.png"))
        assert len(matches) == 1, f"official evaluator: {len(matches)} predictions for {stem}"
        pred = np.array(Image.open(matches[0]))
        gt = np.array(Image.open(gt_path))
        assert pred.ndim == 2 and pred.dtype == np.uint8 and pred.shape == gt.shape
        assert set(np.unique(pred).tolist()) <= set(range(34)), "unknown label id predicted"
        conf += np.bincount((gt.astype(np.int64) * n + pred).ravel(), minlength=n * n).reshape(n, n)
    ious = []
    for lid in EVAL_IDS:
        tp = conf[lid, lid]
        fn = conf[lid, :].sum() - tp
        fp = conf[[k for k in EVAL_IDS if k != lid], lid].sum()
        denom = tp + fp + fn
        ious.append(math.nan if denom == 0 else tp / denom)
    return ious


def test_matches_official_evaluator(single_run, val_root):
    data = json.loads((single_run / "r.json").read_text())
    ours = list(data["IoU"].values())
    official = official_class_iou(val_root / "gtFine" / "val", single_run / "sub")
    assert len(ours) == 19
    for a, b in zip(ours, official, strict=True):
        if math.isnan(b):
            assert a is None
        else:
            assert a == pytest.approx(100 * b, abs=1e-9)
    valid = [b for b in official if not math.isnan(b)]
    assert data["mIoU"] == pytest.approx(100 * sum(valid) / len(valid), abs=1e-9)
    # Not a trivial case: several classes predicted, some right, ignored pixels present.
    preds = [np.array(Image.open(p)) for p in (single_run / "sub").rglob("*_leftImg8bit.png")]
    assert len(np.unique(np.concatenate([p.ravel() for p in preds]))) >= 4
    assert sum(b > 0 for b in valid) >= 2
    assert data["split"] == "val" and data["num_images"] == 3 and data["ms_flip"] is False
    assert set(data) >= {"mIoU", "mAcc", "aAcc", "IoU", "Acc", "checkpoint", "scales", "mode"}


def test_written_pngs_round_trip_to_the_same_metric(single_run, val_root):
    from erfnet.labels import ID_TO_TRAIN_ID

    data = json.loads((single_run / "r.json").read_text())
    ds = CityscapesDataset(val_root, "val", EvalTransform(None))
    cm = ConfusionMatrix(19)
    for i, s in enumerate(ds.samples):
        path = single_run / "sub" / s.city / f"{s.name}_leftImg8bit.png"
        pred = torch.from_numpy(ID_TO_TRAIN_ID[np.array(Image.open(path))].astype(np.int64))
        cm.update(pred, ds[i]["label"])
    r = cm.compute()
    assert r["mIoU"] == data["mIoU"] and r["aAcc"] == data["aAcc"]
    # Colour renderings went to their own folder, two per image.
    colors = sorted(p.name for p in (single_run / "color").rglob("*.png"))
    assert len(colors) == 6 and all(n.endswith(("_color.png", "_blend.png")) for n in colors)


def test_out_dir_reports_count_every_labelled_pixel(single_run, val_root):
    """The confusion matrix in --out-dir: label rows x prediction columns over the labelled
    pixels, its diagonal the IoUs' intersections; the plots next to it."""
    data = json.loads((single_run / "r.json").read_text())
    matrix = np.load(single_run / "sub" / "confusion_matrix.npy")
    ds = CityscapesDataset(val_root, "val", EvalTransform(None))
    labelled = sum(int((ds[i]["label"] != 255).sum()) for i in range(len(ds)))
    assert matrix.shape == (19, 19) and int(matrix.sum()) == labelled
    iou = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
    for got, want in zip(data["IoU"].values(), iou * 100, strict=True):
        assert (got is None and np.isnan(want)) or got == pytest.approx(want, abs=1e-9)
    as_json = json.loads((single_run / "sub" / "confusion_matrix.json").read_text())
    assert as_json["class_names"][0] == "road" and np.array_equal(as_json["matrix"], matrix)
    # The plots need the optional matplotlib: written with it, cleanly left out without it.
    plots = importlib.util.find_spec("matplotlib") is not None
    assert (single_run / "sub" / "confusion_matrix.png").is_file() == plots
    assert (single_run / "sub" / "per_class_iou.png").is_file() == plots


def test_torchrun_two_processes_equal_single(tmp_path, single_run, val_root, checkpoint):
    r = _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(EVAL),
            "--checkpoint",
            str(checkpoint),
            "--data-root",
            str(val_root),
            *SCALE,
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "r.json"),
            "--out-dir",
            str(tmp_path / "sub"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    dist_data = json.loads((tmp_path / "r.json").read_text())
    single = json.loads((single_run / "r.json").read_text())
    for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "num_images"):
        assert dist_data[key] == single[key], key
    # --out-dir also holds the report files (confusion matrix, IoU chart): compare the submission
    a = sorted(
        p.relative_to(tmp_path / "sub") for p in (tmp_path / "sub").rglob("*_leftImg8bit.png")
    )
    b = sorted(
        p.relative_to(single_run / "sub") for p in (single_run / "sub").rglob("*_leftImg8bit.png")
    )
    assert a == b and len(a) == 3
    for rel in a:
        assert np.array_equal(
            np.array(Image.open(tmp_path / "sub" / rel)),
            np.array(Image.open(single_run / "sub" / rel)),
        )


def test_ms_flip_and_slide_in_process(tmp_path, synthetic_root, checkpoint, capsys):
    common = [
        "--checkpoint",
        str(checkpoint),
        "--data-root",
        str(synthetic_root),
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    eval_script.main(
        [
            *common,
            "--scale",
            "32",
            "64",
            "--ms-flip",
            "--scales",
            "1.0",
            "2.0",
            "--json",
            str(tmp_path / "ms.json"),
        ]
    )
    ms = json.loads((tmp_path / "ms.json").read_text())
    assert ms["ms_flip"] is True and ms["scales"] == [1.0, 2.0] and ms["scale"] == [32, 64]
    assert 0 <= ms["mIoU"] <= 100
    eval_script.main([*common, *SCALE, "--mode", "slide", "--json", str(tmp_path / "sl.json")])
    slide = json.loads((tmp_path / "sl.json").read_text())
    assert slide["mode"] == "slide" and 0 <= slide["mIoU"] <= 100
    assert "ms+flip [1.0, 2.0]" in capsys.readouterr().out


def test_split_test_writes_submission_only(tmp_path, synthetic_root, checkpoint, capsys):
    out = tmp_path / "submission"
    eval_script.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data-root",
            str(synthetic_root),
            "--split",
            "test",
            "--scale",
            "32",
            "64",
            "--workers",
            "0",
            "--out-dir",
            str(out),
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    files = list(out.rglob("*.png"))
    assert len(files) == 1 and files[0].name.endswith("_leftImg8bit.png")
    assert files[0].parent.name == files[0].name.split("_")[0]  # per-city folder
    pred = np.array(Image.open(files[0]))
    assert pred.shape == (64, 128) and pred.dtype == np.uint8  # original size, not the 32x64 input
    assert set(np.unique(pred).tolist()) <= set(EVAL_IDS)
    data = json.loads((tmp_path / "t.json").read_text())
    assert "mIoU" not in data and data["num_images"] == 1
    assert "per class" not in capsys.readouterr().out


def _error(argv: list[str]) -> str:
    """The error line of a refused run: exit 1 with "error: ..." as the exit message, or a
    flag error: exit 2 with argparse's usage and "eval.py: error: ..." on stderr."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(stderr):
        eval_script.main(argv)
    if e.value.code == 2:
        return stderr.getvalue().strip().splitlines()[-1]
    assert isinstance(e.value.code, str), e.value.code
    return e.value.code


def test_clear_errors(tmp_path, synthetic_root, checkpoint):
    base = ["--data-root", str(synthetic_root), *SCALE, "--workers", "0", "--device", "cpu"]
    ck = ["--checkpoint", str(checkpoint)]
    msg = _error(["--checkpoint", str(tmp_path / "missing.pth"), *base])
    assert "checkpoint not found" in msg and "missing.pth" in msg
    twenty = tmp_path / "twenty.pth"
    save_checkpoint(twenty, ERFNet(num_classes=20))
    msg = _error(["--checkpoint", str(twenty), *base])
    assert "predicts 20 classes" in msg and "19" in msg
    assert "--out-dir" in _error([*ck, *base, "--split", "test"])
    msg = _error(
        [
            *ck,
            *base,
            "--out-dir",
            str(tmp_path / "a"),
            "--save-color",
            str(tmp_path / "a" / "color"),
        ]
    )
    assert "--save-color" in msg and "outside --out-dir" in msg
    assert "outside" in _error(
        [*ck, *base, "--out-dir", str(tmp_path / "a"), "--save-color", str(tmp_path / "a")]
    )
    assert "--ms-flip" in _error([*ck, *base, "--scales", "1.0"])
    assert "--scales" in _error([*ck, *base, "--ms-flip", "--scales", "0"])
    assert "--scale" in _error([*ck, "--data-root", str(synthetic_root), "--scale", "0", "64"])
    msg = _error([*ck, "--data-root", str(tmp_path / "nowhere"), *SCALE])
    assert "nowhere" in msg and "does not exist" in msg
    # A split with no images.
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "val" / "frankfurt").mkdir(parents=True)
    (empty / "gtFine" / "val").mkdir(parents=True)
    assert "empty" in _error([*ck, "--data-root", str(empty), *SCALE, "--workers", "0"])
    with pytest.raises(SystemExit):  # argparse: bad choice
        eval_script.main([*ck, *base, "--mode", "tiles"])
    # Bad output paths and devices are refused before any evaluation, in one line.
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "--out-dir" in _error([*ck, *base, "--out-dir", str(a_file)])
    assert "--save-color" in _error([*ck, *base, "--save-color", str(a_file)])
    assert "--json" in _error([*ck, *base, "--json", str(tmp_path)])
    msg = _error([*ck, *base[:-2], "--device", "gpu"])
    assert "--device" in msg and "gpu" in msg and "Traceback" not in msg


def test_unreadable_image_is_a_clear_error(tmp_path, synthetic_root, checkpoint):
    root = tmp_path / "cs"
    shutil.copytree(synthetic_root / "leftImg8bit" / "val", root / "leftImg8bit" / "val")
    shutil.copytree(synthetic_root / "gtFine" / "val", root / "gtFine" / "val")
    bad = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # One worker: the error crosses the DataLoader's process boundary and is still one line.
    msg = _error(
        [
            "--checkpoint",
            str(checkpoint),
            "--data-root",
            str(root),
            *SCALE,
            "--workers",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert bad.name in msg and "cannot decode" in msg and "Traceback" not in msg


def test_checkpoint_normalisation_is_respected(tmp_path, val_root):
    """A checkpoint trained with another mean / std (erfnet_pytorch: x / 255) is fed the 0-255
    image normalised with its own statistics, not ImageNet's."""
    from erfnet.labels import TRAIN_ID_TO_ID

    torch.manual_seed(0)
    model = ERFNet(num_classes=19).eval()
    torch.nn.init.normal_(model.head.classifier.weight, std=1.0)
    path = tmp_path / "x255.pth"
    save_checkpoint(path, model, meta={"mean": [0.0] * 3, "std": [255.0] * 3})
    out = tmp_path / "sub"
    eval_script.main(
        [
            "--checkpoint",
            str(path),
            "--data-root",
            str(val_root),
            *SCALE,
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
        ]
    )
    changed = 0
    with torch.no_grad():
        for item in CityscapesDataset(val_root, "val", EvalTransform(None)):
            rgb = item["image"][None].float()
            own = model(normalize(rgb, [0.0] * 3, [255.0] * 3)).argmax(1)[0].numpy()
            got = np.array(Image.open(out / item["city"] / f"{item['name']}_leftImg8bit.png"))
            np.testing.assert_array_equal(got, TRAIN_ID_TO_ID[own.astype(np.uint8)])
            imagenet = model(normalize(rgb, MEAN_RGB, STD_RGB)).argmax(1)[0].numpy()
            changed += int((own != imagenet).sum())
    torch.testing.assert_close(normalize(rgb, [0.0] * 3, [255.0] * 3), rgb / 255)
    assert changed > 0  # the statistics matter for this model: a wrong pair would show


def test_void_class_checkpoint_scores_void_as_a_miss(tmp_path, val_root):
    """erfnet_pytorch's 20-class model (class 19 = void) is scored on the 19 classes."""
    torch.manual_seed(0)
    model = ERFNet(num_classes=20, head="deconv").eval()
    torch.nn.init.normal_(model.head.output_conv.weight, std=1.0)
    with torch.no_grad():
        model.head.output_conv.bias[19] = 0.5  # void wins on part of the image, not all of it
    path = tmp_path / "void.pth"
    save_checkpoint(path, model, meta={"void_class": 19})
    eval_script.main(
        [
            "--checkpoint",
            str(path),
            "--data-root",
            str(val_root),
            *SCALE,
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    data = json.loads((tmp_path / "r.json").read_text())
    # Independent count: a void prediction on a labelled pixel is a false negative only.
    inter, label, predicted, void_hits = np.zeros(19), np.zeros(19), np.zeros(19), 0
    ds = CityscapesDataset(val_root, "val", EvalTransform(None))
    with torch.no_grad():
        for item in ds:
            pred = model(normalize(item["image"][None], MEAN_RGB, STD_RGB)).argmax(1)[0].numpy()
            gt = item["label"].numpy()
            keep = gt != 255
            void_hits += int((pred[keep] == 19).sum())
            for c in range(19):
                inter[c] += ((pred == c) & (gt == c)).sum()
                label[c] += (gt == c).sum()
                predicted[c] += ((pred == c) & keep).sum()
    assert void_hits > 0  # the case under test occurs
    union = label + predicted - inter
    for c, name in enumerate(data["IoU"]):
        if union[c] == 0:
            assert data["IoU"][name] is None
        else:
            assert data["IoU"][name] == pytest.approx(100 * inter[c] / union[c], abs=1e-9)


def test_ms_flip_views_are_resized_from_the_original_image(tmp_path, val_root, checkpoint):
    """mmseg's MultiScaleFlipAug resizes the original image to every ratio x --scale: a ratio-2
    view of a 32x64 --scale on 64x128 images is the original image, not an upsampled 32x64 copy."""
    from erfnet.checkpoint import load_model
    from erfnet.evaluation.inference import TestSettings, predict
    from erfnet.labels import TRAIN_ID_TO_ID

    out = tmp_path / "sub"
    eval_script.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data-root",
            str(val_root),
            "--scale",
            "32",
            "64",
            "--ms-flip",
            "--scales",
            "2.0",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
        ]
    )
    model = load_model(checkpoint)
    for item in CityscapesDataset(val_root, "val", EvalTransform(None)):
        settings = TestSettings(scale=(32, 64), ms_flip=True, ratios=(2.0,))
        ref = predict(model, item["image"][None], None, settings)
        got = np.array(Image.open(out / item["city"] / f"{item['name']}_leftImg8bit.png"))
        np.testing.assert_array_equal(got, TRAIN_ID_TO_ID[ref[0].numpy().astype(np.uint8)])


# ----------------------------------------------------------------------------------------------
# eval.py --model: exported graphs scored with the same protocol and metric
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint) -> dict:
    """The checkpoint exported to fp32 ONNX (dynamic size) by the project's exporter, and its
    meta; skipped without the optional onnx / onnxruntime packages."""
    pytest.importorskip("onnx", reason="the optional onnx package is not installed")
    pytest.importorskip("onnxruntime", reason="the optional onnxruntime package is not installed")
    from erfnet.checkpoint import load_model
    from erfnet.deploy.onnx import export_onnx

    model = load_model(checkpoint)
    folder = tmp_path_factory.mktemp("exported")
    path = export_onnx(model, folder / "m.onnx", 64, 128, meta=model.meta)
    return {"onnx": path, "meta": model.meta, "model": model, "dir": folder}


# OpenVINO IRs are made and run in subprocesses: loaded in the pytest process beside the
# DataLoader's SIGCHLD handler of an earlier test, a later subprocess's exit crashed pytest.
_MAKE_IR = """
import json, sys
import openvino as ov
onnx_path, meta, *outs = sys.argv[1:]
for spec in outs:
    xml, _, shape = spec.partition("@")
    kwargs = {"input": [[int(d) for d in shape.split(",")]]} if shape else {}
    model = ov.convert_model(onnx_path, **kwargs)
    model.set_rt_info(open(meta).read(), ["erfnet", "erfnet_meta"])
    ov.save_model(model, xml, compress_to_fp16=False)
"""


@pytest.fixture(scope="module")
def openvino_irs(exported) -> dict[str, Path]:
    """The ONNX export converted to OpenVINO IRs at full precision, the meta in rt_info where the
    exporter writes it (["erfnet", "erfnet_meta"]): ``dynamic`` and ``fixed`` (1x3x64x128)."""
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("the optional openvino package is not installed")
    folder = exported["dir"]
    (folder / "meta.json").write_text(json.dumps(exported["meta"]))
    irs = {"dynamic": folder / "m.xml", "fixed": folder / "f.xml"}
    r = _run(
        [
            "-c",
            _MAKE_IR,
            str(exported["onnx"]),
            str(folder / "meta.json"),
            str(irs["dynamic"]),
            f"{irs['fixed']}@1,3,64,128",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return irs


def _miou(path: Path) -> float:
    return json.loads(path.read_text())["mIoU"]


def test_an_onnx_export_scores_the_checkpoints_miou(tmp_path, single_run, val_root, exported):
    r = _run(
        [
            str(EVAL),
            "--model",
            str(exported["onnx"]),
            "--data-root",
            str(val_root),
            *SCALE,
            "--workers",
            "0",
            "--json",
            str(tmp_path / "onnx.json"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "onnx.json").read_text())
    reference = json.loads((single_run / "r.json").read_text())
    assert data["model"] == str(exported["onnx"]) and data["checkpoint"] is None
    assert data["num_images"] == 3 and "| road" in r.stdout
    assert abs(data["mIoU"] - reference["mIoU"]) <= 0.05
    assert abs(data["aAcc"] - reference["aAcc"]) <= 0.05
    # Random weights give a small mIoU: the predictions themselves must agree as well.
    same = total = 0
    for ref in (single_run / "sub").rglob("*_leftImg8bit.png"):
        ours = np.array(Image.open(tmp_path / ref.relative_to(single_run / "sub")))
        same += int((ours == np.array(Image.open(ref))).sum())
        total += ours.size
    assert total == 3 * 64 * 128 and same / total >= 0.999


def test_an_openvino_export_scores_the_checkpoints_miou(
    tmp_path, single_run, val_root, openvino_irs
):
    r = _run(
        [
            str(EVAL),
            "--model",
            str(openvino_irs["dynamic"]),
            "--data-root",
            str(val_root),
            *SCALE,
            "--workers",
            "0",
            "--json",
            str(tmp_path / "ov.json"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(_miou(tmp_path / "ov.json") - _miou(single_run / "r.json")) <= 0.05


def test_a_fixed_size_export_takes_only_views_of_its_size(
    tmp_path, single_run, val_root, openvino_irs
):
    base = [
        str(EVAL),
        "--model",
        str(openvino_irs["fixed"]),
        "--data-root",
        str(val_root),
        "--workers",
        "0",
    ]
    r = _run([*base, "--scale", "32", "64"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"error: --model {openvino_irs['fixed']} takes only 64x128 inputs (a fixed-size export),"
        " not --scale 32 64; export with a dynamic size, or evaluate at 64x128"
    ]
    # The other views the protocol could ask for, refused by the same check.
    for extra, refused in (
        (["--ms-flip"], "--ms-flip ratios"),
        (["--mode", "slide"], "slide crops of 512x1024"),
    ):
        args = eval_script.get_args_parser().parse_args(["--model", "f.xml", *extra])
        with pytest.raises(UserError, match=f"not {refused}"):
            eval_script.check_fixed_size(args, (64, 128))
    # Without --scale the export's own size is the test scale.
    r = _run([*base, "--json", str(tmp_path / "fixed.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(_miou(tmp_path / "fixed.json") - _miou(single_run / "r.json")) <= 0.05


def test_an_argmax_export_is_scored_whole_image_only(tmp_path, single_run, val_root, exported):
    import onnx

    from erfnet.deploy.exported import META_KEY, OUTPUT_KEY

    class Argmax(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).argmax(1)

    path = tmp_path / "labels.onnx"
    axes = {0: "n", 2: "h", 3: "w"}
    torch.onnx.export(
        Argmax(exported["model"]).eval(),
        (torch.randn(1, 3, 64, 128),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["labels"],
        dynamic_axes={"input": axes, "labels": {0: "n", 1: "h", 2: "w"}},
        opset_version=17,
    )
    proto = onnx.load(str(path))
    for key, value in ((META_KEY, json.dumps(exported["meta"])), (OUTPUT_KEY, "labels")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    base = ["--model", str(path), "--data-root", str(val_root), *SCALE, "--workers", "0"]
    assert "only the whole-image single-scale test" in _error([*base, "--ms-flip"])
    eval_script.main([*base, "--json", str(tmp_path / "labels.json")])
    assert abs(_miou(tmp_path / "labels.json") - _miou(single_run / "r.json")) <= 0.05


def test_model_flag_errors(tmp_path, val_root, exported):
    base = ["--data-root", str(val_root), *SCALE, "--workers", "0"]
    msg = _error(["--model", str(tmp_path / "none.onnx"), *base])
    assert msg.startswith("error: --model") and "no such file" in msg
    msg = _error(["--model", str(tmp_path / "m.pt"), *base])
    assert "expected an exported model ending in .onnx, .xml or .pt2" in msg
    msg = _error(["--model", str(exported["onnx"]), *base, "--device", "cuda"])
    assert "--model runs on the CPU" in msg
    with pytest.raises(SystemExit):  # argparse: one of --checkpoint / --model, not both
        eval_script.main(["--model", str(exported["onnx"]), "--checkpoint", "c.pth", *base])


# ----------------------------------------------------------------------------------------------
# Nothing lost, no traceback: outputs checked first, sizes, absurd or broken checkpoints, CPUs
# ----------------------------------------------------------------------------------------------


def _one_line_failure(r: subprocess.CompletedProcess, before_work: bool = True) -> str:
    """The error line of a failed run (rc 1 or 2, no traceback); ``before_work``: the only line,
    nothing evaluated (no progress bar)."""
    assert r.returncode in (1, 2), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    if r.returncode == 2:  # a flag error: argparse's usage, then "eval.py: error: <the line>"
        assert lines[0].startswith("usage:"), r.stderr[-2000:]
        assert lines[-1].startswith("eval.py: error: "), r.stderr[-2000:]
        return lines[-1].removeprefix("eval.py: ")
    assert lines[-1].startswith("error:"), r.stderr[-2000:]
    if before_work:
        assert len(lines) == 1 and "eval:" not in r.stderr, r.stderr[-2000:]
    return lines[-1]


def test_outputs_that_cannot_be_written_are_refused_before_the_work(
    tmp_path, val_root, checkpoint, readonly_dir
):
    args = [
        "--checkpoint",
        str(checkpoint),
        "--data-root",
        str(val_root),
        *SCALE,
        "--device",
        "cpu",
    ]
    msg = _one_line_failure(_run([str(EVAL), *args, "--json", str(readonly_dir / "r.json")]))
    assert msg.startswith(f"error: --json {readonly_dir / 'r.json'}: cannot write in"), msg
    if os.geteuid() == 0:  # a read-only mount: the reason is the file system's
        assert msg.endswith("Read-only file system"), msg
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for extra, expected in (
        (["--out-dir", str(readonly_dir / "sub")], f"--out-dir {readonly_dir / 'sub'}: cannot"),
        (["--json", str(a_file / "r.json")], f"'{a_file}' is a file, not a folder"),
        (["--save-color", str(a_file / "c")], f"'{a_file}' is a file, not a folder"),
        (["--json", str(checkpoint)], "is the input"),
        (["--out-dir", str(val_root / "leftImg8bit" / "val")], "is inside the input"),
    ):
        msg = _error([*args, *extra])
        assert expected in msg and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "readonly"]  # nothing made


def test_a_write_that_fails_later_is_one_line_naming_the_file(tmp_path, val_root, checkpoint):
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(small)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:  # room for one page: the check's empty probe passes, the second PNG does not fit
        args = [
            "--checkpoint",
            str(checkpoint),
            "--data-root",
            str(val_root),
            *SCALE,
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out-dir",
            str(small),
        ]
        r = _run([str(EVAL), *args])
    finally:
        subprocess.run(["umount", str(small)], check=False)
    msg = _one_line_failure(r, before_work=False)
    assert f"cannot write '{small}/" in msg and msg.endswith("No space left on device"), msg


def test_views_that_reach_under_8_pixels_are_one_line(val_root, checkpoint):
    args = [
        "--checkpoint",
        str(checkpoint),
        "--data-root",
        str(val_root),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    msg = _one_line_failure(_run([str(EVAL), *args, "--scale", "1", "1"]))
    assert "--scale H W must be at least 8 8" in msg
    for extra, expected in (
        (["--ms-flip", "--scales", "1e-6"], "--scales 1e-06 makes 0x0 views"),
        (["--ms-flip", "--scales", "inf"], "--scales must be positive ratios"),
        (["--ms-flip", "--scales", "nan"], "--scales must be positive ratios"),
        # An image too elongated for the scale: found at that image, still one line.
        (["--scale", "8", "8"], "a 64x128 image resized to the test scale 8x8 is 4x8 pixels"),
    ):
        msg = _error([*args, *extra])
        assert expected in msg and "\n" not in msg, msg


def test_absurd_or_broken_checkpoints_are_refused_in_one_line(tmp_path, val_root):
    from erfnet.checkpoint import make_checkpoint

    huge = make_checkpoint(ERFNet())
    huge["model_args"]["num_classes"] = 10**9  # a 512 GB classifier if it were built
    torch.save(huge, tmp_path / "huge.pth")
    model = ERFNet()
    with torch.no_grad():
        model.head.classifier.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pth", model)
    base = ["--data-root", str(val_root), *SCALE, "--device", "cpu", "--workers", "0"]
    msg = _one_line_failure(_run([str(EVAL), "--checkpoint", str(tmp_path / "huge.pth"), *base]))
    assert "num_classes 1000000000 is not a class count (1..255)" in msg
    msg = _error(["--checkpoint", str(tmp_path / "nan.pth"), *base])
    assert "hold NaN or infinite values (first: head.classifier.weight)" in msg


def test_cpu_threads_and_workers_follow_the_one_plan(val_root, checkpoint, monkeypatch):
    """On 2 free cores: no loader workers and one thread (a core left free), as train.py plans;
    --threads and --workers override. PyTorch's too-many-workers warning never shows."""
    import eval as module
    from erfnet import runtime

    seen: list[int] = []
    real = module.build_eval_loader

    def spy(dataset, workers):
        seen.append(workers)
        return real(dataset, workers=workers)

    monkeypatch.setattr(module, "build_eval_loader", spy)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    base = [
        "--checkpoint",
        str(checkpoint),
        "--data-root",
        str(val_root),
        *SCALE,
        "--device",
        "cpu",
    ]
    try:
        module.main(base)
        assert seen == [0] and torch.get_num_threads() == 1
        module.main([*base, "--threads", "2", "--workers", "1"])
        assert seen == [0, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = subprocess.run(
        [sys.executable, str(EVAL), *base],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "worker processes in total" not in r.stderr


def test_a_fixed_export_whose_resize_differs_is_refused_before_the_work(exported, val_root):
    """A 31x63 export with --scale 31 63: the 64x128 images resize (keeping their ratio) to
    31x62, which the graph cannot take; one line naming the image, before any evaluation."""
    from erfnet.deploy.onnx import export_onnx

    fixed = export_onnx(
        exported["model"],
        exported["dir"] / "f31x63.onnx",
        31,
        63,
        meta=exported["meta"],
        dynamic=False,
    )
    argv = ["--model", str(fixed), "--data-root", str(val_root), "--workers", "0"]
    r = _run([str(EVAL), *argv, "--scale", "31", "63"])
    msg = _one_line_failure(r)
    assert r.returncode == 1 and "takes only 31x63 inputs" in msg, msg
    assert "(64x128) to 31x62" in msg and "_leftImg8bit.png" in msg, msg


def test_a_broken_openvino_xml_is_one_line_with_its_reason(tmp_path, val_root):
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("the optional openvino package is not installed")
    broken = tmp_path / "m.xml"
    broken.write_text('<?xml version="1.0"?>\n<net name="x" version="11"><layers><layer id="0" ')
    msg = _error(["--model", str(broken), "--data-root", str(val_root), *SCALE])
    assert msg.startswith(f"error: --model {broken}: cannot load: "), msg
    reason = msg.split("cannot load: ", 1)[1]  # the reason, not where in OpenVINO's C++
    assert reason and not reason.startswith(("Exception from", "Check '")), msg
