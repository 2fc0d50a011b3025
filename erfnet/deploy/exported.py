"""Run an exported ERFNet (an ONNX file through onnxruntime, an OpenVINO ``.xml``, an
AOTInductor ``.pt2`` package) as a model.

``load_exported(path)`` gives an ``ExportedModel``: called on a normalised float batch
[N, 3, H, W] it returns float logits [N, C, H, W] (or, for a graph exported with ``--argmax``,
int64 labels [N, H, W]), like ``ERFNet.forward`` in eval mode, so evaluation, prediction and
video code treat it as one more model. Its ``meta`` is the checkpoint meta that the export wrote
into the file (class names, palette, ignore index, mean/std, licence): the one reader of that
metadata. ``onnx_session`` is the one onnxruntime session builder of the project.

onnxruntime, onnx and openvino are optional extras, imported only here and only when needed.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erfnet.checkpoint import CheckpointError, complete_meta, load_model
from erfnet.errors import UserError

# One metadata key holds the whole checkpoint meta as JSON, in ONNX metadata_props and in
# OpenVINO's rt_info alike; META_KEY's sibling keys describe the graph itself.
META_KEY = "erfnet_meta"
OUTPUT_KEY = "erfnet_output"  # "logits" or "labels"
PRECISION_KEY = "erfnet_precision"  # "fp32", "bf16" or "int8"
# OpenVINO only: the INFERENCE_PRECISION_HINT the accuracy gate ran the IR with ("f32" or "bf16"),
# applied again on every load (OpenVINO's own default is bf16 on a CPU with AMX, even for an
# fp32 IR).
HINT_KEY = "erfnet_inference_precision"
PROP_KEYS = (META_KEY, OUTPUT_KEY, PRECISION_KEY, HINT_KEY)
FORMATS = {".onnx": "onnx", ".xml": "openvino", ".pt2": "pt2"}
INSTALL_HINTS = {
    "onnx": "pip install onnx onnxruntime",
    "onnxruntime": "pip install onnx onnxruntime",
    "openvino": "pip install openvino",
    "nncf": "pip install nncf openvino",
}


class ExportError(UserError):
    """An exported model that cannot be written, read or run; the message is one line."""


def require(module: str) -> Any:
    """Import an optional extra, or raise ExportError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = INSTALL_HINTS.get(module.split(".")[0], f"pip install {module}")
        raise ExportError(f"this needs the optional package '{module}': {hint}") from None


def export_format(path: str | Path) -> str:
    """'onnx' or 'openvino' from the file's suffix; ExportError for anything else."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ExportError(f"{path}: expected an exported model ending in .onnx, .xml or .pt2")
    return fmt


def onnx_session(path: str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session with every graph optimisation on (``threads`` 0 = default)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # no warnings about unused initialisers on every load
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def openvino_model(path: str | Path) -> tuple[Any, dict[str, str]]:
    """An IR read from ``path`` and its erfnet metadata (rt_info ``["erfnet", key]``)."""
    ov = require("openvino")
    model = ov.Core().read_model(str(path))
    keys = [key for key in PROP_KEYS if model.has_rt_info(["erfnet", key])]
    return model, {key: model.get_rt_info(["erfnet", key]).astype(str) for key in keys}


def openvino_compiled(path: str | Path | Any, threads: int = 0, hint: str | None = None) -> Any:
    """An OpenVINO CPU compiled model of an IR file or ``openvino.Model`` (``hint``: None =
    OpenVINO's default precision, or "f32" / "bf16")."""
    ov = require("openvino")
    config: dict[str, Any] = {}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    core = ov.Core()
    model = core.read_model(str(path)) if isinstance(path, str | Path) else path
    return core.compile_model(model, "CPU", config)


def _onnx_props(session: Any) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def _legacy_meta(props: dict[str, str]) -> dict[str, Any]:
    """Files from before META_KEY kept mean / std / class_names / palette as separate keys."""
    keys = ("mean", "std", "class_names", "palette")
    return {k: json.loads(props[k]) for k in keys if k in props}


@dataclass
class ExportedModel:
    """An exported graph behind the call signature of an eval-mode ERFNet (CPU tensors)."""

    path: Path
    format: str  # "onnx", "openvino" or "pt2"
    runner: Any  # onnxruntime.InferenceSession, openvino.CompiledModel or an AOTInductor model
    meta: dict[str, Any]
    output: str = "logits"  # or "labels" (argmax in the graph)
    precision: str = "fp32"
    input_size: tuple[int, int] | None = None  # fixed (H, W), or None when H and W are dynamic
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    def eval(self) -> ExportedModel:  # so code written for nn.Module may call it
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise ExportError(
                f"{self.path.name}: exported for {h}x{w} inputs, got {x.shape[-2]}x{x.shape[-1]}"
                " (export with a dynamic size, or evaluate at that size)"
            )
        if self.format == "pt2":
            from erfnet.deploy.aoti import run_pt2

            out = run_pt2(self.runner, x.detach().cpu(), dynamic=self.input_size is None)
        else:
            data = np.ascontiguousarray(x.detach().float().cpu().numpy())
            if self.format == "onnx":
                out = self.runner.run(None, {self.runner.get_inputs()[0].name: data})[0]
            else:
                out = self.runner(data)[0]
            out = torch.from_numpy(np.asarray(out))
        return out.long() if self.output == "labels" else out.float()


def runtime_reason(e: BaseException) -> str:
    """The reason in an onnxruntime / OpenVINO error, in one line: OpenVINO's text opens with
    lines that say where in its C++ it failed ("Exception from src/...cpp:84:", "Check '...'
    failed at ..."), the reason comes after them."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    where = ("Exception from ", "Check '")
    reason = [line for line in lines if not line.startswith(where)]
    return " ".join(reason or lines) or type(e).__name__


def _fixed_size(shape: list[Any]) -> tuple[int, int] | None:
    h, w = shape[-2], shape[-1]
    return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None


def _load_pt2(path: Path, threads: int) -> tuple[Any, dict[str, str], tuple[int, int] | None]:
    """An AOTInductor package (native code: see erfnet.deploy.aoti), after its CPU check."""
    from erfnet.deploy.aoti import fixed_size, load_pt2

    if threads:
        torch.set_num_threads(threads)  # the package runs on PyTorch's intra-op threads
    runner, props = load_pt2(path)
    return runner, props, fixed_size(props)


def load_exported(path: str | Path, threads: int = 0) -> ExportedModel:
    """Load ``path`` (.onnx, OpenVINO .xml or AOTInductor .pt2) for CPU inference; ExportError
    (one line) if it is missing, unreadable, was not written by this project's exporter, or (a
    .pt2) was compiled for instructions this CPU lacks."""
    path = Path(path)
    fmt = export_format(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        if fmt == "pt2":
            runner, props, size = _load_pt2(path, threads)
        elif fmt == "onnx":
            runner = onnx_session(path, threads)
            props = _onnx_props(runner)
            size = _fixed_size(runner.get_inputs()[0].shape)
        else:
            model, props = openvino_model(path)
            runner = openvino_compiled(model, threads, props.get(HINT_KEY))
            h, w = runner.input(0).get_partial_shape()[-2:]
            size = None if h.is_dynamic or w.is_dynamic else (h.get_length(), w.get_length())
    except ExportError:
        raise
    except Exception as e:  # the runtimes raise their own exception types
        raise ExportError(f"{path}: cannot load: {runtime_reason(e)}") from None
    meta = json.loads(props[META_KEY]) if META_KEY in props else _legacy_meta(props)
    if "class_names" not in meta or "mean" not in meta or "std" not in meta:
        raise ExportError(
            f"{path}: no erfnet metadata (class names, mean/std); export it with scripts/export.py"
        )
    meta = complete_meta(meta, len(meta["class_names"]))  # what an older export lacks
    output, precision = props.get(OUTPUT_KEY, "logits"), props.get(PRECISION_KEY, "fp32")
    return ExportedModel(path, fmt, runner, meta, output, precision, input_size=size)


def load_network(
    checkpoint: str | Path | None,
    exported: str | Path | None,
    device: torch.device,
    threads: int = 0,
    fast: bool = False,
) -> Any:
    """What an entry point's --checkpoint or --model names: our checkpoint through
    ``load_model`` (``fast``: BN folded, channels_last) on ``device``, or an exported graph on
    the CPU with ``threads``. A file that cannot be loaded is one line naming the flag."""
    if exported is None:
        try:
            return load_model(checkpoint, device, fast=fast)
        except CheckpointError as e:
            raise CheckpointError(f"--checkpoint: {e}") from None
    try:
        return load_exported(exported, threads)
    except ExportError as e:
        raise ExportError(f"--model {e}") from None
