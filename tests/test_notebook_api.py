"""What a notebook or a service hands the library: erfnet.predict's inputs, load_model's meta,
exports and inflating zips given as checkpoints, PIL's limits, memory for large images.

Tiny random models and images throughout; each case checks the result or a one-line refusal.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import erfnet
from erfnet.checkpoint import CheckpointError, make_checkpoint
from erfnet.convert import ConversionError, load_foreign_checkpoint
from erfnet.errors import UserError
from erfnet.evaluation.inference import TestSettings, infer_logits, infer_probs_ms_flip
from erfnet.evaluation.strips import labels_in_strips, resize_rows
from erfnet.model import ERFNet
from erfnet.test_size import shorter_side_size

REPO = Path(__file__).resolve().parents[1]
SMALL = {"rule": "fixed", "size": [16, 32]}  # every image to 16x32: fast on a CPU
META = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 50.0, 40.0], "test_size": SMALL}


def _tiny(num_classes: int = 4, seed: int = 0) -> ERFNet:
    torch.manual_seed(seed)
    model = ERFNet(num_classes=num_classes).eval()
    with torch.no_grad():  # BN statistics that differ from a batch's, so train mode shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nb") / "tiny.pth"
    erfnet.save_checkpoint(path, _tiny(), meta=META)
    return path


@pytest.fixture(scope="module")
def model(ckpt: Path) -> ERFNet:
    return erfnet.load_model(ckpt)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------ erfnet.predict's inputs


def test_predict_takes_every_form_a_notebook_holds(model, rgb: np.ndarray, tmp_path: Path):
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    # By hand: the checkpoint's test size (fixed 16x32), its mean / std, logits back, argmax.
    by_hand = infer_logits(model, chw[None], None, TestSettings.for_test_size(SMALL)).argmax(1)
    assert torch.equal(erfnet.predict(model, chw[None]), by_hand)  # NCHW -> [N, H, W]
    Image.fromarray(rgb).save(tmp_path / "a.png")
    for form in (
        Image.fromarray(rgb),
        rgb,
        np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),  # RGBA: alpha dropped
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        chw,
        chw.float(),  # float keeps the 0-255 meaning
    ):
        assert torch.equal(erfnet.predict(model, form), by_hand[0]), type(form)
    small = rgb[:9, :17]
    preds = erfnet.predict(model, [rgb, Image.fromarray(small)])
    assert isinstance(preds, list) and [p.shape for p in preds] == [(20, 36), (9, 17)]
    assert torch.equal(preds[0], by_hand[0])
    assert torch.equal(preds[1], erfnet.predict(model, small))
    assert erfnet.predict(model, rgb, (40, 72)).shape == (40, 72)


def test_predict_runs_in_eval_mode_and_restores_every_module(rgb: np.ndarray) -> None:
    model = _tiny()
    model.meta = META  # a network built in code, told its test size
    expected = erfnet.predict(model, rgb)
    model.train()
    model.decoder.eval()  # a caller's own mix of modes comes back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(erfnet.predict(model, rgb), expected)  # running statistics, not a batch's
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN untouched


@pytest.mark.parametrize(
    "image, words",
    [
        (torch.rand(3, 8, 8), "maximum <= 1) look like the 0-1 scale"),
        (torch.full((3, 8, 8), float("nan")), "NaN or infinite"),
        (torch.full((3, 8, 8), float("inf")), "NaN or infinite"),
        (torch.full((3, 8, 8), 300.0), "0-255 scale is expected"),
        (torch.full((3, 8, 8), -1.0), "0-255 scale is expected"),
        (np.full((8, 8, 3), 4000, np.uint16), "16-bit data"),
        (np.zeros((8, 8, 3), bool), "must hold numbers"),
        (np.zeros((0, 0, 3), np.uint8), "a 0x0 (HxW) image has no pixels"),
        (np.zeros((8, 8)), "must be H x W x 3"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "x.permute(2, 0, 1)"),
        ({"not": "an image"}, "cannot take a dict as an image"),
        ([], "an empty list of images"),
    ],
)
def test_predict_refuses_what_would_be_silently_wrong(model, image, words: str) -> None:
    with pytest.raises(ValueError) as e:
        erfnet.predict(model, image)
    assert words in _one_line(e)


def test_bad_sizes_are_one_line(model, rgb: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        erfnet.predict(model, rgb, (0, 0))
    assert "out_size (0, 0): two positive integers (H, W) expected" in _one_line(e)
    with pytest.raises(ValueError) as e:
        erfnet.predict(model, [rgb, rgb], (20, 36))
    assert "each is predicted at its own size" in _one_line(e)
    with pytest.raises(ValueError) as e:  # under the network's 8x8 at the test size
        erfnet.predict(
            model, rgb, settings=TestSettings.for_test_size({"rule": "fixed", "size": [4, 4]})
        )
    assert "under the 8x8 the network needs" in _one_line(e)
    with pytest.raises(ValueError) as e:
        erfnet.predict(model, tmp_path / "missing.png")
    assert "missing.png" in _one_line(e)


# ------------------------------------------------------------------ the default test size


def test_default_test_size_is_the_checkpoints(tmp_path: Path, rgb: np.ndarray) -> None:
    """predict at the size the checkpoint records (each rule), the same as the explicit
    settings; a file without one is tested at Cityscapes' keep-ratio 1024x2048."""
    chw = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    net = _tiny()
    for i, test_size in enumerate(
        [
            {"rule": "keep_ratio", "scale": [16, 64]},
            {"rule": "shorter_side", "size": 24},
            {"rule": "fixed", "size": [24, 24]},
        ]
    ):
        torch.save(make_checkpoint(net, {"test_size": test_size}), tmp_path / f"{i}.pth")
        model = erfnet.load_model(tmp_path / f"{i}.pth")
        assert model.meta["test_size"] == test_size
        explicit = TestSettings.for_test_size(test_size)
        assert torch.equal(
            erfnet.predict(model, rgb), erfnet.predict(model, chw, None, explicit)[0]
        )
    assert shorter_side_size((20, 36), 24) == (24, 43)  # torchvision's Resize(24): int(24*36/20)
    assert shorter_side_size((36, 20), 24) == (43, 24)
    old = make_checkpoint(net)
    del old["meta"]["test_size"]
    torch.save(old, tmp_path / "old.pth")
    assert erfnet.load_model(tmp_path / "old.pth").meta["test_size"] == {
        "rule": "keep_ratio",
        "scale": [1024, 2048],
    }


def test_predict_script_uses_the_checkpoints_test_size(ckpt, model, rgb: np.ndarray, tmp_path):
    from erfnet.evaluation.visualize import colorize
    from scripts import predict as predict_script

    Image.fromarray(rgb).save(tmp_path / "a.png")
    predict_script.main(
        [
            str(tmp_path / "a.png"),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "o"),
            "--threads",
            "1",
        ]
    )
    expected = colorize(erfnet.predict(model, rgb).numpy().astype(np.uint8), model.meta["palette"])
    assert np.array_equal(np.array(Image.open(tmp_path / "o" / "a_color.png")), expected)


# ------------------------------------------------------------------ load_model's meta, exports


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("std", [0.0, 1.0, 1.0], "meta std [0.0, 1.0, 1.0]: every value must be > 0"),
        ("mean", "abc", "meta mean 'abc': three finite numbers"),
        ("mean", [1.0, 2.0], "meta mean [1.0, 2.0]: three finite numbers"),
        ("std", [1.0, float("nan"), 1.0], "meta std [1.0, nan, 1.0]: three finite numbers"),
        ("class_names", "abcd", "meta class_names 'abcd': a list of strings expected"),
        ("class_names", ["a", "b"], "meta class_names has 2 names for a model of 4 classes"),
        ("class_names", [1, 2, 3, 4], "a list of strings expected"),
        ("palette", [[999, 0, 0]] * 4, "meta palette[0] [999, 0, 0]: integers 0-255 expected"),
        ("palette", [[0, 0, 0], [-1, 0, 0]], "meta palette[1] [-1, 0, 0]: integers 0-255"),
        ("palette", [[0, 0]], "meta palette[0] [0, 0]: an [R, G, B] triple expected"),
        ("ignore_index", 300, "meta ignore_index 300: an integer 0-255 expected"),
        ("ignore_index", "255", "meta ignore_index '255': an integer 0-255 expected"),
        ("test_size", [1024, 2048], 'meta test_size [1024, 2048]: expected {"rule"'),
        ("test_size", {"rule": "keep_ratio", "scale": [0, 9]}, "meta test_size {'rule'"),
        ("test_size", {"rule": "shorter_side", "size": 5.5}, "meta test_size {'rule'"),
    ],
)
def test_load_model_refuses_meta_that_cannot_work(tmp_path: Path, key: str, value, words: str):
    ckpt = make_checkpoint(_tiny())
    ckpt["meta"][key] = value
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        erfnet.load_model(tmp_path / "bad.pth")
    assert isinstance(e.value, UserError) and words in _one_line(e)
    assert str(e.value).startswith(f"{tmp_path / 'bad.pth'}: meta {key}")


@pytest.mark.parametrize(
    "name, content, kind",
    [
        ("model.onnx", b"\x08\x07\x12\x07pytorch", "an exported model (.onnx)"),
        ("model.xml", b'<?xml version="1.0"?>\n<net name="erfnet">', "an exported model (.xml)"),
        ("model.pt2", b"PK\x03\x04", "an exported model (.pt2)"),
        ("model.pth", b'<?xml version="1.0"?>\n<net>', "an exported model (XML, OpenVINO IR?)"),
    ],
)
def test_exports_are_named_as_exports(tmp_path: Path, name: str, content: bytes, kind: str):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        erfnet.load_model(tmp_path / name)
    line = _one_line(e)
    assert f"is {kind}, not a checkpoint" in line and "load_exported" in line
    assert "pickle" not in line


# ------------------------------------------------------------------ zips that inflate


def _deflated(tmp_path: Path, obj) -> Path:
    """``obj`` saved by torch.save and re-zipped with deflate (how a bomb shrinks)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return path


def test_zips_inflating_far_beyond_their_size_are_refused_before_reading(tmp_path, monkeypatch):
    # 32 MiB of zeros deflate to ~32 KiB: ~1000x, where the bound is 32x + 4 MiB.
    path = _deflated(tmp_path, {"model": {"w": torch.zeros(32 << 20, dtype=torch.uint8)}})
    assert path.stat().st_size < 1 << 20

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load called on a zip bomb")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError) as e:
        erfnet.load_model(path)
    assert f"refusing to read {path}: its " in _one_line(e) and "would inflate to" in str(e.value)
    with pytest.raises(ConversionError) as e:  # the converters' and --init-from's reader
        load_foreign_checkpoint(path)
    assert "would inflate to" in _one_line(e)
    monkeypatch.undo()
    small = _deflated(tmp_path, make_checkpoint(_tiny()))  # weights deflate little: read
    assert erfnet.load_model(small).num_classes == 4


# ------------------------------------------------------------------ PIL's globals, strips


def test_import_and_reading_leave_pil_and_the_warning_filters_alone(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    code = (  # the libraries first: torch and numpy set filters of their own when imported
        "import warnings, PIL.Image, numpy, torch, torchvision, tqdm\n"
        "before = (PIL.Image.MAX_IMAGE_PIXELS, list(warnings.filters))\n"
        "import erfnet, train, eval\n"
        "from erfnet.data.decode import load_image\n"
        f"load_image({str(tmp_path / 'a.jpg')!r}); load_image({str(tmp_path / 'a.png')!r})\n"
        "after = (PIL.Image.MAX_IMAGE_PIXELS, list(warnings.filters))\n"
        "print(before == after, before[0])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", str(Image.MAX_IMAGE_PIXELS)]


def test_resize_and_argmax_in_strips_equal_the_whole_computation(rgb: np.ndarray) -> None:
    torch.manual_seed(0)
    low = torch.randn(2, 5, 7, 11)
    whole = resize_rows(low, (23, 41), 0, 23)
    strips = torch.cat([resize_rows(low, (23, 41), y, min(y + 3, 23)) for y in range(0, 23, 3)], 2)
    assert torch.equal(strips, whole)  # rows are computed alone: bitwise the same
    reference = F.interpolate(low, size=(23, 41), mode="bilinear", align_corners=False)
    assert torch.allclose(whole, reference, atol=1e-5)
    assert torch.equal(labels_in_strips([(low, False)], (23, 41), 3), reference.argmax(1))
    model = _tiny()
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for ms_flip in (False, True):
        settings = TestSettings(scale=(16, 32), ms_flip=ms_flip)
        unstripped = (
            infer_probs_ms_flip(model, chw[None], None, settings)
            if ms_flip
            else infer_logits(model, chw[None], None, settings)
        ).argmax(1)[0]
        one_row = erfnet.predict(model, chw, settings=settings, strip_bytes=1)  # 1-row strips
        assert torch.equal(one_row, unstripped)
        assert torch.equal(erfnet.predict(model, chw, settings=settings), unstripped)


def test_video_predictors_default_to_the_checkpoints_test_size() -> None:
    pytest.importorskip("av", reason="the video extra (PyAV) is not installed")
    from erfnet.video.predictors import network_size_for

    keep = {"rule": "keep_ratio", "scale": [32, 64]}
    assert network_size_for((72, 128), None, keep) == (32, 57)  # mmcv's rule, as predict
    assert network_size_for((72, 128), None, {"rule": "shorter_side", "size": 36}) == (36, 64)
    assert network_size_for((72, 128), (40, 80), keep) == (40, 80)  # --resize wins
    assert network_size_for((72, 128), None, None) is None  # the frame's own size
