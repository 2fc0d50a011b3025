"""Export a checkpoint for deployment: ONNX or OpenVINO (fp32 / bf16 / int8) or an AOTInductor
package (.pt2, fp32), checked against the fp32 model before it is written.

    python scripts/export.py ckpt.pth --out erfnet.onnx
    python scripts/export.py ckpt.pth --out erfnet.pt2 --size 512 1024 --calib-data data/cityscapes
    python scripts/export.py ckpt.pth --out erfnet.xml --format openvino --precision bf16 \\
        --size 512 1024 --calib-data data/cityscapes
    python scripts/export.py ckpt.pth --out erfnet_int8.xml --precision int8 --argmax \\
        --size 512 1024 --calib-data data/cityscapes --report int8.json

The graph takes a normalised float32 image ``input`` [N, 3, H, W] (mean / std are in the file's
metadata with the rest of the checkpoint's meta: class names, palette, ignore index, licence) and
returns ``logits`` [N, C, H, W], or with --argmax the class map ``labels`` [N, H, W] (integers).
--size H W fixes the input size (default: dynamic H and W). bf16 and int8 exports, and any export
given --calib-data, pass an accuracy gate first: calibrated on the train split of --calib-data,
scored on its val split (one split: two disjoint halves) against the fp32 PyTorch model; refused
(exit 1, no file written) when the mIoU drops by more than --max-miou-drop points or the labels
agree with fp32 on fewer than --min-agreement percent of pixels (fp32 exports: 0.05 points and
99.99 %; a .pt2 without --calib-data is checked on a random image). See docs/deploy.md.

A .pt2 is compiled native code (load only packages you made), built by default for any x86-64-v3
(AVX2) CPU; loading refuses it in one line on a CPU without the instructions it was built for.

Extras: onnx + onnxruntime (ONNX), openvino (+ onnx, for the conversion), nncf (OpenVINO int8);
exporting a .pt2 needs a C++ compiler (g++), loading one does not.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erfnet.data.from_args import data_inputs
from erfnet.deploy.build import FORMATS, PRECISIONS, ExportRequest, build_export, check_outputs
from erfnet.deploy.exported import ExportError, export_format, require
from erfnet.deploy.gate import (
    DEFAULT_MAX_MIOU_DROP,
    DEFAULT_MIN_AGREEMENT,
    FP32_MAX_MIOU_DROP,
    FP32_MIN_AGREEMENT,
)
from erfnet.deploy.onnx import ONNX_MAX_OPSET, ONNX_MIN_OPSET
from erfnet.deploy.openvino_ir import INT8_METHODS
from erfnet.deploy.qat import QATOptions
from erfnet.errors import FlagError, UserError, cli_main

MAX_SIDE = 4096  # pixels: --size's bound; the trace of a larger fixed size runs out of memory


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="our checkpoint (.pth)")
    p.add_argument("--out", type=Path, required=True,
                   help="the file to write (.onnx, .xml or .pt2)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="onnx, openvino or pt2 (default: from --out's suffix)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (exact), bf16 (OpenVINO on a CPU with bf16) or int8 (default fp32)")
    p.add_argument("--argmax", action="store_true",
                   help="end the graph in an argmax: integer labels at the input size")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help=f"fixed input size, each side 8 to {MAX_SIDE} (default: dynamic H and W)")
    p.add_argument("--calib-data", type=Path, metavar="ROOT", default=None,
                   help="dataset for calibration (train) and the gate (val); a Cityscapes layout"
                   " or, with --calib-classes, a folder dataset")
    p.add_argument("--calib-classes", type=Path, metavar="FILE", default=None,
                   help="the classes file of a folder dataset at --calib-data")
    p.add_argument("--calib-images", type=int, metavar="N", default=64,
                   help="calibration images, spread over the split (default 64; 0 = all)")
    p.add_argument("--score-images", type=int, metavar="N", default=100,
                   help="images the gate scores, spread over the split (default 100; 0 = all)")
    p.add_argument("--max-miou-drop", type=float, metavar="X", default=None,
                   help=f"refuse if mIoU drops by more than X points (default"
                   f" {DEFAULT_MAX_MIOU_DROP}; fp32 {FP32_MAX_MIOU_DROP})")
    p.add_argument("--min-agreement", type=float, metavar="P", default=None,
                   help=f"refuse if fewer than P %% of pixels keep the fp32 label (default"
                   f" {DEFAULT_MIN_AGREEMENT}; fp32 {FP32_MIN_AGREEMENT})")
    p.add_argument("--int8-method", choices=(*INT8_METHODS, "qat"), default=None,
                   help="OpenVINO int8: the NNCF settings (default float-decoder-head, the"
                   " closest post-training method measured; docs/deploy.md); float-* keep those"
                   " layers in f32; qat = quantization-aware fine-tuning towards the fp32 logits"
                   " (closer still, minutes)")
    p.add_argument("--qat-iters", type=int, metavar="N", default=None,
                   help=f"fine-tuning steps of --int8-method qat, which it implies (default"
                   f" {QATOptions.iters})")
    p.add_argument("--cpu-target", choices=("portable", "native"), default="portable",
                   help="a .pt2's CPU: portable = any x86-64-v3 (AVX2) CPU (default), native ="
                   " this CPU's instructions (AVX-512 where it has them; refused elsewhere)")
    p.add_argument("--report", type=Path, metavar="JSON", default=None,
                   help="write the figures, calibration_files and scored_files here")
    p.add_argument("--threads", type=int, metavar="N", default=0,
                   help="CPU threads for the gate (default: the runtimes' own)")
    p.add_argument("--opset", type=int, default=ONNX_MIN_OPSET,
                   help=f"ONNX opset ({ONNX_MIN_OPSET} to {ONNX_MAX_OPSET})")
    return p
# fmt: on


def check_args(args: argparse.Namespace) -> None:
    """Flag values and combinations that cannot work (``FlagError``), the input checkpoint and
    the outputs (``UserError``), before any work."""
    if args.format is None:
        try:
            args.format = export_format(args.out)
        except ExportError:
            raise FlagError(
                f"--out {args.out}: end it in .onnx, .xml or .pt2, or give --format"
            ) from None
    if args.precision != "fp32" and args.format == "pt2":
        raise FlagError(
            f"--precision {args.precision}: a .pt2 is fp32 (exact); bf16 and int8 are"
            " OpenVINO / ONNX exports"
        )
    if args.qat_iters is not None:
        if args.qat_iters < 1 or args.int8_method not in (None, "qat"):
            raise FlagError(
                f"--qat-iters N: a number of steps >= 1 for --int8-method qat, got"
                f" {args.qat_iters} with --int8-method {args.int8_method or 'qat'}"
            )
        args.int8_method = "qat"
    if args.int8_method is not None and (args.precision, args.format) != ("int8", "openvino"):
        flag = "--qat-iters" if args.qat_iters is not None else "--int8-method"
        raise FlagError(f"{flag} is for --precision int8 --format openvino (NNCF)")
    if args.precision == "bf16" and args.format != "openvino":
        raise FlagError("--precision bf16 is an OpenVINO export: add --format openvino")
    if args.precision != "fp32" and args.calib_data is None:
        raise FlagError(
            f"--precision {args.precision} needs --calib-data ROOT: the accuracy gate scores it"
            " on held-out images"
        )
    if args.calib_classes is not None and args.calib_data is None:
        raise FlagError("--calib-classes describes the dataset at --calib-data; add it")
    if args.size is not None and not all(8 <= side <= MAX_SIDE for side in args.size):
        raise FlagError(
            f"--size H W: each side from 8 to {MAX_SIDE} pixels (a larger trace would not fit"
            f" in memory), got {args.size[0]} {args.size[1]}"
        )
    if args.calib_images < 0 or args.score_images < 0 or args.threads < 0:
        raise FlagError("--calib-images, --score-images and --threads must be >= 0")
    fp32 = args.precision == "fp32"
    if args.max_miou_drop is None:
        args.max_miou_drop = FP32_MAX_MIOU_DROP if fp32 else DEFAULT_MAX_MIOU_DROP
    if args.min_agreement is None:
        args.min_agreement = FP32_MIN_AGREEMENT if fp32 else DEFAULT_MIN_AGREEMENT
    if not 0.0 <= args.min_agreement <= 100.0:
        raise FlagError(f"--min-agreement is a percentage in [0, 100], got {args.min_agreement}")
    if not ONNX_MIN_OPSET <= args.opset <= ONNX_MAX_OPSET:
        raise FlagError(
            f"--opset must be from {ONNX_MIN_OPSET} to {ONNX_MAX_OPSET} (what the exporter"
            f" writes), got {args.opset}"
        )
    if args.calib_data is not None and not args.calib_data.is_dir():
        raise UserError(f"--calib-data {args.calib_data} is not a folder")
    if not args.checkpoint.is_file():
        raise UserError(f"checkpoint {args.checkpoint} is not a file")
    check_outputs(args.out, args.report, args.format, export_inputs(args))


def export_inputs(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """What the export reads: the checkpoint and the held-out data (root, classes file, splits)."""
    calib = data_inputs(
        args.calib_data,
        args.calib_classes,
        root_flag="--calib-data",
        classes_flag="--calib-classes",
    )
    return [("checkpoint", args.checkpoint), *calib]


def check_extras(args: argparse.Namespace) -> None:
    """The optional packages this export needs, a bf16-capable CPU for bf16, a C++ compiler
    for a .pt2."""
    if args.format == "pt2":
        from erfnet.deploy.aoti import check_compiler

        check_compiler()
        return
    needed = {"onnx": ["onnx", "onnxruntime"], "openvino": ["onnx", "openvino"]}[args.format]
    if args.precision == "int8" and args.format == "openvino":
        needed.append("nncf")
    for module in needed:
        require(module)
    if args.precision == "bf16":
        from erfnet.deploy.openvino_ir import cpu_supports_bf16

        if not cpu_supports_bf16():
            raise ExportError(
                "--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), OpenVINO"
                " would run it in f32; export fp32 or int8 instead"
            )


def request(args: argparse.Namespace) -> ExportRequest:
    return ExportRequest(
        checkpoint=args.checkpoint,
        out=args.out,
        format=args.format,
        precision=args.precision,
        argmax=args.argmax,
        size=tuple(args.size) if args.size else None,
        calib_data=args.calib_data,
        calib_classes=args.calib_classes,
        calib_images=args.calib_images,
        score_images=args.score_images,
        max_miou_drop=args.max_miou_drop,
        min_agreement=args.min_agreement,
        threads=args.threads,
        opset=args.opset,
        cpu_target=args.cpu_target,
        int8_method=args.int8_method,
        qat_iters=args.qat_iters or 0,
        report=args.report,
    )


def summary(report: dict[str, Any]) -> str:
    """The lines printed after an export."""
    lines = [
        f"wrote {', '.join(report['files'])} ({report['size_mb']:.1f} MiB,"
        f" {report['format']} {report['precision']}, output"
        f" {'labels' if report['argmax'] else 'logits'}) in {report['seconds']:.1f} s"
    ]
    if "self_check" in report:
        c = report["self_check"]
        diff = (
            f", largest logit difference {c['max_logit_diff']:.2g}" if "max_logit_diff" in c else ""
        )
        lines.append(
            f"checked on {c['input']}: pixel agreement with fp32 {c['agreement']:.2f}%{diff}"
            " (give --calib-data to score it on held-out images)"
        )
    if "gate" in report:
        g = report["gate"]
        lines.append(
            f"gate passed on {g['scored_images']} held-out image(s) ({report['held_out']}):"
            f" mIoU fp32 {g['fp32_miou']:.2f} / export {g['export_miou']:.2f} (drop"
            f" {g['miou_drop']:.2f} <= {g['max_miou_drop']:g}), pixel agreement"
            f" {g['agreement']:.2f}% >= {g['min_agreement']:g}%"
        )
    if report.get("licence"):
        lines.append(f"licence of the weights (in the file's metadata): {report['licence']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    check_extras(args)
    report = build_export(request(args))
    print(summary(report))
    if args.report is not None:
        print(f"report: {args.report}")
    return json.loads(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
