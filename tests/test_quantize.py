"""onnxruntime static int8 (erfnet.deploy.int8) through ``scripts/export.py --precision int8``:
the QDQ graph, its figures and metadata, and the video path running it (needs onnx and
onnxruntime, optional: skipped when absent)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from erfnet.config import MEAN_RGB
from erfnet.deploy.exported import load_exported
from erfnet.deploy.int8 import QuantizationError, quantize_int8
from erfnet.video.pipeline import OnnxPredictor, open_source, run_video
from scripts import export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = (64, 128)


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, random_bn_checkpoint: Path, synthetic_root: Path
) -> dict:
    """A random-BN ERFNet exported as onnxruntime int8 through the script (a permissive gate)."""
    tmp = tmp_path_factory.mktemp("int8")
    fp32, int8 = tmp / "m.onnx", tmp / "m_int8.onnx"
    export.main([str(random_bn_checkpoint), "--out", str(fp32), "--size", *map(str, SIZE)])
    report = export.main(
        [
            str(random_bn_checkpoint),
            "--out",
            str(int8),
            "--precision",
            "int8",
            "--size",
            *map(str, SIZE),
            "--calib-data",
            str(synthetic_root),
            "--calib-images",
            "2",
            "--min-agreement",
            "0",
            "--max-miou-drop",
            "100",
        ]
    )
    return {"dir": tmp, "fp32": fp32, "int8": int8, "report": report, "root": synthetic_root}


def test_int8_export_is_a_smaller_qdq_graph_with_every_figure(exported: dict) -> None:
    report = exported["report"]
    for key in ("fp32_miou", "export_miou", "miou_drop", "agreement"):
        assert isinstance(report["gate"][key], float) and math.isfinite(report["gate"][key]), key
    assert len(report["calibration_files"]) == 2 and len(report["scored_files"]) == 2
    assert 0.0 < report["gate"]["agreement"] <= 100.0
    assert 0.0 <= report["gate"]["fp32_miou"] <= 100.0  # percent
    assert exported["int8"].stat().st_size < exported["fp32"].stat().st_size / 2  # int8 weights
    proto = onnx.load(str(exported["int8"]))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    model = load_exported(exported["int8"])
    assert model.precision == "int8" and model.output == "logits"
    assert model.meta["mean"] == list(MEAN_RGB)
    assert len(model.meta["palette"]) == 19
    json.dumps(report)  # JSON-serialisable as it is


def test_quantize_needs_calibration_images(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="at least one image"):
        quantize_int8(exported["fp32"], tmp_path / "q.onnx", [])
    assert list(tmp_path.iterdir()) == []


def test_video_runs_the_int8_model(exported: dict, tmp_path: Path) -> None:
    folder = exported["root"] / "leftImg8bit" / "val" / "frankfurt"
    report = run_video(
        open_source(folder), OnnxPredictor(exported["int8"]), tmp_path / "o.mkv", codec="ffv1"
    )
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
