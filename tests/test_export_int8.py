"""scripts/export.py --precision int8 --int8-method: the NNCF methods tried for a gate-passing
int8 export (docs/deploy.md's frontier), on the tiny checkpoint: the float scope each method
keeps, the gate's verdict, no file on refusal, and a refusal that names the method tried and
the best one measured. Skipped without onnx / openvino / nncf."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from erfnet import load_model
from scripts import export

SIZE = ("64", "128")  # the synthetic dataset's image size


@pytest.fixture(scope="module")
def fp32_ir(tmp_path_factory: pytest.TempPathFactory, random_bn_checkpoint: Path):
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from erfnet.deploy import openvino_ir
    from erfnet.deploy.onnx import export_onnx

    path = tmp_path_factory.mktemp("int8") / "m.onnx"
    export_onnx(load_model(random_bn_checkpoint), path, 64, 128, dynamic=False)
    return openvino_ir.convert_onnx(path)


def _quantized_convs(model) -> set[str]:
    """Names of the convolutions whose input comes through a FakeQuantize (int8)."""
    names = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution"):
            source = op.input_value(0).get_node()
            if source.get_type_name() == "FakeQuantize":
                names.add(op.get_friendly_name())
    return names


def test_float_methods_keep_their_layers_out_of_int8(fp32_ir, synthetic_root: Path) -> None:
    import numpy as np

    from erfnet.deploy import openvino_ir

    inputs = [
        np.random.default_rng(i).normal(size=(1, 3, 64, 128)).astype(np.float32) for i in range(2)
    ]
    methods = openvino_ir.INT8_METHODS
    everything = _quantized_convs(openvino_ir.quantize_int8(fp32_ir, inputs, methods["defaults"]))
    kept = _quantized_convs(
        openvino_ir.quantize_int8(fp32_ir, inputs, methods["float-decoder-head"])
    )
    assert any(re.match(r"/decoder/", n) for n in everything)  # quantized by default
    assert kept and kept < everything
    assert not any(re.match(r"/(decoder|head)/|/encoder/encoder\.0/", n) for n in kept)


def test_a_refused_int8_export_names_the_method_and_leaves_no_file(
    fp32_ir, random_bn_checkpoint: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    from erfnet.deploy.openvino_ir import BEST_INT8_METHOD

    out, report = tmp_path / "m.xml", tmp_path / "r.json"
    argv = [str(random_bn_checkpoint), "--out", str(out), "--precision", "int8", "--size", *SIZE]
    argv += ["--calib-data", str(synthetic_root), "--report", str(report)]
    with pytest.raises(SystemExit) as e:
        export.main([*argv, "--int8-method", "float-edges", "--min-agreement", "100"])
    message = str(e.value.code)
    assert "\n" not in message and "refused by the accuracy gate" in message
    assert "int8 method tried: float-edges" in message and BEST_INT8_METHOD in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    r = json.loads(report.read_text())
    assert r["accepted"] is False
    assert not set(r["calibration_files"]) & set(r["scored_files"])
    assert any("float-edges" in note for note in r["notes"])


def test_int8_method_is_for_openvino_int8_only(
    random_bn_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for out, precision in (("m.onnx", "int8"), ("m.xml", "fp32")):
        with pytest.raises(SystemExit) as e:  # a flag bad in itself: exit 2 through argparse
            export.main(
                [str(random_bn_checkpoint), "--out", str(tmp_path / out), "--precision"]
                + [precision, "--int8-method", "float-edges", "--calib-data", str(tmp_path)]
            )
        assert e.value.code == 2 and "--int8-method is for" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_qat_fine_tuning_moves_the_fake_quantized_model_towards_fp32(
    random_bn_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("nncf")
    import nncf
    import numpy as np
    import torch

    from erfnet.deploy.qat import QATOptions, fine_tune
    from erfnet.fuse import fuse_bn

    monkeypatch.setenv("NNCF_EXTENSION_LOAD_TIMEOUT", "900")  # its first build, on a busy CPU

    model = load_model(random_bn_checkpoint)
    inputs = [
        np.random.default_rng(i).normal(size=(1, 3, 64, 128)).astype(np.float32) for i in range(2)
    ]
    teacher, student = fuse_bn(model), fuse_bn(model)
    for p in student.parameters():
        p.requires_grad_(True)
    student = nncf.quantize(student, nncf.Dataset(inputs, torch.from_numpy), subset_size=2)
    x = torch.from_numpy(inputs[0])

    def error() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(student.eval()(x), teacher(x)))

    before = error()
    losses = fine_tune(student, teacher, inputs, QATOptions(iters=20, lr=1e-5, crop=(64, 128)))
    assert len(losses) == 20 and error() < 0.8 * before


def test_qat_export_is_int8_gated_and_calibrates_only_on_train(
    random_bn_checkpoint: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    from erfnet.deploy.exported import load_exported
    from erfnet.deploy.openvino_ir import ir_files

    out, report = tmp_path / "qat.xml", tmp_path / "qat.json"
    argv = [str(random_bn_checkpoint), "--out", str(out), "--precision", "int8", "--size", *SIZE]
    argv += ["--calib-data", str(synthetic_root), "--report", str(report), "--qat-iters", "2"]
    export.main([*argv, "--min-agreement", "0", "--max-miou-drop", "100"])
    r = json.loads(report.read_text())
    assert r["accepted"] is True and any(n.startswith("int8 method qat") for n in r["notes"])
    assert r["calibration_files"] and r["scored_files"]
    assert all("/train/" in f for f in r["calibration_files"])
    assert not set(r["calibration_files"]) & set(r["scored_files"])
    import openvino as ov

    assert _quantized_convs(ov.Core().read_model(str(out)))  # int8, not fp32
    loaded = load_exported(out)
    assert loaded.meta == load_model(random_bn_checkpoint).meta
    for path in ir_files(out):
        path.unlink()
    with pytest.raises(SystemExit) as e:  # the same export, refused: no file, the method named
        export.main([*argv, "--min-agreement", "100"])
    assert "int8 method tried: qat" in str(e.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.json"]
    assert json.loads(report.read_text())["accepted"] is False


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--qat-iters", "0"], "--qat-iters N: a number of steps >= 1"),
        (["--qat-iters", "5", "--int8-method", "defaults"], "--int8-method defaults"),
        (["--qat-iters", "5", "--precision", "fp32"], "--qat-iters is for --precision int8"),
    ],
)
def test_qat_flags_refused_before_any_work(
    random_bn_checkpoint: Path, tmp_path: Path, flags, message, capsys
) -> None:
    argv = [str(random_bn_checkpoint), "--out", str(tmp_path / "m.xml"), *flags]
    if "--precision" not in flags:
        argv += ["--precision", "int8"]
    with pytest.raises(SystemExit) as e:
        export.main([*argv, "--calib-data", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_label_margin_loss_by_hand() -> None:
    import torch

    from erfnet.deploy.qat import label_margin_loss

    # Two pixels, three classes: logits (2.0, 1.5, 0.0) and (0.0, 3.0, -1.0).
    logits = torch.tensor([[2.0, 0.0], [1.5, 3.0], [0.0, -1.0]])[None, :, None, :]
    labels = torch.tensor([[[0, 2]]])
    # pixel 1: label 0 leads the best other (1.5) by 0.5 -> relu(1 - 0.5) = 0.5;
    # pixel 2: label 2 trails the best other (3.0) by 4.0 -> relu(1 + 4) = 5; mean 2.75.
    assert float(label_margin_loss(logits, labels, 1.0)) == pytest.approx(2.75)
    assert float(label_margin_loss(logits, torch.tensor([[[0, 1]]]), 0.5)) == 0.0
