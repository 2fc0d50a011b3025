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
