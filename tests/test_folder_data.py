"""Folder datasets (``--data folder --classes FILE``): the classes file, pairing, label values,
the three public layouts of docs/data.md on tiny look-alike trees, each problem as one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_cli
from erfnet.config import IGNORE_INDEX
from erfnet.data.cityscapes import DatasetError, load_image
from erfnet.data.folder import FolderDataset, load_spec

REPO = Path(__file__).resolve().parents[1]
SIZE = (24, 32)  # (H, W) of the look-alike images


def docs_json(title: str) -> dict:
    """The ```json block after the docs/data.md paragraph starting with **title**."""
    text = (REPO / "docs" / "data.md").read_text()
    section = text.split("## Folder datasets", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"\*\*{re.escape(title)}\*\*.*?```json\n(.*?)```", section, re.S)
    assert match, f"no JSON example for {title} in docs/data.md"
    return json.loads(match.group(1))


def write_image(path: Path, rng: np.random.Generator) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, size=(*SIZE, 3), dtype=np.uint8)
    if path.suffix == ".jpg":
        Image.fromarray(rgb).save(path, quality=95)
    else:
        Image.fromarray(rgb).save(path)
    return rgb


def write_label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:  # colours unlike the indices: reading colours instead would show
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in ((i * 7) % 256, 255 - i, (i * 3) % 256)])
    im.save(path)


def random_values(rng: np.random.Generator, allowed: list[int]) -> np.ndarray:
    return rng.choice(np.array(allowed), size=SIZE)


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


# ---------------------------------------------------------------- the three layouts of docs/data.md


def test_bdd100k_layout_loads_with_the_docs_json(tmp_path: Path):
    spec = docs_json("BDD100K")
    rng = np.random.default_rng(0)
    stored = {}
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            name = f"{i:08x}-0000{i}"
            write_image(tmp_path / "images/10k" / split / f"{name}.jpg", rng)
            values = random_values(rng, [*range(19), 255])
            write_label(tmp_path / "labels/sem_seg/masks" / split / f"{name}.png", values)
            stored[(split, name)] = values
    path = write_spec(tmp_path / "bdd100k.json", spec)
    for split in ("train", "val"):
        ds = FolderDataset(tmp_path, path, split)
        assert len(ds.classes) == 19 and ds.classes[0] == "road"
        for i, s in enumerate(ds.samples):
            image, label = ds.load(i)
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *SIZE)
            assert np.array_equal(label.numpy(), stored[(split, s.name)])  # ids kept, 255 kept


def test_camvid_segnet_layout_loads_with_the_docs_json(tmp_path: Path):
    spec = docs_json("CamVid")
    assert len(spec["names"]) == 11
    rng = np.random.default_rng(1)
    stored = {}
    for split in ("train", "val", "test"):
        for i in range(2):
            name = f"0001TP_{i:06d}"
            write_image(tmp_path / split / f"{name}.png", rng)
            values = random_values(rng, list(range(12)))  # 11 = void
            write_label(tmp_path / f"{split}annot" / f"{name}.png", values)
            stored[(split, name)] = values
    path = write_spec(tmp_path / "camvid.json", spec)
    for split in ("train", "val", "test"):
        ds = FolderDataset(tmp_path, path, split)
        assert len(ds) == 2
        for i, s in enumerate(ds.samples):
            _, label = ds.load(i)
            values = stored[(split, s.name)]
            expected = np.where(values == 11, IGNORE_INDEX, values)  # void -> the ignore value
            assert np.array_equal(label.numpy(), expected)
    assert FolderDataset(tmp_path, path, "train").ignore_index == IGNORE_INDEX


def test_mapillary_layout_reads_palette_indices_not_colours(tmp_path: Path):
    spec = docs_json("Mapillary Vistas")
    assert len(spec["names"]) == len(spec["palette"]) == 65
    rng = np.random.default_rng(2)
    stored = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        name = f"{split}_img"
        write_image(tmp_path / folder / "images" / f"{name}.jpg", rng)
        values = random_values(rng, list(range(66)))
        write_label(tmp_path / folder / "labels" / f"{name}.png", values, palette=True)
        assert Image.open(tmp_path / folder / "labels" / f"{name}.png").mode == "P"
        stored[split] = values
    path = write_spec(tmp_path / "mapillary.json", spec)
    for split in ("train", "val"):
        ds = FolderDataset(tmp_path, path, split)
        _, label = ds.load(0)
        expected = np.where(stored[split] == 65, IGNORE_INDEX, stored[split])
        assert np.array_equal(label.numpy(), expected)


# ---------------------------------------------------------------- label values and pairing


def test_label_map_and_16_bit_labels(tmp_path: Path):
    rng = np.random.default_rng(3)
    write_image(tmp_path / "images/train/a/x.png", rng)
    values = rng.choice(np.array([0, 7, 8, 300, 1000]), size=SIZE).astype(np.uint16)
    (tmp_path / "labels/train/a").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "labels/train/a/x.png")  # 16-bit PNG
    spec = {
        "names": ["road", "sidewalk", "sign"],
        "palette": [[1, 1, 1], [2, 2, 2], [3, 3, 3]],
        "label_map": {"7": 0, "8": 1, "300": 2, "0": 255},
    }
    ds = FolderDataset(tmp_path, write_spec(tmp_path / "c.json", spec), "train")
    assert ds.samples[0].city == "a" and ds.samples[0].name == "x"
    _, label = ds.load(0)
    lut = {0: 255, 7: 0, 8: 1, 300: 2, 1000: 255}  # 1000 is not in the map: ignored
    assert np.array_equal(label.numpy(), np.vectorize(lut.get)(values))


def test_jpeg_images_load_as_uint8_rgb(tmp_path: Path):
    rgb = np.zeros((*SIZE, 3), dtype=np.uint8)
    rgb[:, : SIZE[1] // 2] = (200, 30, 30)  # red left half, blue right half
    rgb[:, SIZE[1] // 2 :] = (30, 30, 200)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=95)
    image = load_image(tmp_path / "x.jpg")
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *SIZE)
    decoded = np.asarray(Image.open(tmp_path / "x.jpg").convert("RGB"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), decoded)
    assert np.abs(decoded.astype(int) - rgb).mean() < 10  # lossy, but the same picture, in RGB


def _tiny_tree(root: Path, values: np.ndarray, spec: dict) -> Path:
    rng = np.random.default_rng(5)
    write_image(root / "images/train/x.png", rng)
    write_label(root / "labels/train/x.png", values)
    return write_spec(root / "classes.json", spec)


FIVE = {"names": ["a", "b", "c", "d", "e"], "palette": [[0, 0, 0]] * 5}


def test_each_problem_is_one_error_naming_the_file(tmp_path: Path):
    values = np.zeros(SIZE, dtype=np.uint8)
    values[0, :3] = 7  # not a train id of 5 classes
    spec = _tiny_tree(tmp_path, values, FIVE)
    ds = FolderDataset(tmp_path, spec, "train")
    with pytest.raises(DatasetError, match=r"label '.*x\.png' has values \[7\]"):
        ds.load(0)
    (tmp_path / "images/train/y.png").write_bytes((tmp_path / "images/train/x.png").read_bytes())
    with pytest.raises(DatasetError, match=r"image '.*y\.png' has no label: expected '.*y\.png'"):
        FolderDataset(tmp_path, spec, "train")
    bad_specs = [
        ({**FIVE, "palette": [[0, 0, 0]] * 4}, '5 "names" but 4 "palette"'),
        ({**FIVE, "colours": []}, "unknown key"),
        ({**FIVE, "ignore_index": 3}, '"ignore_index" must be an integer in 5..255'),
        ({**FIVE, "label_map": {"7": 9}}, '"label_map" maps 7 to 9'),
        ({**FIVE, "label_map": {"x": 1}}, "is not a stored label value"),
        ({"names": "abc", "palette": []}, '"names" must be a non-empty list'),
        ({**FIVE, "splits": {"train": {"images": "i"}}}, '"splits" must map'),
    ]
    for content, message in bad_specs:
        path = write_spec(tmp_path / "bad.json", content)
        with pytest.raises(DatasetError, match=re.escape(message)) as info:
            load_spec(path)
        assert str(path) in str(info.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json' is not valid JSON"):
        load_spec(tmp_path / "broken.json")
    with pytest.raises(DatasetError, match="no split 'val'"):
        FolderDataset(
            tmp_path,
            write_spec(
                tmp_path / "s.json",
                {**FIVE, "splits": {"train": {"images": "images/train", "labels": "labels/train"}}},
            ),
            "val",
        )


def test_train_cli_prints_one_error_line(tmp_path: Path, capsys):
    values = np.zeros(SIZE, dtype=np.uint8)
    spec = _tiny_tree(tmp_path, values, {**FIVE, "palette": [[0, 0, 0]] * 4})
    argv = [
        "--data",
        "folder",
        "--data-root",
        str(tmp_path),
        "--classes",
        str(spec),
        "--device",
        "cpu",
        "--work-dir",
        str(tmp_path / "w"),
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as info:
        train_cli.cli(argv)
    msg = str(info.value.code)
    assert msg.startswith("error: classes file ") and str(spec) in msg and "\n" not in msg
    for bad, expected in (
        (["--data", "folder", "--data-root", str(tmp_path)], "--data folder needs"),
        (["--classes", str(spec)], "add --data folder"),
    ):
        with pytest.raises(SystemExit) as info:
            train_cli.cli([*bad, "--work-dir", str(tmp_path / "w")])
        assert info.value.code == 2 and expected in capsys.readouterr().err
