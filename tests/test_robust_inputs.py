"""Bad input files found early with one line naming them (issue 20): truncated JPEGs and other
non-PNG images in the data check, images over the size bound, huge classes files, damaged or
malformed decoded caches, and numbers the scripts must refuse at their flags."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erfnet.data.check import check_datasets, image_header
from erfnet.data.decode import MAX_IMAGE_PIXELS, DatasetError, load_image, pixel_limit
from erfnet.data.fast.cache import CachedCityscapesDataset, CacheError, write_cache
from erfnet.data.folder import FolderDataset
from scripts import benchmark, class_weights, prepare_cityscapes

REPO = Path(__file__).resolve().parents[1]
SIZE = (24, 32)  # (H, W) of the tiny images
FIVE = {"names": ["a", "b", "c", "d", "e"], "palette": [[0, 0, 0]] * 5, "image_suffix": ".jpg"}


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The failed run's last stderr line, after checking that there is no traceback."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def _jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=90)
    return out.getvalue()


def _folder_dataset(root: Path, fmt: str = "JPEG") -> Path:
    """images/{train,val}/*.jpg (or another PIL format) with grey PNG labels; the classes file."""
    rng = np.random.default_rng(0)
    suffix = {"JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}[fmt]
    for split, count in (("train", 2), ("val", 2)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rgb = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / "images" / split / f"{i}{suffix}", fmt)
            label = rng.integers(0, 5, SIZE, dtype=np.uint8)
            Image.fromarray(label).save(root / "labels" / split / f"{i}.png")
    classes = root / "classes.json"
    classes.write_text(json.dumps({**FIVE, "image_suffix": suffix}))
    return classes


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF", "WEBP"])
def test_data_check_finds_truncated_non_png_images(tmp_path: Path, fmt: str) -> None:
    """Issue 20.10: only PNG checksums were verified; a truncated JPEG passed the check."""
    classes = _folder_dataset(tmp_path, fmt)
    val = FolderDataset(tmp_path, classes, "val")
    assert check_datasets({"val": val}, progress=False) == {"val": 4}
    bad = val.samples[1].image
    _truncate(bad)
    with pytest.raises(DatasetError, match="found 1 problem") as e:
        check_datasets({"val": val}, progress=False)
    assert f"val: cannot decode '{bad}' (corrupt or truncated?)" in str(e.value)


def test_train_stops_at_the_data_check_for_a_truncated_val_jpeg(tmp_path: Path) -> None:
    classes = _folder_dataset(tmp_path / "data")
    bad = tmp_path / "data" / "images" / "val" / "1.jpg"
    _truncate(bad)
    proc = _run(
        "train.py",
        "--data",
        "folder",
        "--data-root",
        tmp_path / "data",
        "--classes",
        classes,
        "--device",
        "cpu",
        "--work-dir",
        tmp_path / "work",
        "--iters",
        "2",
        "--batch-size",
        "1",
        "--crop-size",
        "16",
        "16",
        "--workers",
        "0",
        "--no-progress",
    )
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "data check found 1 problem" in proc.stderr and f"cannot decode '{bad}'" in line
    assert not list((tmp_path / "work").rglob("*.pth"))  # stopped before training


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG with valid checksums whose header claims width x height (a few bytes of data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data + _chunk(b"IEND", b""))
    return path


def _png_blank(path: Path, width: int, height: int) -> Path:
    """A complete 1-bit grey PNG of width x height zeros (small to write at any size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    squeeze = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )
    return path


def _png_short_data(path: Path, width: int = 32, height: int = 24) -> Path:
    """An RGB PNG whose chunks and checksums are valid but whose image data holds half the rows
    (torchvision's libpng decoder kills the process on it: "Not enough image data")."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\0" + bytes(3 * width) for _ in range(height // 2))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )
    return path


def _jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(_jpeg(np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def test_images_over_pil_bomb_limit_are_refused_in_one_line_before_pil(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is PIL's own limit (89,478,485 pixels by default), read from the header before
    PIL opens the file: one DatasetError line and no DecompressionBombWarning, whether the size
    is between PIL's warning and error thresholds or beyond; a process that raises PIL's limit
    raises the bound with it, up to MAX_IMAGE_PIXELS."""
    limit = pixel_limit()
    assert limit == Image.MAX_IMAGE_PIXELS <= MAX_IMAGE_PIXELS
    inside = _png_blank(tmp_path / "inside.png", 9000, 9000)  # 81 M pixels
    assert image_header(inside) == ((9000, 9000), "1")
    for side in (10000, 30000):  # over PIL's limit; over twice it
        for path in (
            _png_header_only(tmp_path / f"huge{side}.png", side, side),
            _jpeg_claiming(tmp_path / f"huge{side}.jpg", side, side),
        ):
            for read in (image_header, load_image):
                with pytest.raises(DatasetError) as e:
                    read(path)
                assert str(e.value).startswith(
                    f"'{path}' is {side}x{side} (WxH) = {side * side:,} pixels, more than the"
                    f" {limit:,} an image may have here"
                )
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**8 + 1)
    assert image_header(_png_blank(tmp_path / "raised.png", 10000, 10000))[0] == (10000, 10000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert pixel_limit() == MAX_IMAGE_PIXELS


def test_data_check_finds_png_data_shorter_than_its_size(tmp_path: Path) -> None:
    """Valid chunks and checksums, half the pixel data: the data check names the file, before a
    loader's libpng would abort the whole process on it; complete PNGs of every kind pass."""
    rng = np.random.default_rng(0)
    for mode, shape in (("RGB", (*SIZE, 3)), ("L", SIZE), ("RGBA", (*SIZE, 4))):
        for interlace in (0, 1):
            good = tmp_path / f"{mode}{interlace}.png"
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                good, interlace=interlace
            )
            assert image_header(good)[0] == SIZE
    palette = tmp_path / "P.png"
    Image.fromarray(rng.integers(0, 5, SIZE, dtype=np.uint8)).convert("P").save(palette)
    sixteen = tmp_path / "I16.png"
    Image.fromarray(rng.integers(0, 60000, SIZE).astype(np.uint16)).save(sixteen)
    assert image_header(palette)[0] == image_header(sixteen)[0] == SIZE
    short = _png_short_data(tmp_path / "short.png")  # 12 of 24 rows of 1 + 3 * 32 bytes
    with pytest.raises(DatasetError, match=r"holds 1164 of the 2328 bytes a 32x24 PNG needs"):
        image_header(short)


def test_train_stops_at_the_data_check_for_short_png_data(tmp_path: Path) -> None:
    classes = _folder_dataset(tmp_path / "data")
    bad = _png_short_data(tmp_path / "data" / "labels" / "val" / "1.png")
    proc = _run(
        "train.py",
        "--data",
        "folder",
        "--data-root",
        tmp_path / "data",
        "--classes",
        classes,
        "--device",
        "cpu",
        "--work-dir",
        tmp_path / "work",
        "--iters",
        "2",
        "--workers",
        "0",
        "--no-progress",
    )
    assert proc.returncode == 1  # not -11: the file never reached libpng
    assert f"cannot decode '{bad}' (truncated?)" in _error_line(proc)


def test_eval_and_predict_name_short_png_data_instead_of_dying(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """eval.py checks its split's files and predict.py each PNG before decoding: a PNG whose
    data is too short is one line (rc 1), not a process killed inside libpng (rc -11)."""
    from erfnet.checkpoint import cityscapes_meta, save_checkpoint
    from erfnet.model import ERFNet

    ckpt = tmp_path / "m.pth"
    save_checkpoint(ckpt, ERFNet().eval(), meta=cityscapes_meta())
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    bad = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    _png_short_data(bad, width=128, height=64)
    proc = _run(
        "eval.py",
        "--checkpoint",
        ckpt,
        "--data-root",
        root,
        "--scale",
        "64",
        "128",
        "--workers",
        "0",
    )
    assert proc.returncode == 1 and f"cannot decode '{bad}' (truncated?)" in _error_line(proc)
    proc = _run("scripts/predict.py", bad, "--checkpoint", ckpt, "--out", tmp_path / "pred")
    assert proc.returncode == 1 and f"cannot decode '{bad}' (truncated?)" in _error_line(proc)


def test_data_check_names_an_oversized_image_in_train(tmp_path: Path) -> None:
    classes = _folder_dataset(tmp_path / "data")
    huge = _jpeg_claiming(tmp_path / "data" / "images" / "val" / "0.jpg", 30000, 30000)
    proc = _run(
        "train.py",
        "--data",
        "folder",
        "--data-root",
        tmp_path / "data",
        "--classes",
        classes,
        "--device",
        "cpu",
        "--work-dir",
        tmp_path / "work",
        "--iters",
        "2",
        "--workers",
        "0",
        "--no-progress",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"'{huge}' is 30000x30000 (WxH) = 900,000,000 pixels" in proc.stderr


def test_huge_classes_file_is_refused_at_once(tmp_path: Path) -> None:
    """Issue 20.7: 300,001 names with one repeat listed duplicates quadratically (minutes)."""
    names = [f"class{i}" for i in range(300_000)] + ["class7"]
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"names": names, "palette": [[0, 0, 0]] * len(names)}))
    (tmp_path / "images" / "train").mkdir(parents=True)
    start = time.perf_counter()
    proc = _run(
        "train.py",
        "--data",
        "folder",
        "--data-root",
        tmp_path,
        "--classes",
        classes,
        "--device",
        "cpu",
        "--work-dir",
        tmp_path / "work",
        "--iters",
        "2",
        timeout=60,
    )
    assert time.perf_counter() - start < 60
    assert '300001 "names"; at most 255 classes' in _error_line(proc)


# ---------------------------------------------------------- outputs: never an input, checked first


class _Creates:
    """Unpickling this creates ``marker``: a stand-in for a file that would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_converter_never_suggests_an_unsafe_load(tmp_path: Path) -> None:
    """A legacy-format pickle that would run code relayed torch's advice to use
    weights_only=False, cut mid-sentence; now one line: not a plain weights file, will not be
    unpickled."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "x": _Creates(marker)},
        evil,
        _use_new_zipfile_serialization=False,
    )
    proc = _run(
        "scripts/convert_checkpoint.py", "--from", "erfnet_pytorch", evil, tmp_path / "out.pth"
    )
    line = _error_line(proc)
    assert line.startswith(f"error: refusing to load {evil}: it is not a plain weights file")
    assert "will not be unpickled" in line and "weights_only" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_converter_output_is_checked_before_loading(tmp_path: Path) -> None:
    """The output may not be the input under another name (a hard link) and must be writable
    before the input is read."""
    source = tmp_path / "in.pth"
    source.write_bytes(b"not read: the output is refused first")
    link = tmp_path / "link.pth"
    link.hardlink_to(source)
    proc = _run("scripts/convert_checkpoint.py", "--from", "mmseg", source, link)
    assert "output path must differ from the input" in _error_line(proc)
    proc = _run("scripts/convert_checkpoint.py", "--from", "mmseg", source, "/proc/out.pth")
    assert _error_line(proc).startswith("error: output /proc/out.pth: cannot write in")
    assert source.read_bytes() == b"not read: the output is refused first"


def test_benchmark_json_is_checked_before_the_benchmark(tmp_path: Path) -> None:
    """``benchmark.py --json`` on an unwritable location failed after the full benchmark."""
    (tmp_path / "file").write_text("x")
    where = tmp_path / "file" / "b.json"
    proc = _run("scripts/benchmark.py", "--quick", "--json", where, timeout=60)
    assert proc.returncode == 1 and f"error: --json {where}" in _error_line(proc)
    assert "erfnet benchmark on" not in proc.stdout  # nothing was measured
    with pytest.raises(SystemExit, match=f"error: --json {tmp_path} is a folder"):
        benchmark.main(["--quick", "--json", str(tmp_path)])


def test_data_scripts_check_their_outputs_first(synthetic_root: Path, tmp_path: Path) -> None:
    """prepare_cityscapes.py --cache inside the dataset's folders, or unwritable, is refused
    before the trainId pass; make_synthetic_cityscapes.py names an unusable --root."""
    cases = (
        (synthetic_root / "gtFine" / "cache", "is inside the input --root folder"),
        (synthetic_root, "is the dataset root"),
        (Path("/proc/cache"), ": cannot write in"),
    )
    for i, (cache, reason) in enumerate(cases):
        sep = "" if reason.startswith(":") else " "
        if i == 0:  # once through the real entry point, the others through its main()
            proc = _run("scripts/prepare_cityscapes.py", "--root", synthetic_root, "--cache", cache)
            assert _error_line(proc).startswith(f"error: --cache {cache}{sep}{reason}")
            assert "wrote" not in proc.stdout
            continue
        with pytest.raises(SystemExit) as e:
            prepare_cityscapes.main(["--root", str(synthetic_root), "--cache", str(cache)])
        assert str(e.value).startswith(f"error: --cache {cache}{sep}{reason}")
    assert not (synthetic_root / "gtFine" / "cache").exists()
    proc = _run(
        "scripts/make_synthetic_cityscapes.py",
        "--root",
        "/proc/synthetic",
        "--train",
        "1",
        "--val",
        "0",
        "--size",
        "16",
        "32",
    )
    assert _error_line(proc).startswith("error: --root /proc/synthetic: cannot write in")


# ---------------------------------------------------------------------- the decoded cache


@pytest.fixture
def cached(synthetic_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a private copy of the synthetic root, its decoded train cache folder)."""
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    write_cache(root, tmp_path / "cache", "train", workers=0, progress=False)
    return root, tmp_path / "cache"


def _train_on_cache(root: Path, cache: Path, work: Path) -> subprocess.CompletedProcess:
    return _run(
        "train.py",
        "--data-root",
        root,
        "--data-cache",
        cache,
        "--device",
        "cpu",
        "--work-dir",
        work,
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--crop-size",
        "32",
        "32",
        "--workers",
        "0",
        "--val-interval",
        "100",
        "--no-progress",
    )


def test_cache_bytes_damaged_in_place_stop_with_one_line(cached, tmp_path: Path) -> None:
    """A data file overwritten in place with the same size trained on damaged pixels unnoticed;
    each sample's CRC-32 is now checked when it is read."""
    root, cache = cached
    images = cache / "train" / "images.u8"
    size, mtime = images.stat().st_size, images.stat().st_mtime_ns
    with open(images, "r+b") as f:  # one byte of the last sample, in place
        f.seek(size - 10)
        byte = f.read(1)
        f.seek(size - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(images, ns=(mtime, mtime))
    ds = CachedCityscapesDataset(root, "train", cache)  # the layout is intact: accepted
    with pytest.raises(CacheError, match=r"the bytes of .* do not match their checksum"):
        ds.load(len(ds) - 1)
    proc = _train_on_cache(root, cache, tmp_path / "work")
    line = _error_line(proc)
    assert f"decoded cache '{images}': the bytes of" in line and "checksum" in line


def test_malformed_cache_manifests_are_one_line(cached, tmp_path: Path) -> None:
    root, cache = cached
    manifest = cache / "train" / "manifest.json"
    good = json.loads(manifest.read_text())
    no_name = {
        **good,
        "samples": [{k: v for k, v in e.items() if k != "name"} for e in good["samples"]],
    }
    fewer = {**good, "samples": good["samples"][:-1]}
    cases = [
        (good["samples"], "is not a manifest"),
        (no_name, "sample 0 lacks a name"),
        (fewer, f"its manifest's {len(fewer['samples'])} samples need"),
    ]
    for content, message in cases:
        manifest.write_text(json.dumps(content))
        with pytest.raises(CacheError, match=re.escape(message)):
            CachedCityscapesDataset(root, "train", cache)
    manifest.write_text(json.dumps(cases[0][0]))  # once through train.py: a JSON list
    proc = _train_on_cache(root, cache, tmp_path / "work")
    assert f"decoded cache '{manifest}' is not a manifest" in _error_line(proc)


# ------------------------------------------------------------------------- numbers at the flags


def test_class_weights_refuses_a_non_finite_c(synthetic_root: Path, tmp_path: Path) -> None:
    """``--c inf`` wrote all-zero weights that train.py then refused."""
    out = tmp_path / "w.json"
    proc = _run("scripts/class_weights.py", synthetic_root, "--c", "inf", "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --c: expected a finite number > 1, e.g. 1.10; got 'inf'" in proc.stderr
    assert not out.exists()
    for bad in ("nan", "-3", "1"):
        with pytest.raises(SystemExit) as e:
            class_weights.get_args_parser().parse_args([str(synthetic_root), "--c", bad])
        assert e.value.code == 2
