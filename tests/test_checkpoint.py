"""Our checkpoint format: round trip, atomic writes, clear errors, weights_only safety."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch

import erfnet
from erfnet.checkpoint import (
    CheckpointError,
    atomic_save,
    cityscapes_meta,
    dataset_meta,
    load_checkpoint,
    load_model,
    make_checkpoint,
    save_checkpoint,
)
from erfnet.config import MEAN_RGB, STD_RGB
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.labels import CLASS_NAMES
from erfnet.model import ERFNet


@pytest.fixture(scope="module")
def random_model(random_bn):
    """``random_model(**kwargs)``: an ERFNet whose BatchNorm statistics are not the defaults,
    so a lost buffer shows."""
    return partial(_random_model, random_bn)


def _random_model(random_bn, **kwargs) -> ERFNet:
    torch.manual_seed(0)
    return random_bn(ERFNet(**kwargs)).eval()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 20, "head": "deconv", "dropout": 0.3}])
def test_round_trip_identical_outputs(tmp_path, kwargs, random_model):
    model = random_model(**kwargs)
    path = tmp_path / "m.pth"
    names = [f"class_{i}" for i in range(model.num_classes)]
    palette = [[i, 2 * i, 3 * i] for i in range(model.num_classes)]
    meta = {"class_names": names, "palette": palette, "note": "hello"}
    save_checkpoint(path, model, meta=meta, iteration=7)
    loaded = erfnet.load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.meta["note"] == "hello"
    assert loaded.meta["mean"] == list(MEAN_RGB) and loaded.meta["std"] == list(STD_RGB)
    assert loaded.meta["class_names"] == names and loaded.meta["palette"] == palette
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "erfnet-v1" and ckpt["iteration"] == 7


def test_meta_comes_from_the_dataset_never_invented(tmp_path, synthetic_root):
    save_checkpoint(tmp_path / "m.pth", ERFNet(num_classes=5))
    meta = erfnet.load_model(tmp_path / "m.pth").meta
    # Complete (every key a reader uses), yet claiming no dataset's classes: generic names.
    assert meta["class_names"] == [f"class_{i}" for i in range(5)]
    assert not set(meta["class_names"]) & set(CLASS_NAMES) and len(meta["palette"]) == 5
    assert meta["ignore_index"] == 255 and meta["head"] == "fcn"
    assert meta["mean"] == list(MEAN_RGB) and meta["std"] == list(STD_RGB)
    city = dataset_meta(CityscapesDataset(synthetic_root, "val"))
    assert city["class_names"] == list(CLASS_NAMES) and len(city["palette"]) == 19
    assert city["ignore_index"] == 255 and city == cityscapes_meta()
    # The converters' explicit Cityscapes meta, for a model with one extra output.
    wide = cityscapes_meta(20)
    assert wide["class_names"][:19] == list(CLASS_NAMES) and wide["class_names"][19] == "class_19"
    assert len(wide["palette"]) == 20 and wide["palette"][19] == [0, 0, 0]


def test_atomic_write_leaves_only_the_file(tmp_path, random_model):
    save_checkpoint(tmp_path / "a.pth", random_model())
    assert files_in(tmp_path) == ["a.pth"]
    # Same permissions as a plain write (the temporary file must not impose 0600).
    (tmp_path / "plain").write_bytes(b"")
    assert os.stat(tmp_path / "a.pth").st_mode == os.stat(tmp_path / "plain").st_mode


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch, random_model):
    path = tmp_path / "a.pth"
    old = random_model()
    save_checkpoint(path, old)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")  # a write that dies half way
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    new = ERFNet()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new)
    monkeypatch.undo()
    assert files_in(tmp_path) == ["a.pth"]
    loaded = load_model(path)
    for k, v in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_atomic_save_creates_folders(tmp_path):
    atomic_save({"x": torch.ones(2)}, tmp_path / "a" / "b" / "c.pth")
    assert torch.equal(torch.load(tmp_path / "a/b/c.pth", weights_only=True)["x"], torch.ones(2))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nothing\.pth"):
        load_model(tmp_path / "nothing.pth")


def test_garbage_file(tmp_path):
    (tmp_path / "g.pth").write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*g\.pth"):
        load_model(tmp_path / "g.pth")


@pytest.mark.parametrize(
    "obj",
    [
        {"state_dict": {"backbone.encoder.0.conv.weight": torch.zeros(1)}, "meta": {}},
        {"backbone.encoder.0.conv.weight": torch.zeros(1)},
        {"module.encoder.initial_block.conv.weight": torch.zeros(1)},
    ],
    ids=["mmseg", "mmseg-bare", "erfnet_pytorch"],
)
def test_foreign_file_suggests_conversion(tmp_path, obj):
    torch.save(obj, tmp_path / "f.pth")
    with pytest.raises(CheckpointError, match=r"not an erfnet checkpoint.*convert_checkpoint\.py"):
        load_model(tmp_path / "f.pth")


def test_unrelated_objects_are_not_checkpoints(tmp_path):
    for i, obj in enumerate([[1, 2, 3], {1: torch.zeros(1)}, {"model": {}}]):
        torch.save(obj, tmp_path / f"{i}.pth")
        with pytest.raises(CheckpointError, match="not an erfnet checkpoint") as e:
            load_model(tmp_path / f"{i}.pth")
        assert "convert" not in str(e.value)


def test_wrong_shapes_missing_and_unexpected_keys(tmp_path, random_model):
    ckpt = make_checkpoint(random_model())
    ckpt["model"]["head.classifier.weight"] = torch.zeros(7, 128, 1, 1)
    del ckpt["model"]["encoder.3.bn1.running_var"]
    ckpt["model"]["encoder.3.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg
    assert "head.classifier.weight: file (7, 128, 1, 1) vs model (19, 128, 1, 1)" in msg
    assert "encoder.3.bn1.running_var" in msg and "encoder.3.extra" in msg


def test_bad_model_args_and_model_entry(tmp_path, random_model):
    ckpt = make_checkpoint(random_model())
    torch.save({**ckpt, "model_args": {"num_classes": 19, "head": "psp"}}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="bad model_args"):
        load_model(tmp_path / "a.pth")
    torch.save({**ckpt, "model": [1, 2]}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="must be a state_dict"):
        load_model(tmp_path / "b.pth")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_only_refuses_arbitrary_objects(tmp_path, random_model):
    marker = tmp_path / "pwned"
    ckpt = make_checkpoint(random_model())
    ckpt["meta"]["payload"] = _Evil(marker)
    torch.save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*evil\.pth") as e:
        load_model(tmp_path / "evil.pth")
    assert not marker.exists()
    # The real reason, not torch's preamble advising the unsafe weights_only=False.
    msg = str(e.value)
    assert "Unsupported global" in msg and "weights_only` set to `False" not in msg


def test_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file"):
        load_model(tmp_path)


def test_meta_is_complete_when_written_and_an_old_file_is_completed_at_load(tmp_path, capsys):
    keys = {"class_names", "palette", "ignore_index", "mean", "std", "head", "test_size"}
    written = make_checkpoint(ERFNet(num_classes=3, head="deconv"))["meta"]
    assert set(written) == keys | {"licence", "lineage"} and written["head"] == "deconv"
    assert len(written["palette"]) == 3 and written["licence"] == "Apache-2.0"
    # A file from before: model_args without num_classes, a meta with one colour only.
    ckpt = make_checkpoint(ERFNet())
    ckpt["model_args"] = {"head": "fcn"}
    ckpt["meta"] = {"palette": [[1, 2, 3]], "note": "old"}
    torch.save(ckpt, tmp_path / "old.pth")
    meta = load_checkpoint(tmp_path / "old.pth")["meta"]
    assert set(meta) == keys | {"note"} and len(meta["class_names"]) == 19
    assert meta["test_size"] == {"rule": "keep_ratio", "scale": [1024, 2048]}  # Cityscapes'
    assert meta["palette"][0] == [1, 2, 3] and all(any(c) for c in meta["palette"])
    assert "the checkpoint's palette has 1 colours for 19 classes" in capsys.readouterr().err
    assert load_model(tmp_path / "old.pth").meta == meta


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 20, "head": "deconv"}])
def test_a_network_built_in_code_carries_the_meta_its_checkpoint_holds(tmp_path, kwargs):
    from erfnet.config import DEFAULT_TEST_SIZE
    from erfnet.evaluation.inference import model_normalization
    from erfnet.evaluation.settings import model_test_size
    from erfnet.fuse import fuse_bn, optimize_for_inference

    model = ERFNet(**kwargs)
    written = make_checkpoint(model)["meta"]
    assert model.meta == {k: v for k, v in written.items() if k not in ("licence", "lineage")}
    assert model_normalization(model) == (MEAN_RGB, STD_RGB)  # ImageNet's, as before
    assert model_test_size(model) == DEFAULT_TEST_SIZE
    assert fuse_bn(model).meta == optimize_for_inference(model).meta == model.meta
    save_checkpoint(tmp_path / "m.pth", model)
    assert load_model(tmp_path / "m.pth").meta == written
