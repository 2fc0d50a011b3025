"""erfnet/quantize.py and ``scripts/export_onnx.py --int8``: static int8 quantization of a small
model calibrated on the synthetic Cityscapes, its report, and the agreement gate (needs onnx and
onnxruntime, optional: skipped when absent)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

import erfnet
from erfnet.deploy.int8 import (
    QuantizationError,
    check_agreement,
    format_int8_report,
    quantize_and_check,
    read_meta,
)
from erfnet.video.pipeline import OnnxPredictor, open_source, run_video
from scripts import export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = (64, 128)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> dict:
    """A 19-class ERFNet with random BN statistics, exported with --int8 through the script."""
    torch.manual_seed(0)
    model = erfnet.ERFNet(num_classes=19)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    tmp = tmp_path_factory.mktemp("int8")
    erfnet.save_checkpoint(tmp / "ckpt.pth", model, meta=erfnet.checkpoint.cityscapes_meta())
    result = export_onnx.main(
        ["--checkpoint", str(tmp / "ckpt.pth"), "--out", str(tmp / "m.onnx"), "--no-check",
         "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--repeats", "2",
         "--int8", "--calib-data", str(synthetic_root), "--calib-split", "val",
         "--calib-images", "2", "--min-agreement", "0"]
    )  # fmt: skip
    return {"dir": tmp, "result": result, "root": synthetic_root}


def test_int8_export_reports_every_figure(exported: dict) -> None:
    report = exported["result"]["int8"]
    for key in ("fp32_ms", "int8_ms", "speedup", "agreement", "fp32_miou", "int8_miou"):
        assert isinstance(report[key], float) and math.isfinite(report[key]), key
    assert report["images"] == 2 and report["size"] == list(SIZE) and report["split"] == "val"
    assert 0.0 < report["agreement"] <= 100.0
    assert 0.0 <= report["fp32_miou"] <= 100.0 and 0.0 <= report["int8_miou"] <= 100.0  # percent
    assert 0.0 <= report["fp32_miou"] <= 100.0 and 0.0 <= report["int8_miou"] <= 100.0
    int8_path = exported["dir"] / "m_int8.onnx"
    assert Path(report["int8_path"]) == int8_path and int8_path.is_file()
    assert report["int8_mb"] < report["fp32_mb"] / 2  # int8 weights
    proto = onnx.load(str(int8_path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    meta = read_meta(int8_path)
    assert meta["mean"] == list(erfnet.checkpoint.MEAN_RGB) and len(meta["palette"]) == 19
    json.dumps(report)  # JSON-serialisable as it is
    text = format_int8_report(report)
    assert "fp32" in text and "int8" in text and f"{report['agreement']:.2f}" in text


def test_agreement_gate_refuses_with_figures(exported: dict, tmp_path: Path) -> None:
    reached = exported["result"]["int8"]["agreement"]
    assert reached < 100.0  # random weights: some labels are near a tie and int8 flips them
    threshold = min(100.0, reached + 0.5)
    out = tmp_path / "refused_int8.onnx"
    with pytest.raises(QuantizationError, match="int8 model refused") as e:
        quantize_and_check(exported["dir"] / "m.onnx", out, exported["root"], num_images=2,
                           size=SIZE, min_agreement=threshold, repeats=1)  # fmt: skip
    assert f"{reached:.2f}%" in str(e.value) and "mIoU fp32" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    check_agreement({"agreement": reached}, reached)  # at the threshold: accepted


def test_script_gate_is_one_error_line(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        export_onnx.main(
            ["--checkpoint", str(exported["dir"] / "ckpt.pth"), "--out", str(tmp_path / "m.onnx"),
             "--no-check", "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--repeats", "1",
             "--int8", "--calib-data", str(exported["root"]), "--calib-images", "2",
             "--min-agreement", "100"]
        )  # fmt: skip
    assert str(e.value).startswith("error: --int8: int8 model refused")
    assert not (tmp_path / "m_int8.onnx").exists() and (tmp_path / "m.onnx").exists()
    with pytest.raises(SystemExit):  # --int8 without data: a flag error
        export_onnx.parse_args(["--checkpoint", "c", "--out", "m.onnx", "--int8"])


def test_video_runs_the_int8_model(exported: dict, tmp_path: Path) -> None:
    folder = exported["root"] / "leftImg8bit" / "val" / "frankfurt"
    report = run_video(open_source(folder), OnnxPredictor(exported["dir"] / "m_int8.onnx"),
                       tmp_path / "o.mkv", codec="ffv1")  # fmt: skip
    assert report["backend"] == "onnxruntime" and report["frames"] == 1


def test_missing_onnxruntime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from erfnet.deploy import exported

    real = importlib.import_module

    def fake(name: str, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(exported.ExportError, match="pip install onnx onnxruntime"):
        exported.onnx_session("m.onnx")
