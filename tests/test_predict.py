"""scripts/predict.py: colour maps and blends for single images and folders, no dataset needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erfnet.checkpoint import save_checkpoint
from erfnet.labels import TRAIN_ID_TO_COLOR
from erfnet.model import ERFNet
from scripts import predict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "predict.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, random_bn) -> Path:
    torch.manual_seed(0)
    model = random_bn(ERFNet())  # non-trivial BN statistics: folding really folds
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, model.eval())
    return path


@pytest.fixture()
def images(synthetic_root: Path, tmp_path: Path) -> Path:
    """A folder with two synthetic images (64x128), one in a sub-folder."""
    src = sorted((synthetic_root / "leftImg8bit" / "val").rglob("*.png"))[:2]
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(src[0], folder / "a.png")
    shutil.copy(src[1], folder / "sub" / "b.png")
    return folder


def run(*args: str) -> list[Path]:
    return predict.main([*map(str, args), "--device", "cpu"])


def test_predict_folder_writes_colour_and_blend(images: Path, checkpoint: Path, tmp_path: Path):
    out = tmp_path / "out"
    written = run(images, "--checkpoint", checkpoint, "--out", out, "--scale", "64", "128")
    expected = {
        out / "a_color.png",
        out / "a_blend.png",
        out / "sub/b_color.png",
        out / "sub/b_blend.png",
    }
    assert set(written) == expected and all(p.is_file() for p in expected)
    rgb = np.asarray(Image.open(images / "a.png").convert("RGB"))
    color = np.asarray(Image.open(out / "a_color.png"))
    blend = np.asarray(Image.open(out / "a_blend.png"))
    assert color.shape == blend.shape == rgb.shape
    # Every colour is a class colour, and the blend is half image, half colour.
    palette = {tuple(c) for c in TRAIN_ID_TO_COLOR[:19].tolist()}
    assert {tuple(c) for c in color.reshape(-1, 3).tolist()} <= palette
    mix = 0.5 * rgb.astype(np.float32) + 0.5 * color.astype(np.float32)
    assert np.abs(blend.astype(np.float32) - mix).max() <= 1.0


def test_fast_path_predicts_the_same_classes(images: Path, checkpoint: Path, tmp_path: Path):
    common = ["--checkpoint", checkpoint, "--scale", "48", "96"]
    run(images / "a.png", *common, "--out", tmp_path / "fast")
    run(images / "a.png", *common, "--out", tmp_path / "plain", "--no-fast")
    fast = np.asarray(Image.open(tmp_path / "fast" / "a_color.png"))
    plain = np.asarray(Image.open(tmp_path / "plain" / "a_color.png"))
    assert (fast == plain).all(axis=-1).mean() > 0.999


def test_ms_flip_and_cli(images: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ms"
    cmd = [
        sys.executable,
        str(SCRIPT),
        str(images / "a.png"),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--ms-flip",
        "--scale",
        "32",
        "64",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "a_color.png").is_file() and (out / "a_blend.png").is_file()
    assert Image.open(out / "a_color.png").size == (128, 64)


def test_clear_errors(images: Path, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        run(tmp_path / "missing", "--checkpoint", checkpoint, "--out", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        run(tmp_path / "empty", "--checkpoint", checkpoint, "--out", tmp_path / "o")
    with pytest.raises(SystemExit, match="checkpoint not found"):
        run(images, "--checkpoint", tmp_path / "nope.pth", "--out", tmp_path / "o")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"cannot (read|decode) .*bad\.png"):
        run(bad, "--checkpoint", checkpoint, "--out", tmp_path / "o")
    with pytest.raises(SystemExit, match="--out .* is the input --checkpoint"):
        run(images, "--checkpoint", checkpoint, "--out", checkpoint)
    with pytest.raises(SystemExit, match="--device 'gpu'"):
        predict.main(
            [str(images), "--checkpoint", str(checkpoint), "--out", "o", "--device", "gpu"]
        )


def test_checkpoint_mean_std_survive_the_resize(tmp_path: Path, monkeypatch) -> None:
    """An erfnet_pytorch-style checkpoint (mean 0, std 255) sees exactly the uint8-resized
    image / 255, not a copy re-quantised with the Cityscapes mean / std."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    path = tmp_path / "ep.pth"
    meta = {"mean": [0.0] * 3, "std": [255.0] * 3, "void_class": 19}
    save_checkpoint(path, ERFNet(num_classes=20, head="deconv").eval(), meta=meta)
    rgb = (np.random.RandomState(0).rand(40, 70, 3) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    seen: list[torch.Tensor] = []
    real_load = predict.load_network

    def load_and_spy(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
        return model

    monkeypatch.setattr(predict, "load_network", load_and_spy)
    run(
        tmp_path / "img.png",
        "--checkpoint",
        path,
        "--out",
        tmp_path / "o",
        "--scale",
        "32",
        "64",
        "--no-fast",
    )
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    ref = F.interpolate(x, size=(32, 56), mode="bilinear", align_corners=False).round() / 255
    assert len(seen) == 1
    # Equal but for rare exact .5 ties of the rounding, which float noise may send either way.
    diff = (seen[0] - ref).abs()
    assert diff.max() <= 1 / 255 + 1e-5 and (diff > 1e-5).float().mean() < 0.01
    # Resized once, on the exact 0-255 values: no tie is lost to a normalised round trip.
    torch.testing.assert_close(seen[0], ref, rtol=0, atol=1e-6)


def test_colours_come_from_the_checkpoint_palette(images: Path, tmp_path: Path) -> None:
    """A checkpoint's meta["palette"] colours its predictions, not Cityscapes' table."""
    torch.manual_seed(0)
    palette = [[i, 255 - i, 7] for i in range(0, 190, 10)]  # 19 colours, none of Cityscapes'
    path = tmp_path / "own.pth"
    model = ERFNet()
    torch.nn.init.normal_(model.head.classifier.weight, std=1.0)
    save_checkpoint(path, model.eval(), meta={"palette": palette})
    run(images / "a.png", "--checkpoint", path, "--out", tmp_path / "o", "--scale", "32", "64")
    color = np.asarray(Image.open(tmp_path / "o" / "a_color.png"))
    used = {tuple(c) for c in color.reshape(-1, 3).tolist()}
    assert used <= {tuple(c) for c in palette} and len(used) >= 2


def test_an_onnx_export_predicts_what_its_checkpoint_predicts(
    images: Path, checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnx", reason="the optional onnx package is not installed")
    pytest.importorskip("onnxruntime", reason="the optional onnxruntime package is not installed")
    from erfnet.checkpoint import load_model
    from erfnet.deploy.onnx import export_onnx

    model = load_model(checkpoint)
    onnx_path = export_onnx(model, tmp_path / "m.onnx", 48, 96, meta=model.meta)
    cmd = [
        sys.executable,
        str(SCRIPT),
        str(images / "a.png"),
        "--model",
        str(onnx_path),
        "--out",
        str(tmp_path / "onnx"),
        "--scale",
        "48",
        "96",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run(
        images / "a.png",
        "--checkpoint",
        checkpoint,
        "--out",
        tmp_path / "pth",
        "--scale",
        "48",
        "96",
        "--no-fast",
    )
    ours = np.asarray(Image.open(tmp_path / "onnx" / "a_color.png"))
    ref = np.asarray(Image.open(tmp_path / "pth" / "a_color.png"))
    assert ours.shape == ref.shape == (64, 128, 3)
    assert (ours == ref).all(axis=-1).mean() > 0.999
    proc = subprocess.run(
        [*cmd[:-3], "--device", "cuda"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode != 0 and "--model runs on the CPU" in proc.stderr
    assert "Traceback" not in proc.stderr


def _failure(*args: str, cwd: Path) -> str:
    """predict.py run as a user runs it, expected to stop with one error line (rc 1 or 2)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("predict:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]  # + progress
    return lines[0]


def test_outputs_are_checked_before_the_work_and_never_an_input(
    images: Path, checkpoint: Path, tmp_path: Path, readonly_dir: Path
) -> None:
    msg = _failure(images, "--checkpoint", checkpoint, "--out", readonly_dir / "o", cwd=tmp_path)
    assert msg.startswith(f"error: --out {readonly_dir / 'o'}: cannot write in"), msg
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match=f"--out {a_file}/o: '{a_file}' is a file, not a folder"):
        run(images, "--checkpoint", checkpoint, "--out", a_file / "o")
    with pytest.raises(SystemExit, match=f"--out {images} is the input {images}"):
        run(images, "--checkpoint", checkpoint, "--out", images)
    before = sorted(p.relative_to(images) for p in images.rglob("*"))
    with pytest.raises(SystemExit, match="is the input"):
        run(images / "a.png", "--checkpoint", checkpoint, "--out", images / "a.png")
    assert sorted(p.relative_to(images) for p in images.rglob("*")) == before


def test_images_too_thin_or_too_large_are_one_line(checkpoint: Path, tmp_path: Path) -> None:
    Image.new("RGB", (5000, 1)).save(tmp_path / "thin.png")
    msg = _failure(
        tmp_path / "thin.png", "--checkpoint", checkpoint, "--out", tmp_path / "o", cwd=tmp_path
    )
    assert "thin.png: a 1x5000 image resized to the test scale 1024x2048 is 0x2048" in msg
    # A JPEG whose header claims 20000x20000 pixels: over PIL's decompression-bomb limit.
    Image.new("RGB", (16, 16)).save(tmp_path / "bomb.jpg", quality=50)
    data = bytearray((tmp_path / "bomb.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2  # height, width
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    msg = _failure(
        tmp_path / "bomb.jpg", "--checkpoint", checkpoint, "--out", tmp_path / "o", cwd=tmp_path
    )
    assert "bomb.jpg" in msg and ("400000000" in msg or "20000x20000" in msg), msg


def test_absurd_or_broken_checkpoints_are_refused(images: Path, tmp_path: Path) -> None:
    from erfnet.checkpoint import make_checkpoint

    huge = make_checkpoint(ERFNet())
    huge["model_args"]["num_classes"] = 10**9
    torch.save(huge, tmp_path / "huge.pth")
    msg = _failure(
        images, "--checkpoint", tmp_path / "huge.pth", "--out", tmp_path / "o", cwd=tmp_path
    )
    assert "num_classes 1000000000 is not a class count (1..255)" in msg
    model = ERFNet()
    with torch.no_grad():
        model.encoder[0].conv.bias[0] = float("inf")
    save_checkpoint(tmp_path / "inf.pth", model)
    with pytest.raises(SystemExit, match=r"hold NaN or infinite values \(first: encoder.0.conv"):
        run(images, "--checkpoint", tmp_path / "inf.pth", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_threads_follow_the_one_cpu_plan(
    images: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from erfnet import runtime

    monkeypatch.setattr(runtime, "available_cores", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    common = [images / "a.png", "--checkpoint", checkpoint, "--scale", "32", "64"]
    try:
        run(*common, "--out", tmp_path / "a")
        assert torch.get_num_threads() == 2  # 3 cores, one left free
        run(*common, "--out", tmp_path / "b", "--threads", "1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_readme_notebook_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    """The README's notebook block, executed verbatim on a random 19-class checkpoint and a
    small image under the file names it uses."""
    import re

    from erfnet.checkpoint import cityscapes_meta

    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint(
        tmp_path / "checkpoints" / "erfnet_mmseg_cityscapes.pth",
        ERFNet().eval(),
        meta=cityscapes_meta(),
    )
    rgb = np.random.default_rng(0).integers(0, 256, (48, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "frankfurt_000000_000294_leftImg8bit.png")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Use a checkpoint from Python.*?```python\n(.*?)```", readme, re.S)
    assert block, "no notebook example in the README"
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert scope["pred"].shape == (48, 96) and scope["color"].shape == (48, 96, 3)
