"""Cityscapes loader: discovery, pairing, label mapping, prepared labels, bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erfnet.data.cityscapes import (
    CityscapesDataset,
    DatasetError,
    find_samples,
    load_label,
    map_label_ids,
    prepare_train_ids,
    resolve_data_root,
    train_ids_path,
    write_train_ids,
)
from erfnet.data.synthetic import CITIES, make_synthetic_cityscapes
from erfnet.data.transforms import EvalTransform

# Independent copy of the official 34 -> 19 table (cityscapesScripts labels.py, REFERENCE.md).
OFFICIAL_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def official(label_id: int) -> int:
    return OFFICIAL_TRAIN_ID.get(label_id, 255)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A private, writable dataset (2 train / 1 val, 16x32 HxW) that tests may break."""
    return make_synthetic_cityscapes(tmp_path / "cs", train=2, val=1, size=(16, 32), seed=1)


def label_file(root: Path, split: str = "train") -> Path:
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))[0]


def image_file(root: Path, split: str = "train") -> Path:
    return sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[0]


# ---------------------------------------------------------------- discovery and items


@pytest.mark.parametrize("split,n", [("train", 4), ("val", 2), ("test", 1)])
def test_discovery_pairs_every_image_with_its_label(synthetic_root: Path, split: str, n: int):
    ds = CityscapesDataset(synthetic_root, split)
    assert len(ds) == n
    on_disk = sorted((synthetic_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    assert sorted(s.image for s in ds.samples) == on_disk
    for s in ds.samples:
        assert s.city in CITIES[split]
        assert s.name.startswith(s.city + "_") and s.image.parent.name == s.city
        assert s.image.name == f"{s.name}_leftImg8bit.png"
        if split == "test":
            assert s.label is None
        else:
            assert s.label == synthetic_root / "gtFine" / split / s.city / (
                f"{s.name}_gtFine_labelIds.png"
            )
            assert s.label_kind == "labelIds"


def test_order_is_sorted_and_deterministic(synthetic_root: Path):
    a = [s.name for s in CityscapesDataset(synthetic_root, "train").samples]
    b = [s.name for s in find_samples(synthetic_root, "train")]
    assert a == b == sorted(a)
    assert a == [
        "aachen_000000_000019",
        "bochum_000000_000019",
        "bremen_000000_000019",
        "cologne_000000_000019",
    ]


def test_items_have_the_documented_types(synthetic_root: Path):
    item = CityscapesDataset(synthetic_root, "val")[1]
    assert item["name"] == "lindau_000000_000019" and item["city"] == "lindau"
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 128)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (64, 128)
    assert item["ori_size"].tolist() == [64, 128]
    values = set(item["label"].unique().tolist())
    assert values <= set(range(19)) | {255} and 255 in values and len(values) > 3
    # The default transform keeps the image as on disk (0-255): the evaluator normalises it.
    raw = np.array(Image.open(CityscapesDataset(synthetic_root, "val").samples[1].image))
    assert torch.equal(item["image"], torch.from_numpy(raw).permute(2, 0, 1))

    test_item = CityscapesDataset(synthetic_root, "test")[0]
    assert "label" not in test_item and test_item["image"].shape == (3, 64, 128)


def test_the_dataset_owns_its_classes(synthetic_root: Path):
    ds = CityscapesDataset(synthetic_root, "val")
    assert len(ds.classes) == len(ds.palette) == 19 and ds.ignore_index == 255
    assert ds.classes[0] == "road" and ds.classes[-1] == "bicycle"
    assert tuple(ds.palette[0]) == (128, 64, 128) and tuple(ds.palette[-1]) == (119, 11, 32)
    # Label values are exactly the class indices and the ignore index.
    assert set(ds[0]["label"].unique().tolist()) <= set(range(len(ds.classes))) | {255}


def test_labels_match_the_official_mapping_of_the_files(synthetic_root: Path):
    ds = CityscapesDataset(synthetic_root, "train")
    for i, s in enumerate(ds.samples):
        ids = np.asarray(Image.open(s.label))
        expected = np.vectorize(official)(ids)
        assert np.array_equal(ds[i]["label"].numpy(), expected)


def test_eval_transform_in_dataset_keeps_label_resolution(synthetic_root: Path):
    ds = CityscapesDataset(synthetic_root, "val", EvalTransform(scale=(128, 256)))
    item = ds[0]
    assert item["image"].shape == (3, 128, 256)
    assert item["label"].shape == (64, 128)


def test_dataloader_batches(synthetic_root: Path):
    ds = CityscapesDataset(synthetic_root, "train")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 64, 128) and batch["label"].shape == (2, 64, 128)
    assert batch["name"] == ["aachen_000000_000019", "bochum_000000_000019"]


# ---------------------------------------------------------------- root resolution


def test_resolve_data_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)
    assert resolve_data_root(None) == Path("data/cityscapes")
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_env_var_finds_the_dataset(monkeypatch: pytest.MonkeyPatch, synthetic_root: Path):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(synthetic_root))
    assert len(CityscapesDataset(resolve_data_root(None), "val")) == 2


# ---------------------------------------------------------------- label mapping


def test_every_label_id_maps_like_the_official_table():
    ids = torch.arange(34, dtype=torch.uint8)
    got = map_label_ids(ids).tolist()
    assert got == [official(i) for i in range(34)]
    ignored = [i for i in range(34) if got[i] == 255]
    assert ignored == [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
    assert map_label_ids(ids.view(2, 17)).shape == (2, 17)


def test_every_label_id_through_a_png(tmp_path: Path):
    ids = np.tile(np.arange(34, dtype=np.uint8), (3, 1))
    path = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(ids).save(path)
    got = load_label(path, "labelIds")
    assert got.dtype == torch.uint8
    assert got.tolist() == [[official(i) for i in range(34)]] * 3


def test_prepared_train_ids_equal_the_lut_path(synthetic_root: Path, tmp_path: Path):
    root = Path(shutil.copytree(synthetic_root, tmp_path / "cs"))
    lut_items = {s: CityscapesDataset(root, s) for s in ("train", "val")}
    res = prepare_train_ids(root, workers=1, progress=False)
    assert res == {"written": 7, "skipped": 0, "errors": []}  # test labels too, like the official
    for split, lut_ds in lut_items.items():
        prepared = CityscapesDataset(root, split)
        assert all(s.label_kind == "trainIds" for s in prepared.samples)
        assert all(s.label.name.endswith("_gtFine_labelTrainIds.png") for s in prepared.samples)
        for i in range(len(prepared)):
            assert torch.equal(prepared[i]["label"], lut_ds[i]["label"])
            ids = np.asarray(Image.open(lut_ds.samples[i].label))
            written = np.asarray(Image.open(prepared.samples[i].label))
            assert written.dtype == np.uint8 and np.array_equal(
                written, np.vectorize(official)(ids)
            )
    test_written = np.asarray(Image.open(train_ids_path(label_file(root, "test"))))
    assert (test_written == 255).all()


def test_prepare_is_idempotent_and_force_rewrites(tiny_root: Path):
    assert prepare_train_ids(tiny_root, progress=False)["written"] == 3
    out = train_ids_path(label_file(tiny_root))
    before = out.stat().st_mtime_ns
    assert prepare_train_ids(tiny_root, progress=False) == {
        "written": 0,
        "skipped": 3,
        "errors": [],
    }
    assert out.stat().st_mtime_ns == before
    assert write_train_ids(label_file(tiny_root)) is False
    assert write_train_ids(label_file(tiny_root), force=True) is True
    before = out.stat().st_mtime_ns
    # A newer _labelIds.png makes its _labelTrainIds.png stale: only that one is rewritten.
    src = label_file(tiny_root)
    os.utime(src, ns=(before + 10**9, before + 10**9))
    assert prepare_train_ids(tiny_root, progress=False)["written"] == 1
    assert prepare_train_ids(tiny_root, force=True, progress=False)["written"] == 3


def test_prepare_reports_bad_files_and_converts_the_rest(tiny_root: Path):
    bad = label_file(tiny_root)
    Image.fromarray(np.full((16, 32), 40, np.uint8)).save(bad)
    res = prepare_train_ids(tiny_root, workers=2, progress=False)
    assert res["written"] == 2 and len(res["errors"]) == 1
    path, msg = res["errors"][0]
    assert path == str(bad) and "[40]" in msg and str(bad) in msg
    assert not train_ids_path(bad).exists()


# ---------------------------------------------------------------- bad input


def test_missing_root(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist") as e:
        CityscapesDataset(tmp_path / "nope", "train")
    assert str(tmp_path / "nope") in str(e.value) and "leftImg8bit/<split>/<city>" in str(e.value)


@pytest.mark.parametrize("sub", ["leftImg8bit", "gtFine", "leftImg8bit/train"])
def test_root_pointing_inside_the_dataset_suggests_the_root(tiny_root: Path, sub: str):
    with pytest.raises(DatasetError, match="not the dataset root") as e:
        CityscapesDataset(tiny_root / sub, "train")
    assert f"use its parent '{tiny_root}'" in str(e.value)


def test_root_without_leftimg8bit(tmp_path: Path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DatasetError, match="no 'leftImg8bit' folder") as e:
        CityscapesDataset(tmp_path, "train")
    assert "something" in str(e.value)


def test_missing_split(tiny_root: Path):
    with pytest.raises(DatasetError, match="does not exist") as e:
        CityscapesDataset(tiny_root, "test")
    assert "splits found: ['train', 'val']" in str(e.value)


def test_empty_split(tiny_root: Path):
    (tiny_root / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split 'test' is empty") as e:
        CityscapesDataset(tiny_root, "test")
    assert str(tiny_root / "leftImg8bit" / "test") in str(e.value)


def test_image_without_label_names_both_paths(tiny_root: Path):
    lab = label_file(tiny_root)
    lab.unlink()
    with pytest.raises(DatasetError, match="has no label") as e:
        CityscapesDataset(tiny_root, "train")
    assert str(image_file(tiny_root)) in str(e.value) and str(lab) in str(e.value)


def test_label_without_image_names_both_paths(tiny_root: Path):
    img = image_file(tiny_root)
    img.unlink()
    with pytest.raises(DatasetError, match="has no image") as e:
        CityscapesDataset(tiny_root, "train")
    assert str(img) in str(e.value) and str(label_file(tiny_root)) in str(e.value)


def test_missing_label_folder(tiny_root: Path):
    shutil.rmtree(tiny_root / "gtFine" / "val")
    with pytest.raises(DatasetError, match="needs labels"):
        CityscapesDataset(tiny_root, "val")
    assert len(CityscapesDataset(tiny_root, "val", labels=False)) == 1


def test_label_values_outside_the_table(tiny_root: Path):
    lab = label_file(tiny_root)
    ids = np.asarray(Image.open(lab)).copy()
    ids[0, :3] = (34, 200, 34)
    Image.fromarray(ids).save(lab)
    ds = CityscapesDataset(tiny_root, "train")
    with pytest.raises(DatasetError, match=r"values \[34, 200\] that are not Cityscapes label ids"):
        ds[0]
    with pytest.raises(DatasetError, match=str(lab)):
        ds[0]
    ds[1]  # the other sample is fine


def test_train_id_values_outside_the_table(tiny_root: Path):
    out = train_ids_path(label_file(tiny_root))
    Image.fromarray(np.full((16, 32), 19, np.uint8)).save(out)
    with pytest.raises(DatasetError, match=r"values \[19\] that are not trainIds"):
        CityscapesDataset(tiny_root, "train")[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_png(tiny_root: Path, damage: str):
    img = image_file(tiny_root)
    data = img.read_bytes()
    img.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not a png" * 20, "empty": b""}[damage]
    )
    with pytest.raises(DatasetError, match=f"'{img}'"):
        CityscapesDataset(tiny_root, "train")[0]


def test_corrupt_label_png(tiny_root: Path):
    lab = label_file(tiny_root)
    lab.write_bytes(lab.read_bytes()[:40])
    with pytest.raises(DatasetError, match="corrupt or truncated") as e:
        CityscapesDataset(tiny_root, "train")[0]
    assert str(lab) in str(e.value)


def test_image_label_size_mismatch(tiny_root: Path):
    lab = label_file(tiny_root)
    Image.fromarray(np.full((8, 32), 7, np.uint8)).save(lab)
    with pytest.raises(DatasetError, match=r"8x32 \(HxW\) but its image .* is 16x32") as e:
        CityscapesDataset(tiny_root, "train")[0]
    assert str(lab) in str(e.value) and str(image_file(tiny_root)) in str(e.value)


def test_colour_label_is_rejected(tiny_root: Path):
    lab = label_file(tiny_root)
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(lab)
    with pytest.raises(DatasetError, match="single-channel 8-bit"):
        CityscapesDataset(tiny_root, "train")[0]


# ---------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_independent_of_count(tmp_path: Path):
    a = make_synthetic_cityscapes(tmp_path / "a", train=2, val=0, size=(24, 48), seed=5)
    b = make_synthetic_cityscapes(tmp_path / "b", train=3, val=0, size=(24, 48), seed=5)
    c = make_synthetic_cityscapes(tmp_path / "c", train=2, val=0, size=(24, 48), seed=6)
    for rel in [p.relative_to(a) for p in sorted(a.rglob("*.png"))]:
        assert np.array_equal(np.asarray(Image.open(a / rel)), np.asarray(Image.open(b / rel)))
    rel = image_file(a).relative_to(a)
    assert not np.array_equal(np.asarray(Image.open(a / rel)), np.asarray(Image.open(c / rel)))


def test_synthetic_layout_and_label_content(synthetic_root: Path):
    ids = set()
    for p in (synthetic_root / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"):
        arr = np.asarray(Image.open(p))
        assert arr.shape == (64, 128) and arr.dtype == np.uint8
        ids |= set(np.unique(arr).tolist())
        name = p.name.replace("_gtFine_labelIds.png", "")
        for extra in ("_gtFine_color.png", "_gtFine_instanceIds.png", "_gtFine_polygons.json"):
            assert (p.parent / f"{name}{extra}").exists()
    assert ids <= set(range(34))
    assert {7, 8, 11, 23} <= ids  # road, sidewalk, building, sky in every scene
    assert len(ids & set(OFFICIAL_TRAIN_ID)) >= 12 and len(ids - set(OFFICIAL_TRAIN_ID)) >= 2
    test_lab = np.asarray(Image.open(label_file(synthetic_root, "test")))
    assert (test_lab == 0).all()


def test_synthetic_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match=r"at least 8x8 \(HxW\), got 64x4"):
        make_synthetic_cityscapes(tmp_path, size=(64, 4))
    with pytest.raises(ValueError, match="train images must be >= 0"):
        make_synthetic_cityscapes(tmp_path, train=-1)
