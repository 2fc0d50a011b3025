"""Training throughput: the decoded cache, device-side augmentation (run on CPU tensors) and the
data-stall share, through the real entry points (tiny, CPU)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_cli
from erfnet.data.cityscapes import CityscapesDataset, DatasetError
from erfnet.data.fast.cache import CachedCityscapesDataset, CacheError, write_cache
from erfnet.data.fast.device_aug import DeviceAugDataset, DeviceAugment, collate, resolve_gpu_aug
from erfnet.data.transforms import EvalTransform, TrainTransform
from erfnet.training.resume import build_train_loader

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--data",
    "synthetic",
    "--iters",
    "4",
    "--batch-size",
    "2",
    "--crop-size",
    "32",
    "64",
    "--scale",
    "64",
    "128",
    "--val-interval",
    "2",
    "--ckpt-interval",
    "2",
    "--log-interval",
    "1",
    "--num-vis",
    "1",
    "--no-progress",
]


def _same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def cached(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a copy of the synthetic root, its decoded train cache) written by the script."""
    base = tmp_path_factory.mktemp("cached")
    root = Path(shutil.copytree(synthetic_root, base / "cityscapes"))
    cmd = [
        sys.executable,
        "scripts/prepare_cityscapes.py",
        "--root",
        str(root),
        "--cache",
        str(base / "cache"),
        "--workers",
        "2",
        "--quiet",
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 images" in r.stdout
    return root, base / "cache"


@pytest.fixture
def plain_run(tiny_run: Path) -> Path:
    """A 4-iteration run on today's path (PNG decode, augmentation in the loader): conftest's
    session-wide ``tiny_run``, whose flags are ``TINY``."""
    return tiny_run


# ---------------------------------------------------------------- device-side augmentation


def _batches(dataset, n: int, **kw) -> list[dict]:
    loader, _ = build_train_loader(dataset, batch_size=4, workers=0, seed=3, **kw)
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
    "crop, scale, photometric",
    [((32, 64), (64, 128), True), ((40, 96), (48, 96), True), ((32, 64), (64, 128), False)],
)
def test_device_path_batches_equal_worker_path(synthetic_root: Path, crop, scale, photometric):
    """Same seed, same batches: the worker path (TrainTransform in the loader) and the device
    path (workers decode and draw, DeviceAugment on CPU tensors), value for value. The second
    case resizes below the crop (padding) and mixes rows-first and columns-first samples."""
    tf = TrainTransform(crop_size=crop, scale=scale, photometric=photometric)
    ds = CityscapesDataset(synthetic_root, "train", transform=tf)
    ref = _batches(ds, 3)
    got = _batches(DeviceAugDataset(ds), 3, collate_fn=collate)
    augment = DeviceAugment(tf)
    for r, g in zip(ref, got, strict=True):
        img, lab = augment(g, torch.device("cpu"))
        assert img.dtype == r["image"].dtype and lab.dtype == r["label"].dtype
        assert torch.equal(img, r["image"])
        assert torch.equal(lab, r["label"])
    assert any(bool((g["valid"] < torch.tensor(crop)).any()) for g in got) == (crop[0] == 40)


def test_device_path_needs_a_train_transform(synthetic_root: Path):
    val = CityscapesDataset(synthetic_root, "val", transform=EvalTransform(None))
    with pytest.raises(DatasetError, match="--gpu-aug needs a dataset"):
        DeviceAugDataset(val)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_gpu_aug(None, cuda, val) is None  # auto: falls back to the workers
    assert resolve_gpu_aug(None, cpu, val) is None and resolve_gpu_aug(False, cuda, val) is None
    with pytest.raises(DatasetError):
        resolve_gpu_aug(True, cpu, val)
    train = CityscapesDataset(synthetic_root, "train", transform=TrainTransform())
    assert isinstance(resolve_gpu_aug(None, cuda, train), DeviceAugment)
    assert resolve_gpu_aug(None, cpu, train) is None


# ---------------------------------------------------------------- decoded cache


def test_cache_round_trip_gives_the_png_tensors(cached: tuple[Path, Path]):
    root, cache = cached
    tf = TrainTransform(crop_size=(32, 64), scale=(64, 128))
    png = CityscapesDataset(root, "train", transform=tf)
    mapped = CachedCityscapesDataset(root, "train", cache, transform=tf)
    assert len(mapped) == len(png) == 4
    for i in range(len(png)):
        (a, b), (c, d) = png.load(i), mapped.load(i)
        assert a.dtype == c.dtype == b.dtype == d.dtype == torch.uint8
        assert torch.equal(a, c) and torch.equal(b, d)
        torch.manual_seed(i)
        x = png[i]
        torch.manual_seed(i)
        y = mapped[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    # The files hold exactly the decoded arrays: 4 x (3 + 1) x 64 x 128 bytes.
    manifest = json.loads((cache / "train" / "manifest.json").read_text())
    assert manifest["image_bytes"] + manifest["label_bytes"] == 4 * 4 * 64 * 128
    assert {s["image"]["path"].split("/")[0] for s in manifest["samples"]} == {"leftImg8bit"}


def test_stale_truncated_and_partial_caches_are_refused(
    cached: tuple[Path, Path], tmp_path: Path, capsys
):
    root, cache = cached
    root2 = Path(shutil.copytree(root, tmp_path / "cityscapes"))
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)  # the copy keeps the sizes; copytree keeps mtimes too
    CachedCityscapesDataset(root2, "train", folder)  # a fresh cache is accepted
    image = sorted((root2 / "leftImg8bit" / "train").rglob("*.png"))[1]
    image.write_bytes(image.read_bytes())  # same content, new mtime: stale
    with pytest.raises(CacheError, match=r"stale: '.*leftImg8bit.png' changed since"):
        CachedCityscapesDataset(root2, "train", folder)
    # train.py says it in one line, naming the cache and how to rebuild it.
    argv = [
        *TINY,
        "--data-root",
        str(root2),
        "--data-cache",
        str(folder),
        "--workers",
        "0",
        "--work-dir",
        str(tmp_path / "work"),
    ]
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(argv)
    msg = str(exc.value.code)
    assert msg.startswith("error: decoded cache") and "stale" in msg and "--cache DIR" in msg
    assert "\n" not in msg
    write_cache(root2, folder, "train", progress=False)
    CachedCityscapesDataset(root2, "train", folder)  # rebuilt: accepted again
    data = folder / "train" / "images.u8"
    os.truncate(data, data.stat().st_size - 100)
    with pytest.raises(CacheError, match="truncated or partial"):
        CachedCityscapesDataset(root2, "train", folder)
    (folder / "train" / "manifest.json").unlink()  # an interrupted writer leaves no manifest
    with pytest.raises(CacheError, match="no manifest.json"):
        CachedCityscapesDataset(root2, "train", folder)
    # A cache of fewer images than the data now has (one city added since).
    for kind in ("leftImg8bit", "gtFine"):
        (root2 / kind / "train" / "aachen").rename(tmp_path / kind)
    write_cache(root2, folder, "train", progress=False)
    for kind in ("leftImg8bit", "gtFine"):
        shutil.move(tmp_path / kind, root2 / kind / "train" / "aachen")
    with pytest.raises(CacheError, match=r"stale: it holds \d+ images, .* has 4 \(aachen"):
        CachedCityscapesDataset(root2, "train", folder)


# ---------------------------------------------------------------- training: exact, and the stall


def test_stall_share_is_logged(plain_run: Path):
    log = (plain_run / "train.log").read_text()
    shares = [int(s) for s in re.findall(r"s/it \(data [0-9.]+, stall (\d+)%\)", log)]
    assert len(shares) == 4 and all(0 <= s <= 100 for s in shares)


@pytest.mark.parametrize("extra, workers", [(["--gpu-aug"], "1"), (["--data-cache"], "0")])
def test_kill_and_resume_is_exact_with_gpu_aug_and_cache(
    extra, workers, cached: tuple[Path, Path], plain_run: Path, tmp_path: Path, run_train
):
    """SIGTERM at iteration 2, then --resume, with --gpu-aug (augmentation on CPU tensors in the
    main process) or the decoded cache: bit for bit the weights of the plain uninterrupted run."""
    root, cache = cached
    extra = [*extra, str(cache)] if extra == ["--data-cache"] else extra
    args = [*TINY, "--data-root", str(root), "--work-dir", str(tmp_path), *extra]
    r = run_train([*args, "--workers", workers], fault="sigterm@2")
    assert r.returncode == 143, r.stderr[-3000:]
    expected = "the device (cpu)" if "--gpu-aug" in extra else "the workers"
    assert f"augmentation on {expected}" in r.stderr
    assert not _same_weights(tmp_path / "latest.pth", plain_run / "latest.pth")
    r = run_train([*args, "--workers", "0", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "differ from the checkpoint" not in r.stderr
    assert _same_weights(tmp_path / "latest.pth", plain_run / "latest.pth")


def test_optional_pyspng_decoder_gives_libpngs_values(synthetic_root: Path, tmp_path: Path):
    """With pyspng installed, the loader decodes plain 8-bit RGB / grey PNGs with it: the same
    tensors as torchvision's libpng, and a truncated file is still a clear DatasetError."""
    pytest.importorskip("pyspng")
    import warnings

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_png, read_file

    from erfnet.data import decode

    files = sorted(synthetic_root.rglob("*_leftImg8bit.png")) + sorted(
        synthetic_root.rglob("*_labelIds.png")
    )
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 4), (1, 2, 3, 4)).save(rgba)  # not plain RGB: libpng decodes it
    for path in [*files, rgba]:
        mode = ImageReadMode.UNCHANGED if "gtFine" in path.name else ImageReadMode.RGB
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            data = read_file(str(path))
            ref = decode_png(data, mode=mode)
        fast = decode._spng_decode(data, mode)
        assert (fast is None) == (path == rgba)
        assert torch.equal(decode.read_png(path, mode), ref)
        if fast is not None:
            assert fast.dtype == ref.dtype and torch.equal(fast, ref)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(files[0].read_bytes()[:5000])
    with pytest.raises(DatasetError, match="cannot decode"):
        decode.load_image(bad)
