"""The one ONNX exporter: BatchNorm folded, a fixed or dynamic input size, logits or labels out.

Every export (the ONNX file itself, the onnxruntime int8 graph, the OpenVINO IR converted from
it) starts here, so the graph and its metadata are written in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erfnet.deploy.exported import META_KEY, OUTPUT_KEY, PRECISION_KEY, require
from erfnet.fuse import fuse_bn

ONNX_MIN_OPSET = 17
ONNX_MAX_OPSET = 20  # the highest the TorchScript exporter (dynamo=False, used below) writes
INPUT_NAME = "input"


def export_onnx(
    model: nn.Module,
    out: str | Path,
    height: int = 512,
    width: int = 1024,
    opset: int = ONNX_MIN_OPSET,
    meta: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
    argmax: bool = False,
) -> Path:
    """Write ``fuse_bn(model)`` to ``out`` as ONNX: ``input`` [N, 3, H, W] (normalised float32)
    to ``logits`` [N, C, H, W] or, with ``argmax``, int64 ``labels`` [N, H, W]. ``dynamic``: H
    and W are free and ``height`` / ``width`` only size the tracing input (N is always free).
    ``meta`` goes into the file's metadata as JSON under ``META_KEY``."""
    onnx = require("onnx")
    fused = fuse_bn(model).cpu().float()
    out = Path(out)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    # The TorchScript exporter (dynamo=False) needs no onnxscript and keeps H and W dynamic
    # through model.py's resizes, which are always recorded while exporting. Its deprecation
    # warnings are left to the warning filters (hidden by default outside __main__).
    torch.onnx.export(
        fused,
        (torch.randn(1, 3, height, width),),
        str(out),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=["logits"],
        opset_version=opset,
        dynamic_axes={INPUT_NAME: axes, "logits": axes},
        do_constant_folding=True,
    )
    proto = onnx.load(str(out))
    if argmax:
        append_argmax(proto)
    props = {OUTPUT_KEY: "labels" if argmax else "logits", PRECISION_KEY: "fp32"}
    if meta:
        props[META_KEY] = json.dumps(meta)
    set_props(proto, props)
    onnx.save(proto, str(out))
    return out


def append_argmax(proto: Any) -> None:
    """End the graph (in place) in ``labels`` = int64 argmax over the class axis of its output
    (ONNX's ArgMax, like ``torch.argmax``, returns the first index among equal maxima)."""
    onnx = require("onnx")
    graph = proto.graph
    logits = graph.output[0]
    node = onnx.helper.make_node(
        "ArgMax", [logits.name], ["labels"], axis=1, keepdims=0, select_last_index=0
    )
    graph.node.append(node)
    dims = [d for i, d in enumerate(logits.type.tensor_type.shape.dim) if i != 1]
    shape = [d.dim_param or d.dim_value for d in dims]
    labels = onnx.helper.make_tensor_value_info("labels", onnx.TensorProto.INT64, shape)
    del graph.output[:]
    graph.output.append(labels)


def set_props(proto: Any, props: Mapping[str, str]) -> None:
    """Set (add or replace) metadata_props entries of an ONNX ModelProto in place."""
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for p in kept:
        proto.metadata_props.add().CopyFrom(p)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_props(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (weights not loaded)."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
