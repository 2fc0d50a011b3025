"""The one ONNX exporter and the one onnxruntime session builder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erfnet.deploy.exported import META_KEY
from erfnet.fuse import fuse_bn

ONNX_MIN_OPSET = 17


def export_onnx(
    model: nn.Module,
    out: str | Path,
    height: int = 512,
    width: int = 1024,
    opset: int = ONNX_MIN_OPSET,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``fuse_bn(model)`` to ``out`` as ONNX with dynamic N, H and W axes.

    The graph takes ``input`` [N, 3, H, W] and returns ``logits`` [N, C, H, W]; ``height`` and
    ``width`` only size the dummy input used for tracing. ``meta`` (the checkpoint's) goes into the
    file's metadata as JSON under ``META_KEY``. Needs the optional ``onnx`` package.
    """
    import onnx  # optional extra: pip install onnx onnxruntime

    fused = fuse_bn(model).cpu().float()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript exporter (dynamo=False) needs no onnxscript and keeps H and W dynamic
    # through model.py's resizes, which are always recorded while exporting.
    torch.onnx.export(
        fused,
        (torch.randn(1, 3, height, width),),
        str(out),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        opset_version=opset,
        dynamic_axes={"input": axes, "logits": axes},
        do_constant_folding=True,
    )
    if meta:
        proto = onnx.load(str(out))
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        onnx.save(proto, str(out))
    return out
