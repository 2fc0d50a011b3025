"""--init-from: ours / mmseg / erfnet_pytorch weights and Eromera's ImageNet encoder, another class
count re-initialising only the classifier, and the files that do not fit as one error line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import train as train_cli
from erfnet.checkpoint import CheckpointError, save_checkpoint
from erfnet.convert import convert_state_dict
from erfnet.model import ERFNet
from erfnet.training.finetune import IMAGENET_ENCODER, init_from


def fresh(num_classes: int, head: str = "fcn", seed: int = 123) -> tuple[ERFNet, dict]:
    torch.manual_seed(seed)
    model = ERFNet(num_classes=num_classes, head=head)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def assert_loaded(model: ERFNet, source: dict, before: dict, classifier: str) -> None:
    """Every tensor but the classifier equals the source's; the classifier kept its init."""
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith(classifier):
            assert torch.equal(value, before[key]), key
            assert value.shape != source[key].shape, key
        else:
            assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("head", ["fcn", "deconv"])
def test_ours_with_another_class_count_reinitialises_only_the_classifier(
    tmp_path, head, reference_nets
):
    src = reference_nets.randomize(ERFNet(num_classes=19, head=head), seed=0)
    save_checkpoint(tmp_path / "src.pth", src)
    model, before = fresh(5, head)
    report = init_from(model, tmp_path / "src.pth")
    classifier = "head.classifier." if head == "fcn" else "head.output_conv."
    assert report.source == "erfnet" and report.source_classes == 19
    assert report.reinitialised == [classifier + "weight", classifier + "bias"]
    assert len(report.loaded) == len(before) - 2
    assert_loaded(model, src.state_dict(), before, classifier)


def test_mmseg_and_erfnet_pytorch_files_load_without_conversion(tmp_path, reference_nets):
    nets = reference_nets
    ref = nets.randomize(nets.MMSegERFNet(19), seed=1)
    torch.save(nets.mmseg_file_dict(ref), tmp_path / "mmseg.pth")
    model, before = fresh(11)
    report = init_from(model, tmp_path / "mmseg.pth")
    assert report.source == "mmseg" and report.reinitialised[0] == "head.classifier.weight"
    expected = convert_state_dict(nets.mmseg_file_dict(ref), "mmseg")
    assert_loaded(model, expected, before, "head.classifier.")

    ep = nets.randomize(nets.EPNet(20), seed=2)
    torch.save({f"module.{k}": v for k, v in ep.state_dict().items()}, tmp_path / "ep.pth")
    model, before = fresh(20, "deconv")
    report = init_from(model, tmp_path / "ep.pth")
    assert report.source == "erfnet_pytorch" and report.reinitialised == []  # same class count
    expected = convert_state_dict(ep.state_dict(), "erfnet_pytorch")
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(CheckpointError, match=r"ep\.pth.*'deconv' head.*--head deconv"):
        init_from(ERFNet(num_classes=20), tmp_path / "ep.pth")


def imagenet_erfnet(encoder_class: type[nn.Module]) -> nn.Module:
    """Eromera's imagenet/erfnet_imagenet.py tree: features.encoder (erfnet_pytorch's encoder,
    no output_conv) and classifier.linear (1000 ImageNet classes)."""
    net = nn.Module()
    net.features = nn.Module()
    net.features.encoder = encoder_class(1000)
    del net.features.encoder.output_conv  # the ImageNet encoder has none
    net.classifier = nn.Module()
    net.classifier.linear = nn.Linear(128, 1000)
    return net


def test_imagenet_encoder_maps_every_encoder_tensor(tmp_path, reference_nets):
    ref = reference_nets.randomize(imagenet_erfnet(reference_nets.EPEncoder), seed=3)
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    assert any(k.startswith("module.features.encoder.layers.14.") for k in state)
    # the file as Eromera's training script saved it (optimizer state as plain tensors)
    torch.save(
        {
            "epoch": 90,
            "arch": "erfnet",
            "state_dict": state,
            "best_prec1": 60.0,
            "optimizer": {"state": {}, "param_groups": []},
        },
        tmp_path / "erfnet_encoder_pretrained.pth.tar",
    )
    model, before = fresh(7)
    report = init_from(model, tmp_path / "erfnet_encoder_pretrained.pth.tar")
    assert report.source == IMAGENET_ENCODER and report.reinitialised == []
    assert "encoder-only start" in " ".join(report.describe("enc.pth.tar"))
    encoder_keys = [k for k in before if k.startswith("encoder.")]
    assert sorted(report.loaded) == sorted(encoder_keys)
    for key in encoder_keys:  # our encoder.0 = initial_block, encoder.i = layers.(i-1)
        index, rest = key.split(".", 2)[1:]
        block = "initial_block" if index == "0" else f"layers.{int(index) - 1}"
        assert torch.equal(
            model.state_dict()[key], state[f"module.features.encoder.{block}.{rest}"]
        )
    for key in before:
        if not key.startswith("encoder."):
            assert torch.equal(model.state_dict()[key], before[key]), key  # decoder, head: fresh
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encoder(x), ref.features.encoder(x))


def test_files_that_do_not_fit_are_one_error_line(tmp_path, synthetic_root: Path, capsys):
    argv = [
        "--data",
        "synthetic",
        "--data-root",
        str(synthetic_root),
        "--iters",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
    ]
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    narrow = ERFNet(num_classes=19, head_channels=64)
    save_checkpoint(tmp_path / "narrow.pth", narrow)
    for path, expected in (
        (tmp_path / "other.pth", "not an ERFNet checkpoint"),
        (tmp_path / "narrow.pth", "mis-shaped ['head.conv.weight"),
        (tmp_path / "missing.pth", "not found"),
    ):
        with pytest.raises(SystemExit) as info:
            train_cli.cli([*argv, "--work-dir", str(tmp_path / "w"), "--init-from", str(path)])
        msg = str(info.value.code)
        assert msg.startswith(f"error: --init-from {path}") and expected in msg, msg
        assert "\n" not in msg
    with pytest.raises(SystemExit) as info:
        train_cli.cli([*argv, "--init-from", str(tmp_path / "narrow.pth"), "--resume"])
    assert info.value.code == 2 and "give one of them" in capsys.readouterr().err
