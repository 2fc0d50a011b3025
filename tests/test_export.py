"""scripts/export_onnx.py: the exported graph equals PyTorch at several sizes (needs onnx and
onnxruntime, optional: skipped when absent)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from erfnet.checkpoint import save_checkpoint
from erfnet.model import ERFNet
from scripts import export_onnx

ROOT = Path(__file__).resolve().parents[1]


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, *args, **kwargs):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(SystemExit, match="pip install onnx onnxruntime"):
        export_onnx.require("onnx")


def test_bad_flags() -> None:
    with pytest.raises(SystemExit):
        export_onnx.parse_args(["--checkpoint", "c.pth", "--out", "m.onnx", "--opset", "11"])


@pytest.mark.parametrize("head", ["fcn", "deconv"])
def test_export_matches_pytorch_at_dynamic_sizes(tmp_path: Path, head: str) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ERFNet(head=head)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "m.pth"
    save_checkpoint(ckpt, model.eval())
    out = tmp_path / "m.onnx"
    result = export_onnx.main(
        ["--checkpoint", str(ckpt), "--out", str(out), "--height", "64", "--width", "128",
         "--repeats", "1"]
    )  # fmt: skip
    assert out.is_file()
    proto = onnx.load(str(out))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert "mean" in json.loads(props["erfnet_meta"])
    # The check ran at the dummy size and at an odd one (35x69).
    sizes = [r["size"] for r in result["check"]]
    assert sizes == ["64x128", "35x69"]
    for r in result["check"]:
        assert r["max_rel_diff"] < 1e-4 and r["argmax_agreement"] > 0.999
