r"""Road-anomaly evaluation (Segment-Me-If-You-Can, Fishyscapes, Road Anomaly) of a checkpoint.

    python scripts/anomaly.py --checkpoint ckpt.pth --data-root Validation_Dataset
    python scripts/anomaly.py --checkpoint ckpt.pth --data-root Validation_Dataset/RoadAnomaly21 \
        --score msp maxlogit --json ra21.json --out-dir ra21_plots

--data-root is one set (images/ and labels_masks/) or the pack's folder holding several
(RoadAnomaly21, RoadObsticle21, FS_LostFound_full, fs_static, RoadAnomaly): one table row per set
and score, one JSON. Images are resized to 512x1024 (PIL bilinear; masks PIL nearest) and
normalised with the checkpoint's own mean / std; one forward pass per image gives every score;
AuPRC, FPR95 (interpolated) and AUROC are exact over all kept pixels. Protocol, layouts and the
published table: docs/anomaly.md.
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from erfnet.checkpoint import CheckpointError, load_model
from erfnet.distributed import DeviceError, resolve_device
from erfnet.errors import FlagError, UserError, run_cli
from erfnet.evaluation.anomaly import (
    BENCHMARKS,
    DEFAULT_SIZE,
    SCORES,
    AnomalyProtocol,
    AnomalySet,
    ImageEntry,
    SetResult,
    check_model,
    check_set,
    find_sets,
    score_set,
    void_class,
)
from erfnet.evaluation.inference import MIN_VIEW
from erfnet.outputs import atomic_write_text, output_dir, output_file
from erfnet.outputs import check_outputs as check_output_rule
from erfnet.runtime import apply_cpu_plan


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
    return value


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="PATH", help="our checkpoint (.pth)")
    what.add_argument("--model", metavar="PATH",
                      help="an fp32 export (.onnx / OpenVINO .xml) with logits, on the CPU")
    p.add_argument("--data-root", metavar="DIR", required=True,
                   help="one set (DIR/images, DIR/labels_masks) or a folder of sets")
    p.add_argument("--benchmark", choices=tuple(BENCHMARKS), default=None,
                   help="the layout of a one-set --data-root whose folder name does not say it"
                   " (lostandfound: the original Lost and Found labels)")
    p.add_argument("--score", nargs="+", choices=(*SCORES, "all"), default=["all"],
                   help="scores to compute from the one forward pass (default: all; all includes"
                   " void only for a model with a void output, without --known-only)")
    p.add_argument("--temperature", type=positive_float, default=1.0, metavar="T",
                   help="softmax temperature of msp, maxentropy, energy and void (default 1)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help=f"network input size (default: {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]})")
    size.add_argument("--native", action="store_true", help="no resize: each image's own size")
    p.add_argument("--known-only", action="store_true",
                   help="score over the known classes only: drop the void output"
                   " (meta['void_class'], e.g. erfnet_pytorch's output 19)")
    p.add_argument("--json", metavar="OUT", default=None, help="write every set's results here")
    p.add_argument("--out-dir", metavar="DIR", default=None,
                   help="heat-map PNGs per image and score, ROC and PR plots (needs matplotlib)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: the free cores less one, as eval.py plans them)")
    return p
# fmt: on


def protocol_from_args(args: argparse.Namespace, model: Any) -> AnomalyProtocol:
    """The flags as an ``AnomalyProtocol``; "all" expands to the scores that apply."""
    if args.size is not None and min(args.size) < MIN_VIEW:
        raise FlagError(f"--size H W must be at least {MIN_VIEW} {MIN_VIEW}, got {args.size}")
    if args.known_only and "void" in args.score:
        raise FlagError("--score void is the void output's probability: not with --known-only")
    names = list(dict.fromkeys(args.score))
    if "all" in names:
        has_void = void_class(model) is not None and not args.known_only
        names = [s for s in SCORES if s != "void" or has_void]
    check_model(model, names, args.known_only)
    size = None if args.native else tuple(args.size or DEFAULT_SIZE)
    return AnomalyProtocol(size, tuple(names), args.temperature, args.known_only)


def load(args: argparse.Namespace) -> Any:
    """The model: our checkpoint, or an fp32 export with logits (deploy imported only here)."""
    if args.checkpoint is not None:
        try:
            return load_model(args.checkpoint, args.device)
        except CheckpointError as e:
            raise UserError(f"--checkpoint: {e}") from None
    if args.device != "cpu":
        raise FlagError(f"--model runs on the CPU, not on --device {args.device}")
    from erfnet.deploy.exported import ExportError, load_exported

    try:
        model = load_exported(args.model, args.threads or 0)
    except ExportError as e:
        raise UserError(f"--model {e}") from None
    if model.output == "labels":
        raise UserError(f"--model {args.model} ends in an argmax: no logits to score")
    if model.precision != "fp32":
        raise UserError(
            f"--model {args.model} has {model.precision} precision; anomaly scores are compared"
            " at fp32: export fp32 (scripts/export.py --precision fp32)"
        )
    return model


def print_protocol(protocol: AnomalyProtocol, model: Any, sets: list[AnomalySet]) -> None:
    d = protocol.describe(model)
    size = "native size" if d["size"] == "native" else f"{d['size'][0]}x{d['size'][1]}"
    print(
        f"protocol: images resized to {size} ({d['image_resize']}), masks {d['mask_resize']};"
        f" inputs (x - {d['mean']}) / {d['std']} on 0-255 (the checkpoint's meta); scores over"
        f" {d['scored_outputs']} {d['outputs']} outputs, T={d['temperature']:g}; metrics exact"
        f" over all kept pixels; FPR95 {d['fpr95']}"
    )
    for s in sets:
        print(
            f"{s.name} ({s.benchmark.name}): {len(s.kept)} images kept, {len(s.skipped)} skipped"
            f" (no anomaly pixel); {s.anomaly_pixels:,} anomaly / {s.known_pixels:,} known"
            f" pixels ({100 * s.anomaly_pixels / max(1, s.anomaly_pixels + s.known_pixels):.2f} %"
            " anomaly)"
        )


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def print_table(results: list[SetResult]) -> None:
    width = max(len("set"), *(len(r.aset.name) for r in results))
    print(f"{'set':<{width}}  {'score':<10}  {'AuPRC':>6}  {'FPR95':>6}  {'AUROC':>6}")
    for r in results:
        for name, m in r.metrics.items():
            print(
                f"{r.aset.name:<{width}}  {name:<10}  {_pct(m.auprc):>6}  {_pct(m.fpr95):>6}"
                f"  {_pct(m.auroc):>6}"
            )
    for r in results:
        print(
            f"{r.aset.name}: {r.seconds_per_image:.3f} s per image (read, resize, forward,"
            f" scores; {torch.get_num_threads()} torch threads)"
        )


def _pct_json(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def results_json(args: argparse.Namespace, model: Any, protocol, results) -> dict[str, Any]:
    sets = {}
    for r in results:
        s = r.aset
        scores = {
            name: {
                "auprc": _pct_json(m.auprc),
                "fpr95": _pct_json(m.fpr95),
                "fpr95_step": _pct_json(m.fpr95_step),
                "auroc": _pct_json(m.auroc),
            }
            for name, m in r.metrics.items()
        }
        sets[s.name] = {
            "benchmark": s.benchmark.name,
            "root": str(s.root),
            "images_kept": len(s.kept),
            "images_skipped": len(s.skipped),
            "anomaly_pixels": s.anomaly_pixels,
            "known_pixels": s.known_pixels,
            "seconds_per_image": r.seconds_per_image,
            "scores": scores,
        }
    return {
        "units": "percent",
        "checkpoint": args.checkpoint,
        "model": args.model,
        "precision": getattr(model, "precision", "fp32"),
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "protocol": protocol.describe(model),
        "sets": sets,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def check_outputs(args: argparse.Namespace) -> None:
    """--json and --out-dir by the one output rule (``erfnet.outputs``) before any work: neither
    is, holds or lies inside an input (the checkpoint or export, the data root), nor the other;
    --out-dir's matplotlib present."""
    outputs = [*output_file("--json", args.json), *output_dir("--out-dir", args.out_dir)]
    inputs = [("--checkpoint", args.checkpoint), ("--model", args.model)]
    if args.model is not None and Path(args.model).suffix.lower() == ".xml":
        inputs.append(("--model", Path(args.model).with_suffix(".bin")))  # the IR's weights
    check_output_rule(outputs, [*inputs, ("--data-root", args.data_root)])
    if args.out_dir is not None:
        from erfnet.evaluation.anomaly_plots import require_matplotlib

        require_matplotlib()


def write_heatmaps(folder: Path, entry: ImageEntry, maps: dict) -> None:
    """--out-dir: ``<set>/<image stem>_<score>.png`` for each score map of one image."""
    from erfnet.evaluation.anomaly_plots import write_heatmap

    for name, values in maps.items():
        write_heatmap(folder / f"{entry.image.stem}_{name}.png", values)


def main(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise FlagError(f"--threads must be at least 1, got {args.threads}")
    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        raise FlagError(str(e)) from None
    _, args.threads = apply_cpu_plan(device.type, 0, args.threads)
    check_outputs(args)
    model = load(args)
    protocol = protocol_from_args(args, model)
    fixed = getattr(model, "input_size", None)
    sets = [check_set(s, protocol.size, fixed) for s in find_sets(args.data_root, args.benchmark)]
    print_protocol(protocol, model, sets)
    out_dir = Path(args.out_dir) if args.out_dir else None
    results = []
    for s in sets:
        on_image = partial(write_heatmaps, out_dir / s.name) if out_dir else None
        result = score_set(model, s, protocol, on_image, keep_curves=out_dir is not None)
        if out_dir is not None:  # now, so that one set's curves are held at a time
            from erfnet.evaluation.anomaly_plots import write_curves

            write_curves(out_dir, s.name, result.curves, result.metrics)
            result.curves = {}
        results.append(result)
    print_table(results)
    if args.json is not None:
        write_json(Path(args.json), results_json(args, model, protocol, results))
    return 0


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    raise SystemExit(run_cli(parser, lambda: main(args)))
