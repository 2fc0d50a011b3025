"""Converters: a reference network per source (conftest's ``reference_nets``, built from its
documented module tree) with random weights and BatchNorm statistics must give the same logits as
our converted model."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from erfnet.checkpoint import load_checkpoint, load_model, save_checkpoint
from erfnet.config import MEAN_RGB, STD_RGB
from erfnet.convert import ConversionError, convert_checkpoint, convert_state_dict, detect_source
from erfnet.labels import CLASS_NAMES
from erfnet.model import ERFNet, count_parameters
from scripts import convert_checkpoint as convert_script

ROOT = Path(__file__).resolve().parents[1]
# Run as a module from the root: works with or without `pip install -e .`.
SCRIPT = [sys.executable, "-m", "scripts.convert_checkpoint"]


# --- helpers ---------------------------------------------------------------------------------


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ref.std() > 1e-2, "degenerate reference output; the comparison would prove nothing"
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def mmseg_ref(reference_nets) -> nn.Module:
    return reference_nets.randomize(reference_nets.MMSegERFNet(), seed=1)


@pytest.fixture(scope="module")
def mmseg_file(tmp_path_factory, mmseg_ref, reference_nets) -> Path:
    path = tmp_path_factory.mktemp("mmseg") / "erfnet_fcn_4x4_512x1024_160k_cityscapes.pth"
    torch.save(reference_nets.mmseg_file_dict(mmseg_ref), path)
    return path


@pytest.fixture(scope="module")
def ep_ref(reference_nets) -> nn.Module:
    return reference_nets.randomize(reference_nets.EPNet(20), seed=2)


@pytest.fixture(scope="module")
def ep_file(tmp_path_factory, ep_ref) -> Path:
    """Like the released erfnet_pretrained.pth: DataParallel's ``module.`` prefix, PyTorch's
    legacy (pre-1.6) file format and no BatchNorm ``num_batches_tracked`` (pre-0.4.1)."""
    sd = OrderedDict(
        ("module." + k, v) for k, v in ep_ref.state_dict().items() if "num_batches" not in k
    )
    path = tmp_path_factory.mktemp("ep") / "erfnet_pretrained.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    return path


# --- equivalence -----------------------------------------------------------------------------


def test_mmseg_script_converts_to_identical_logits(tmp_path, mmseg_file, mmseg_ref):
    out = tmp_path / "ours.pth"
    proc = subprocess.run(
        [*SCRIPT, "--from", "mmseg", str(mmseg_file), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mmseg" in proc.stdout and "classes=19" in proc.stdout
    assert "params=2,084,095" in proc.stdout

    model = load_model(out)
    assert model.config["head"] == "fcn" and model.num_classes == 19
    meta = load_checkpoint(out)["meta"]
    assert meta["source"] == "mmseg" and meta["source_file"] == mmseg_file.name
    assert meta["mean"] == list(MEAN_RGB) and meta["std"] == list(STD_RGB)
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["source_meta"]["mmseg_version"] == "0.20.2"
    assert meta["source_meta"]["iter"] == 160000

    torch.manual_seed(0)
    with torch.no_grad():
        for h, w in [(37, 53), (32, 64)]:  # odd (the pool resize is used) and even
            x = torch.randn(2, 3, h, w)
            assert_same_logits(model(x), mmseg_ref(x))


def test_mmseg_bare_state_dict_converts_too(mmseg_ref):
    state = convert_state_dict(OrderedDict(mmseg_ref.state_dict()), "mmseg")
    model = ERFNet().eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert_same_logits(model(x), mmseg_ref(x))


def test_mmseg_num_classes_from_classifier(tmp_path, reference_nets):
    ref = reference_nets.randomize(reference_nets.MMSegERFNet(num_classes=7), seed=3)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "in.pth")  # bare meta-less dict
    model = convert_checkpoint(tmp_path / "in.pth", tmp_path / "out.pth", "mmseg")
    assert model.num_classes == 7
    loaded = load_model(tmp_path / "out.pth")
    assert loaded.num_classes == 7 and len(loaded.meta["class_names"]) == 7
    assert loaded.meta["test_size"] == {"rule": "keep_ratio", "scale": [1024, 2048]}  # mmseg's
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        assert_same_logits(loaded(x), ref(x))


def test_erfnet_pytorch_converts_to_identical_logits(tmp_path, ep_file, ep_ref):
    out = tmp_path / "ours.pth"
    convert_checkpoint(ep_file, out, "erfnet_pytorch")
    model = load_model(out)
    assert model.config["head"] == "deconv" and model.num_classes == 20
    assert count_parameters(model) == 2_062_956 + 16 * 20 * 2 * 2 + 20
    meta = model.meta
    assert meta["source"] == "erfnet_pytorch" and meta["source_file"] == "erfnet_pretrained.pth"
    assert meta["void_class"] == 19 and meta["class_names"][19] == "void"
    assert meta["test_size"] == {"rule": "shorter_side", "size": 512}  # its Resize(512)
    assert meta["class_names"][:19] == list(CLASS_NAMES)

    # The original takes RGB in [0, 1]; our pipeline's (x - mean) / std with the stored meta on
    # the 0-255 scale must feed it exactly that.
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        # The original network needs sizes divisible by 8 (its downsampler has no resize).
        for h, w in [(32, 48), (40, 56)]:
            img = torch.randint(0, 256, (2, 3, h, w)).float()
            assert_same_logits(model((img - mean) / std), ep_ref(img / 255))


def test_erfnet_pytorch_without_prefix_with_counters(ep_ref):
    state = convert_state_dict(ep_ref.state_dict(), "erfnet_pytorch")
    model = ERFNet(20, head="deconv").eval()
    model.load_state_dict(state, strict=True)
    bn = ep_ref.encoder.layers[3].bn2
    assert torch.equal(model.encoder[4].bn2.running_var, bn.running_var)
    assert model.encoder[4].bn2.num_batches_tracked == bn.num_batches_tracked


def test_conversion_is_sensitive_to_the_mapping(mmseg_ref):
    """A wrong table (bn1 <-> bn2 swapped) changes the logits: the equivalence test can fail."""
    sd = OrderedDict(mmseg_ref.state_dict())
    swapped = OrderedDict()
    for k, v in sd.items():
        k2 = k.replace("encoder.9.convs_layers.3.", "TMP.").replace(
            "encoder.9.convs_layers.8.", "encoder.9.convs_layers.3."
        )
        swapped[k2.replace("TMP.", "encoder.9.convs_layers.8.")] = v
    model = ERFNet().eval()
    model.load_state_dict(convert_state_dict(swapped, "mmseg"))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_same_logits(model(x), mmseg_ref(x))


# --- errors ----------------------------------------------------------------------------------


def test_unknown_missing_and_misshaped_keys_listed_together(mmseg_ref):
    sd = OrderedDict(mmseg_ref.state_dict())
    sd["backbone.encoder.3.convs_layers.11.weight"] = torch.zeros(1)
    sd["auxiliary_head.conv_seg.weight"] = torch.zeros(1)
    del sd["decode_head.conv_seg.bias"]
    sd["backbone.decoder.0.bn.running_var"] = torch.ones(65)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, "mmseg")
    msg = str(e.value)
    assert "2 unknown key(s)" in msg and "backbone.encoder.3.convs_layers.11.weight" in msg
    assert "auxiliary_head.conv_seg.weight" in msg
    assert "1 missing key(s): decode_head.conv_seg.bias" in msg
    assert "1 mis-shaped tensor(s): backbone.decoder.0.bn.running_var: (65,), expected (64,)" in msg


def test_misshaped_key_reported_with_shapes(mmseg_ref):
    sd = OrderedDict(mmseg_ref.state_dict())
    sd["backbone.encoder.7.conv.weight"] = torch.zeros(64, 32, 3, 3)
    with pytest.raises(
        ConversionError,
        match=r"mis-shaped.*backbone\.encoder\.7\.conv\.weight: "
        r"\(64, 32, 3, 3\), expected \(64, 64, 3, 3\)",
    ):
        convert_state_dict(sd, "mmseg")


def test_wrong_source_suggests_the_right_one(tmp_path, mmseg_file, ep_file, ep_ref):
    with pytest.raises(ConversionError, match="looks like a mmseg checkpoint.*--from mmseg"):
        convert_checkpoint(mmseg_file, tmp_path / "a.pth", "erfnet_pytorch")
    with pytest.raises(ConversionError, match="--from erfnet_pytorch"):
        convert_checkpoint(ep_file, tmp_path / "b.pth", "mmseg")
    with pytest.raises(ConversionError, match="look like a 'erfnet_pytorch' checkpoint"):
        convert_state_dict(ep_ref.state_dict(), "mmseg")
    with pytest.raises(ConversionError, match="unknown source 'caffe'"):
        convert_state_dict(ep_ref.state_dict(), "caffe")
    assert not list(tmp_path.iterdir())


def test_detect_source(mmseg_ref, ep_ref):
    assert detect_source({"state_dict": mmseg_ref.state_dict()}) == "mmseg"
    assert detect_source(mmseg_ref.state_dict()) == "mmseg"
    assert detect_source({"module." + k: v for k, v in ep_ref.state_dict().items()}) == (
        "erfnet_pytorch"
    )
    assert detect_source({"format": "erfnet-v1", "model": {}, "model_args": {}}) == "erfnet"
    assert detect_source({"weight": torch.zeros(1)}) is None
    assert detect_source([1, 2]) is None


def test_our_own_checkpoint_is_not_converted(tmp_path):
    save_checkpoint(tmp_path / "ours.pth", ERFNet())
    with pytest.raises(ConversionError, match="already an erfnet checkpoint"):
        convert_checkpoint(tmp_path / "ours.pth", tmp_path / "out.pth", "mmseg")


def test_unsafe_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"backbone.x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match=r"refusing to load.*\(_?io\.open\)"):
        convert_checkpoint(tmp_path / "evil.pth", tmp_path / "out.pth", "mmseg")
    assert not marker.exists()
    assert not (tmp_path / "out.pth").exists()


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ConversionError, match="cannot read .*junk.pth"):
        convert_checkpoint(tmp_path / "junk.pth", tmp_path / "out.pth", "mmseg")
    with pytest.raises(ConversionError, match="not found: .*nope.pth"):
        convert_checkpoint(tmp_path / "nope.pth", tmp_path / "out.pth", "mmseg")
    with pytest.raises(ConversionError, match="is a folder, not a checkpoint file"):
        convert_checkpoint(tmp_path, tmp_path / "out.pth", "mmseg")


def test_script_errors_are_one_line(tmp_path, mmseg_file, capsys):
    script = convert_script
    with pytest.raises(SystemExit, match=r"^error: input checkpoint not found: .*missing\.pth$"):
        script.main(["--from", "mmseg", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth")])
    with pytest.raises(SystemExit, match="^error: .*--from mmseg"):
        script.main(["--from", "erfnet_pytorch", str(mmseg_file), str(tmp_path / "o.pth")])
    with pytest.raises(SystemExit, match="^error: output path must differ"):
        script.main(["--from", "mmseg", str(mmseg_file), str(mmseg_file)])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        script.main(["--from", "caffe", str(mmseg_file), str(tmp_path / "o.pth")])
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
