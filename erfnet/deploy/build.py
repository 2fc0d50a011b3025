"""scripts/export.py's work: one checkpoint to one checked export file.

``check_outputs`` refuses output paths that cannot or must not be written before anything runs;
``build_export`` writes the export into a temporary folder beside ``--out``, runs the accuracy
gate (``erfnet.deploy.gate``) on it where it applies, and moves it into place only when the gate
passes, so a refused or interrupted export leaves no file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from erfnet import outputs
from erfnet.checkpoint import load_model
from erfnet.deploy import exported, gate
from erfnet.deploy.onnx import ONNX_MIN_OPSET, append_argmax, export_onnx, set_props
from erfnet.fuse import optimize_for_inference

FORMATS = ("onnx", "openvino", "pt2")
PRECISIONS = ("fp32", "bf16", "int8")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "pt2": ".pt2"}
# The INFERENCE_PRECISION_HINT each OpenVINO precision is gated and deployed with. int8 keeps
# its non-quantized layers in f32, so the gate's figures hold on CPUs with and without bf16.
OPENVINO_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
Size = tuple[int, int]


@dataclass(frozen=True)
class ExportRequest:
    """What scripts/export.py was asked for (its flags)."""

    checkpoint: Path
    out: Path
    format: str = "onnx"
    precision: str = "fp32"
    argmax: bool = False
    size: Size | None = None  # fixed (H, W) input, None = dynamic H and W
    calib_data: Path | None = None
    calib_classes: Path | None = None
    calib_images: int = 64
    score_images: int = 100
    max_miou_drop: float = gate.DEFAULT_MAX_MIOU_DROP
    min_agreement: float = gate.DEFAULT_MIN_AGREEMENT
    threads: int = 0
    opset: int = ONNX_MIN_OPSET
    nncf_options: Any = None  # erfnet.deploy.openvino_ir.NNCFOptions, None = its defaults
    cpu_target: str = "portable"  # a .pt2's: "portable" (x86-64-v3, AVX2) or "native"
    # OpenVINO int8: a key of INT8_METHODS or "qat"; None = DEFAULT_INT8_METHOD
    int8_method: str | None = None
    qat_iters: int = 0  # > 0: the "qat" method with that many steps (erfnet.deploy.qat)
    report: Path | None = None


@dataclass
class Workspace:
    """The temporary folder beside the output, and the artifact's path inside it."""

    folder: Path
    artifact: Path
    notes: list[str] = field(default_factory=list)


def _artifact_files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def check_outputs(
    out: Path, report: Path | None, fmt: str, inputs: list[tuple[str, Path | None]]
) -> None:
    """The one output rule (``erfnet.outputs.check_outputs``) for ``--out`` (with an IR's
    ``.bin``) and ``--report``: a suffix ``fmt`` takes, no input overwritten, no output on
    another (``--out q.onnx --report q.onnx``, ``--out v.xml --report v.bin``)."""
    if fmt in SUFFIX and out.suffix.lower() != SUFFIX[fmt]:
        raise exported.ExportError(f"--out {out}: a --format {fmt} file must end in {SUFFIX[fmt]}")
    sidecars = _artifact_files(out)[1:] if fmt == "openvino" else []
    outputs.check_outputs(
        outputs.output_file("--out", out, *sidecars) + outputs.output_file("--report", report),
        inputs,
    )
    if not out.parent.is_dir():  # after the rule above, which names a file in the way
        raise exported.ExportError(f"--out {out}: the folder {out.parent} does not exist")


def _fp32_onnx(model: torch.nn.Module, path: Path, req: ExportRequest, argmax: bool) -> Path:
    h, w = req.size or (512, 1024)  # a dynamic export only traces at this size
    return export_onnx(
        model, path, h, w, req.opset, model.meta, dynamic=req.size is None, argmax=argmax
    )


def _onnx_artifact(
    model: torch.nn.Module, req: ExportRequest, ws: Workspace, held: gate.HeldOut | None
) -> None:
    """The .onnx export in ``ws``: the fp32 graph, or its onnxruntime int8 quantization."""
    if req.precision == "fp32":
        _fp32_onnx(model, ws.artifact, req, req.argmax)
        return
    from erfnet.deploy.int8 import quantize_int8

    onnx = exported.require("onnx")
    fp32 = _fp32_onnx(model, ws.folder / "fp32.onnx", req, argmax=False)
    inputs = gate.NetworkInputs(held.calibration, model.meta["mean"], model.meta["std"], req.size)
    quantize_int8(fp32, ws.artifact, inputs)
    if req.argmax:  # after quantization: the argmax itself is never quantized
        proto = onnx.load(str(ws.artifact))
        append_argmax(proto)
        set_props(proto, {exported.OUTPUT_KEY: "labels"})
        onnx.save(proto, str(ws.artifact))


def _openvino_artifact(
    model: torch.nn.Module, req: ExportRequest, ws: Workspace, held: gate.HeldOut | None
) -> None:
    """The OpenVINO IR in ``ws``, converted from the fp32 ONNX export; int8 through NNCF."""
    from erfnet.deploy import openvino_ir

    exported.require("openvino")
    ir = openvino_ir.convert_onnx(_fp32_onnx(model, ws.folder / "fp32.onnx", req, argmax=False))
    if req.precision == "int8":
        exported.require("nncf")
        method = int8_method(req)
        inputs = gate.NetworkInputs(
            held.calibration, model.meta["mean"], model.meta["std"], req.size
        )
        if method == "qat":
            ir = _qat_ir(model, req, ws, inputs)
        else:
            options = req.nncf_options or openvino_ir.INT8_METHODS[method]
            ir = openvino_ir.quantize_int8(ir, inputs, options)
            ws.notes.append(f"NNCF int8 method {method}: {asdict(options)}")
    if req.argmax:
        ir = openvino_ir.append_argmax(ir)
    props = {
        exported.META_KEY: json.dumps(model.meta),
        exported.OUTPUT_KEY: "labels" if req.argmax else "logits",
        exported.PRECISION_KEY: req.precision,
        exported.HINT_KEY: OPENVINO_HINT[req.precision],
    }
    openvino_ir.save_ir(ir, ws.artifact, props)


def _qat_ir(model: torch.nn.Module, req: ExportRequest, ws: Workspace, inputs: Any) -> Any:
    """The int8 IR of quantization-aware fine-tuning on the calibration images."""
    from erfnet.deploy.qat import QATOptions, qat_int8

    options = QATOptions(iters=req.qat_iters or QATOptions.iters)
    started = time.perf_counter()
    ir, losses = qat_int8(model, inputs, req.size, options)
    ws.notes.append(
        f"int8 method qat: {asdict(options)}, loss {losses[0]:.4g} -> {losses[-1]:.4g}"
        f" in {time.perf_counter() - started:.0f} s"
    )
    return ir


def _pt2_artifact(
    model: torch.nn.Module, req: ExportRequest, ws: Workspace, held: gate.HeldOut | None
) -> None:
    """The AOTInductor package in ``ws`` (fp32, frozen weights; erfnet.deploy.aoti)."""
    from erfnet.deploy.aoti import export_pt2

    started = time.perf_counter()
    export_pt2(model, ws.artifact, model.meta, req.size, argmax=req.argmax, target=req.cpu_target)
    ws.notes.append(f"AOTInductor compile {time.perf_counter() - started:.0f} s")


# A dynamic .pt2 is checked without --calib-data at this size (a multiple of 8).
CHECK_SIZE = (256, 512)


@torch.inference_mode()
def _self_check(req: ExportRequest, model: torch.nn.Module, ws: Workspace) -> dict[str, Any]:
    """Without held-out images: the export against the fp32 model on one random input (argmax
    agreement and the largest logit difference), so that no broken file is ever written."""
    export = exported.load_exported(ws.artifact, req.threads)
    h, w = req.size or CHECK_SIZE
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    ref, got = optimize_for_inference(model)(x), export(x)
    labels = got if not got.is_floating_point() else got.argmax(1)
    figures: dict[str, Any] = {
        "input": f"one random normal {h}x{w} image (no --calib-data)",
        "agreement": 100.0 * float((labels == ref.argmax(1)).float().mean()),
        "min_agreement": req.min_agreement,
    }
    if got.is_floating_point():
        figures["max_logit_diff"] = float((got - ref).abs().max())
    return figures


def int8_method(req: ExportRequest) -> str:
    """The name of the int8 method an export uses (onnxruntime's one for an .onnx)."""
    from erfnet.deploy.openvino_ir import DEFAULT_INT8_METHOD

    if req.format == "onnx":
        return "onnxruntime MinMax per-channel"
    if req.nncf_options is not None:
        return "custom NNCFOptions"
    if req.qat_iters:
        return "qat"
    return req.int8_method or DEFAULT_INT8_METHOD


def _int8_refusal(req: ExportRequest, error: gate.GateError) -> gate.GateError:
    """A refused int8 export's message, naming the method tried and the best one measured."""
    from erfnet.deploy.openvino_ir import BEST_INT8_METHOD

    return gate.GateError(
        f"{error}; int8 method tried: {int8_method(req)} (the closest to the gate of the"
        f" methods measured in docs/deploy.md: OpenVINO --int8-method {BEST_INT8_METHOD});"
        " a bf16 (CPUs with bf16) or fp32 export keeps the labels"
    )


def _gate(
    req: ExportRequest, model: torch.nn.Module, ws: Workspace, held: gate.HeldOut
) -> dict[str, Any]:
    """Score the artifact in ``ws`` against the fp32 model on the held-out images."""
    export = exported.load_exported(ws.artifact, req.threads)
    reference = optimize_for_inference(model)
    figures = gate.score_export(
        reference, export, held.scored, model.meta, req.size, labels_out=req.argmax
    )
    figures["scored_images"] = len(held.scored)
    figures["max_miou_drop"] = req.max_miou_drop
    figures["min_agreement"] = req.min_agreement
    return figures


def _move_into_place(ws: Workspace, out: Path) -> None:
    # The IR's .bin first: an .xml is never visible without its weights. The files were
    # written (and closed) in the workspace beside ``out``: a rename replaces a planted link.
    for src, dst in reversed(
        list(zip(_artifact_files(ws.artifact), _artifact_files(out), strict=True))
    ):
        try:
            os.replace(src, dst)
        except OSError as e:
            raise exported.ExportError(
                f"--out {out}: cannot write '{dst}': {e.strerror or e}"
            ) from None


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The JSON report, by the one atomic writer."""
    outputs.atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")


def needs_gate(req: ExportRequest) -> bool:
    """Every reduced-precision export is gated; an fp32 one when --calib-data is given."""
    return req.precision != "fp32" or req.calib_data is not None


BUILDERS = {"onnx": _onnx_artifact, "openvino": _openvino_artifact, "pt2": _pt2_artifact}


def _check(
    req: ExportRequest,
    model: torch.nn.Module,
    ws: Workspace,
    held: gate.HeldOut | None,
    report: dict[str, Any],
) -> None:
    """Add the gate's figures (or, for a .pt2 without --calib-data, the self-check's) to
    ``report``; GateError when they miss a threshold, after writing the report if asked."""
    try:
        if held is not None:
            report["gate"] = _gate(req, model, ws, held)
            gate.check_gate(report["gate"], req.max_miou_drop, req.min_agreement)
        elif req.format == "pt2":
            report["self_check"] = _self_check(req, model, ws)
            gate.check_self(report["self_check"], req.min_agreement)
    except gate.GateError as e:
        report["accepted"] = False
        if req.report is not None:
            write_report(req.report, report)
        if req.precision == "int8":
            raise _int8_refusal(req, e) from None
        raise


def build_export(req: ExportRequest) -> dict[str, Any]:
    """Write the export ``req`` asks for to ``req.out``, gated; the report as a dict. Raises
    ExportError (one line) for anything the user can fix, including a gate refusal
    (``gate.GateError``), after which no output file exists; the report, when asked for, is written
    either way."""
    started = time.perf_counter()
    if req.threads:
        torch.set_num_threads(req.threads)
    model = load_model(req.checkpoint)  # its meta is complete (erfnet.checkpoint.complete_meta)
    held = None
    report: dict[str, Any] = {
        "checkpoint": str(req.checkpoint),
        "out": str(req.out),
        "format": req.format,
        "precision": req.precision,
        "argmax": req.argmax,
        "size": req.size,
        "licence": model.meta.get("licence"),
    }
    if needs_gate(req):
        held = gate.held_out_images(
            req.calib_data, req.calib_classes, req.calib_images, req.score_images
        )
        gate.check_classes(held.scored.dataset, model.meta, req.calib_data)
        report.update(
            held_out=held.how,
            calibration_files=held.calibration.files(),
            scored_files=held.scored.files(),
        )
        if req.precision != "int8":
            report["calibration_files"] = []  # only int8 is calibrated
    folder = outputs.tmp_path(req.out)  # a folder, named as the atomic writer names its files
    folder.mkdir()
    ws = Workspace(folder, folder / f"model{SUFFIX[req.format]}")
    try:
        BUILDERS[req.format](model, req, ws, held)
        report["notes"] = ws.notes
        _check(req, model, ws, held, report)
        _move_into_place(ws, req.out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["accepted"] = True
    report["files"] = [str(p) for p in _artifact_files(req.out)]
    report["size_mb"] = sum(p.stat().st_size for p in _artifact_files(req.out)) / 2**20
    report["seconds"] = time.perf_counter() - started
    if req.report is not None:
        write_report(req.report, report)
    return report
