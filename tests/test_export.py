"""scripts/export.py: ONNX and OpenVINO exports, --argmax, fixed and dynamic sizes, metadata, the
accuracy gate on held-out images and refused output paths. The runtimes are optional extras:
each test skips (with the reason) where the one it needs is absent."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erfnet import load_model
from erfnet.checkpoint import cityscapes_meta, save_checkpoint
from erfnet.deploy.exported import ExportError, load_exported, require
from erfnet.deploy.gate import held_out_images
from erfnet.model import ERFNet
from scripts import export

ROOT = Path(__file__).resolve().parents[1]
SIZE = ("64", "128")  # the synthetic dataset's image size


def run_export(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def labels_of(path: Path, x: torch.Tensor) -> torch.Tensor:
    out = load_exported(path)(x)
    return out if out.dtype == torch.int64 else out.argmax(1)


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, *args, **kwargs):
        if name in ("onnx", "openvino"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ExportError, match="pip install onnx onnxruntime"):
        require("onnx")
    with pytest.raises(ExportError, match="pip install openvino"):
        require("openvino")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--opset", "11"], "--opset must be from 17 to 20"),
        (["--opset", "99"], "--opset must be from 17 to 20"),  # no graph dump, no traceback
        (["--precision", "bf16"], "bf16 is an OpenVINO export"),
        (["--precision", "int8"], "needs --calib-data"),
        (["--min-agreement", "101"], "percentage in [0, 100]"),
        (["--size", "4", "4"], "--size H W: each side from 8 to 4096 pixels"),
        (["--size", "100000", "100000"], "each side from 8 to 4096 pixels"),  # not out of memory
    ],
)
def test_bad_flags_are_one_line(random_bn_checkpoint: Path, tmp_path: Path, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        export.main([str(random_bn_checkpoint), "--out", str(tmp_path / "m.onnx"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines[0].startswith("usage:"), lines
    assert message in lines[-1].split(": error: ", 1)[1], lines
    assert "Traceback" not in "\n".join(lines) and list(tmp_path.iterdir()) == []


def test_checkpoint_saved_without_class_names_exports_its_completed_meta(tmp_path: Path) -> None:
    """A checkpoint's meta is complete when written (class_<i> names, never Cityscapes' for a
    model that was not given them): the export carries exactly that meta."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    save_checkpoint(tmp_path / "m.pth", ERFNet(num_classes=3).eval())
    export.main([str(tmp_path / "m.pth"), "--out", str(tmp_path / "m.onnx")])
    meta = load_exported(tmp_path / "m.onnx").meta
    assert meta["class_names"] == ["class_0", "class_1", "class_2"]
    assert meta == load_model(tmp_path / "m.pth").meta


def test_refused_output_paths_before_any_work(tmp_path: Path, random_bn_checkpoint: Path):
    # A corrupt checkpoint: the output path is refused first, so its error never shows.
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "folder.onnx").mkdir()
    cases = {
        str(tmp_path / "folder.onnx"): "is a folder",
        str(tmp_path / "missing" / "m.onnx"): "does not exist",
        str(tmp_path / "m.xml"): "must end in .onnx",
    }
    for out, message in cases.items():
        with pytest.raises(SystemExit) as e:
            export.main([str(bad), "--out", out, "--format", "onnx"])
        assert message in str(e.value.code), (out, e.value.code)
    same = tmp_path / "same.onnx"
    same.write_bytes(b"x")
    with pytest.raises(SystemExit, match="is the input checkpoint"):
        export.main([str(same), "--out", str(same)])
    before = sorted(tmp_path.iterdir())
    # A read-only place (procfs refuses new files even to root), through the real entry point.
    proc = run_export(str(bad), "--out", "/proc/erfnet_export_test.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --out /proc/erfnet_export_test.onnx: cannot")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("head", ["fcn", "deconv"])
def test_dynamic_onnx_matches_pytorch(tmp_path: Path, head: str, random_bn) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = random_bn(ERFNet(head=head))  # non-trivial BN statistics: folding really folds
    save_checkpoint(tmp_path / "m.pth", model.eval(), meta=cityscapes_meta())
    out = tmp_path / "m.onnx"
    export.main([str(tmp_path / "m.pth"), "--out", str(out)])
    exported = load_exported(out)
    assert exported.input_size is None and exported.output == "logits"
    for size in [(64, 128), (35, 69)]:  # an odd size shows H and W are really dynamic
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref = model(x)
        got = exported(x)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_argmax_graph_equals_argmax_of_fp32_logits(
    tmp_path: Path, random_bn_checkpoint: Path, fmt: str
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino")
    suffix = ".onnx" if fmt == "onnx" else ".xml"
    logits, labels = tmp_path / f"logits{suffix}", tmp_path / f"labels{suffix}"
    export.main([str(random_bn_checkpoint), "--out", str(logits), "--size", *SIZE])
    export.main([str(random_bn_checkpoint), "--out", str(labels), "--size", *SIZE, "--argmax"])
    graph = load_exported(labels)
    assert graph.output == "labels" and graph.input_size == (64, 128)
    x = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    got = graph(x)
    assert got.dtype == torch.int64 and got.shape == (2, 64, 128)
    assert torch.equal(got, load_exported(logits)(x).argmax(1))
    with torch.no_grad():
        ref = load_model(random_bn_checkpoint)(x).argmax(1)
    assert (got == ref).float().mean() > 0.999
    # The whole checkpoint meta round-trips through the file's metadata.
    assert graph.meta == load_model(random_bn_checkpoint).meta
    with pytest.raises(ExportError, match="exported for 64x128"):
        graph(torch.randn(1, 3, 32, 64))


@pytest.fixture(scope="module")
def gated_int8(
    tmp_path_factory: pytest.TempPathFactory, random_bn_checkpoint: Path, synthetic_root: Path
) -> dict:
    """An onnxruntime int8 export that passes a permissive gate, with its report."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    tmp = tmp_path_factory.mktemp("gated")
    out, report = tmp / "int8.onnx", tmp / "int8.json"
    export.main(
        [
            str(random_bn_checkpoint),
            "--out",
            str(out),
            "--precision",
            "int8",
            "--size",
            *SIZE,
            "--calib-data",
            str(synthetic_root),
            "--min-agreement",
            "0",
            "--max-miou-drop",
            "100",
            "--report",
            str(report),
        ]
    )
    return {"out": out, "report": json.loads(report.read_text())}


def test_gate_calibration_and_scored_files_are_disjoint(gated_int8: dict) -> None:
    r = gated_int8["report"]
    calib, scored = set(r["calibration_files"]), set(r["scored_files"])
    assert len(calib) == 4 and len(scored) == 2 and not calib & scored
    assert all("/train/" in f for f in calib) and all("/val/" in f for f in scored)
    g = r["gate"]
    assert r["accepted"] and g["scored_images"] == 2
    assert 0 < g["agreement"] < 100  # random weights: int8 flips near-ties
    assert g["miou_drop"] == pytest.approx(g["fp32_miou"] - g["export_miou"])
    assert load_exported(gated_int8["out"]).precision == "int8"


def test_one_split_is_halved(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(5):
        for kind in ("images", "labels"):
            (root / kind / "all").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images/all" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labels/all" / f"{i}.png")
    spec = {
        "names": ["a", "b"],
        "palette": [[0, 0, 0], [9, 9, 9]],
        "splits": {"all": {"images": "images/all", "labels": "labels/all"}},
    }
    (tmp_path / "c.json").write_text(json.dumps(spec))
    held = held_out_images(root, tmp_path / "c.json", 0, 0)
    calib, scored = held.calibration.files(), held.scored.files()
    assert [Path(f).stem for f in calib] == ["0", "2", "4"]
    assert [Path(f).stem for f in scored] == ["1", "3"]


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_gate_refuses_a_degraded_export_and_leaves_nothing(
    tmp_path: Path, random_bn_checkpoint: Path, synthetic_root: Path, fmt: str
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "nncf")
    suffix = ".onnx" if fmt == "onnx" else ".xml"
    out, report = tmp_path / f"m{suffix}", tmp_path / "r.json"
    proc = run_export(
        str(random_bn_checkpoint),
        "--out",
        str(out),
        "--precision",
        "int8",
        "--size",
        *SIZE,
        "--calib-data",
        str(synthetic_root),
        "--min-agreement",
        "100",
        "--report",
        str(report),
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert "refused by the accuracy gate" in err[0] and "pixel agreement" in err[0]
    assert "--min-agreement 100%" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no model, no temp files
    r = json.loads(report.read_text())
    assert r["accepted"] is False and r["gate"]["agreement"] < 100


def test_openvino_bf16_records_its_hint(
    tmp_path: Path, random_bn_checkpoint: Path, synthetic_root: Path
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    from erfnet.deploy.openvino_ir import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX)")
    out = tmp_path / "m.xml"
    report = export.main(
        [
            str(random_bn_checkpoint),
            "--out",
            str(out),
            "--precision",
            "bf16",
            "--calib-data",
            str(synthetic_root),
            "--size",
            *SIZE,
            "--min-agreement",
            "90",
            "--max-miou-drop",
            "100",
        ]
    )
    assert report["accepted"] and report["calibration_files"] == []  # nothing calibrated
    model = load_exported(out)
    assert model.precision == "bf16"
    hint = str(model.runner.get_property("INFERENCE_PRECISION_HINT"))
    assert "bfloat16" in hint or "bf16" in hint


def test_bf16_refused_without_cpu_support(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    random_bn_checkpoint: Path,
    synthetic_root: Path,
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    from erfnet.deploy import openvino_ir

    monkeypatch.setattr(openvino_ir, "cpu_supports_bf16", lambda: False)
    with pytest.raises(SystemExit, match="no native bf16"):
        export.main(
            [
                str(random_bn_checkpoint),
                "--out",
                str(tmp_path / "m.xml"),
                "--precision",
                "bf16",
                "--calib-data",
                str(synthetic_root),
            ]
        )
    assert list(tmp_path.iterdir()) == []
