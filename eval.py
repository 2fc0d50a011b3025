"""Evaluate an ERFNet checkpoint on Cityscapes exactly as mmsegmentation reports its numbers.

    python eval.py --checkpoint erfnet.pth                      # val, single scale (whole image)
    python eval.py --checkpoint erfnet.pth --ms-flip            # 6 scales x flip
    python eval.py --checkpoint erfnet.pth --split test --out-dir submission/
    torchrun --nproc_per_node=4 eval.py --checkpoint erfnet.pth # shards images, same result
    python eval.py --checkpoint best.pth --data folder --data-root DIR --classes FILE --out-dir r/
    python eval.py --model erfnet.onnx                          # an export (.onnx / OpenVINO .xml)

Sizes are given as H W. The metric is mmseg's (and the official evaluator's) dataset-wide IoU.
Images are resized on the 0-255 scale and normalised with the checkpoint's own mean / std
(``meta["mean"]`` / ``["std"]``); the classes scored and their names are the dataset's.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from erfnet.checkpoint import CheckpointError, load_model
from erfnet.data import CityscapesDataset, DatasetError, EvalTransform
from erfnet.data.check import check_datasets
from erfnet.data.folder import FolderDataset, FolderSpec, load_spec
from erfnet.data.from_args import (
    DATA_KINDS,
    DataFlagError,
    check_data_flags,
    data_root_from_args,
    dataset_from_args,
)
from erfnet.distributed import (
    cleanup_distributed,
    init_distributed,
    local_rank_from_env,
    resolve_device,
)
from erfnet.evaluation.cityscapes_submission import SubmissionWriter
from erfnet.evaluation.evaluate import build_eval_loader, evaluate, scored_classes
from erfnet.evaluation.inference import DEFAULT_SETTINGS, MIN_VIEW, MODES, TestSettings, ratio_scale
from erfnet.evaluation.metrics import format_table
from erfnet.evaluation.reports import write_reports
from erfnet.evaluation.visualize import ColorWriter
from erfnet.runtime import (
    OutputError,
    apply_cpu_plan,
    check_output_dir,
    check_output_file,
    one_line,
)

_RATIOS = " ".join(map(str, DEFAULT_SETTINGS.ratios))
_SCALE = " ".join(map(str, DEFAULT_SETTINGS.scale))


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    """eval.py's flags: what to score, on which data, with which protocol, and the outputs."""
    p = argparse.ArgumentParser(
        description="Evaluate an ERFNet checkpoint on Cityscapes (mmseg protocol)."
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="PATH", help="our checkpoint (.pth)")
    what.add_argument(
        "--model",
        metavar="PATH",
        help="an exported model (.onnx through onnxruntime, OpenVINO .xml, AOTInductor .pt2),"
        " on the CPU; needs the optional onnxruntime / openvino package (a .pt2: PyTorch only)",
    )
    p.add_argument(
        "--data",
        choices=DATA_KINDS,
        default="cityscapes",
        help="Cityscapes, the quick start's synthetic set, or your own folders described by"
        " --classes FILE (default: cityscapes)",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="dataset root (Cityscapes default: $CITYSCAPES_DATASET, else data/cityscapes)",
    )
    p.add_argument(
        "--classes",
        metavar="FILE",
        default=None,
        help="--data folder: the dataset's JSON classes file (README: Train on your own data)",
    )
    p.add_argument(
        "--split",
        choices=("val", "test", "train"),
        default="val",
        help="split to evaluate (default: val); test only writes --out-dir predictions",
    )
    p.add_argument(
        "--ms-flip",
        action="store_true",
        help="multi-scale + flip test: softmax of every ratio x (no flip, flip) view averaged",
    )
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        metavar="R",
        default=None,
        help=f"ratios of --scale for --ms-flip (default: {_RATIOS})",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=DEFAULT_SETTINGS.mode,
        help=f"whole image (default), or sliding {DEFAULT_SETTINGS.slide_crop} crops, stride"
        f" {DEFAULT_SETTINGS.slide_stride}",
    )
    p.add_argument(
        "--scale",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help=f"test resize, keeping the image's ratio (default: {_SCALE}; a fixed-size export:"
        " its input size)",
    )
    p.add_argument(
        "--out-dir",
        metavar="DIR",
        default=None,
        help="write official submission PNGs (Cityscapes label ids, original size) in per-city"
        " folders and, for a labelled split, the confusion matrix (.npy, .json, .png) and a"
        " per-class IoU chart",
    )
    p.add_argument(
        "--save-color",
        metavar="DIR",
        default=None,
        help="write colour renderings and blends over the image (apart from --out-dir)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="write the metrics as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="DataLoader workers (default: what the machine's free cores allow)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: the free cores less one, as train.py plans them)",
    )
    p.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    return p
# fmt: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, as SystemExit messages."""
    try:
        check_data_flags(args)
    except DataFlagError as e:
        raise SystemExit(f"error: {e}") from None
    if args.split == "test" and args.out_dir is None and args.data != "folder":
        raise SystemExit(
            "error: --split test has no labels to score; add --out-dir DIR to write the"
            " submission PNGs"
        )
    if args.scales is not None and not args.ms_flip:
        raise SystemExit("error: --scales sets the --ms-flip ratios; add --ms-flip")
    if args.scales is not None and not all(r > 0 and math.isfinite(r) for r in args.scales):
        raise SystemExit(f"error: --scales must be positive ratios, got {args.scales}")
    check_sizes(args)
    if args.workers is not None and args.workers < 0:
        raise SystemExit(f"error: --workers must be >= 0, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads must be at least 1, got {args.threads}")
    check_outputs(args)
    if args.out_dir is not None and args.save_color is not None:
        out, color = Path(args.out_dir).resolve(), Path(args.save_color).resolve()
        if out == color or out in color.parents or color in out.parents:
            raise SystemExit(
                f"error: --save-color {args.save_color} must be outside --out-dir {args.out_dir}:"
                " the official evaluator rejects a second PNG per image under its folder"
            )


def check_sizes(args: argparse.Namespace) -> None:
    """--scale and the --ms-flip views it gives must reach the network's minimum size."""
    scale = args.scale if args.scale is not None else DEFAULT_SETTINGS.scale
    if min(scale) < MIN_VIEW:
        raise SystemExit(
            f"error: --scale H W must be at least {MIN_VIEW} {MIN_VIEW} (the network's"
            f" minimum input), got {scale[0]} {scale[1]}"
        )
    for r in args.scales or ():
        if min(ratio_scale(scale, r)) < MIN_VIEW:
            h, w = ratio_scale(scale, r)
            raise SystemExit(
                f"error: --scales {r:g} makes {h}x{w} views of --scale {scale[0]} {scale[1]},"
                f" under the network's minimum {MIN_VIEW}x{MIN_VIEW}"
            )


def check_outputs(args: argparse.Namespace, data_root: Path | None = None) -> None:
    """Every output location, before the (possibly hours-long) evaluation: writable, of the
    right kind, and none of the inputs (nor inside the dataset, with ``data_root``)."""
    try:
        for flag, value in (("--out-dir", args.out_dir), ("--save-color", args.save_color)):
            if value is not None:
                check_output_dir(value, flag, [data_root])
        if args.json is not None:
            check_output_file(args.json, "--json", [args.checkpoint, args.model, args.classes])
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None


def settings_from_args(args: argparse.Namespace) -> TestSettings:
    """The flags as ``TestSettings`` (defaults: mmseg's protocol)."""
    ratios = {"ratios": tuple(args.scales)} if args.scales is not None else {}
    scale = tuple(args.scale) if args.scale is not None else DEFAULT_SETTINGS.scale
    return TestSettings(scale=scale, mode=args.mode, ms_flip=args.ms_flip, amp=args.amp, **ratios)


def load_for_eval(args: argparse.Namespace, device: torch.device, threads: int) -> Any:
    """The model to score: our checkpoint's plain weights (no BN folding: folding changes float
    rounding, so not bit-exact), or with --model an exported graph."""
    if args.model is not None:
        return load_export(args, threads)
    try:
        return load_model(args.checkpoint, device)
    except CheckpointError as e:
        raise SystemExit(f"error: --checkpoint: {e}") from None


def load_export(args: argparse.Namespace, threads: int) -> Any:
    """--model: an .onnx or OpenVINO .xml (deploy is an opt-in layer: imported here only), with
    the views the protocol asks for checked against what the graph accepts."""
    from erfnet.deploy.exported import ExportError, load_exported

    try:
        model = load_exported(args.model, threads)
    except ExportError as e:
        raise SystemExit(f"error: --model {e}") from None
    if model.output == "labels" and (args.ms_flip or args.mode != "whole"):
        raise SystemExit(
            f"error: --model {args.model} ends in an argmax (it outputs labels): only the"
            " whole-image single-scale test applies; drop --ms-flip / --mode slide"
        )
    if model.input_size is not None:
        args.scale = check_fixed_size(args, model.input_size)
    return model


def check_fixed_size(args: argparse.Namespace, size: tuple[int, int]) -> list[int]:
    """--scale for an export fixed to ``size`` inputs (default: that size); views of any other
    size are refused in one line before the evaluation."""
    h, w = size
    scale = list(size) if args.scale is None else list(args.scale)
    settings = settings_from_args(argparse.Namespace(**{**vars(args), "scale": scale}))
    why = None
    if settings.mode == "whole" and tuple(scale) != size:
        why = f"--scale {scale[0]} {scale[1]}"
    elif settings.mode == "slide" and settings.slide_crop != size:
        why = f"slide crops of {settings.slide_crop[0]}x{settings.slide_crop[1]}"
    elif any(r != 1.0 for r in settings.view_ratios):
        why = f"--ms-flip ratios {list(settings.view_ratios)} (views of other sizes)"
    if why:
        raise SystemExit(
            f"error: --model {args.model} takes only {h}x{w} inputs (a fixed-size export), not"
            f" {why}; export with a dynamic size, or evaluate at {h}x{w}"
        )
    return scale


def check_classes(model: Any, classes: Sequence[str], args: argparse.Namespace) -> None:
    """The model must predict the dataset's classes (``scored_classes``' rule)."""
    try:
        scored_classes(model, len(classes))
    except ValueError as e:
        flag = f"--model {args.model}" if args.model else f"--checkpoint {args.checkpoint}"
        raise SystemExit(f"error: {flag}: {e}") from None


def prediction_writers(
    args: argparse.Namespace, model: Any, dataset: CityscapesDataset | FolderDataset
) -> Callable[[torch.Tensor, dict], None] | None:
    """``evaluate``'s ``on_prediction``: the test-server PNGs (--out-dir, Cityscapes) and the
    colour renderings (--save-color, in the model's palette), or None."""
    writers: list[Callable[[torch.Tensor, dict], None]] = []
    if args.out_dir is not None and args.data == "cityscapes":
        writers.append(SubmissionWriter(Path(args.out_dir), dataset.classes))
    if args.save_color is not None:
        writers.append(ColorWriter(Path(args.save_color), model.meta["palette"]))
    return functools.partial(call_each, writers) if writers else None


def call_each(
    writers: Sequence[Callable[[torch.Tensor, dict], None]], preds: torch.Tensor, batch: dict
) -> None:
    for write in writers:
        write(preds, batch)


def check_folder_split(root: Path, spec: FolderSpec, split: str) -> None:
    """A folder dataset's splits are scored, so they need labels; an unlabelled test split is
    the Cityscapes test-server case, which has no equivalent here: say so."""
    if split != "test":
        return
    classes = spec.path
    try:
        labels = root / spec.split_dirs(split)[1]
    except DatasetError:
        labels = None
    if labels is None or not labels.is_dir():
        where = f"'{labels}' does not exist" if labels is not None else "is not in its splits"
        raise DatasetError(
            f"split 'test' of classes file '{classes}' has no labels ({where}): the test-server"
            " PNGs (--split test --out-dir, Cityscapes label ids) exist for Cityscapes only;"
            " eval.py scores labelled splits of a folder dataset, and scripts/predict.py"
            " predicts unlabelled images"
        )


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


def results_json(
    results: dict | None, args: argparse.Namespace, num_images: int, class_names: Sequence[str]
) -> dict:
    settings = settings_from_args(args)
    num = _num
    out: dict = {}
    if results is not None:
        out = {
            "mIoU": num(results["mIoU"]),
            "mAcc": num(results["mAcc"]),
            "aAcc": num(results["aAcc"]),
            "IoU": {n: num(v) for n, v in zip(class_names, results["IoU"], strict=True)},
            "Acc": {n: num(v) for n, v in zip(class_names, results["Acc"], strict=True)},
        }
    out.update(
        checkpoint=args.checkpoint and str(args.checkpoint),
        model=args.model and str(args.model),
        ms_flip=settings.ms_flip,
        scales=list(settings.view_ratios),
        mode=settings.mode,
        scale=list(settings.scale),
        split=args.split,
        num_images=num_images,
        amp=settings.amp,
    )
    return out


def get_device(args: argparse.Namespace) -> torch.device:
    """--device as a torch.device; an export (--model) runs on the CPU."""
    if args.model is not None and args.device not in (None, "cpu", "auto"):
        raise SystemExit(
            f"error: --model runs on the CPU (onnxruntime / OpenVINO), not on"
            f" --device {args.device}"
        )
    try:
        return resolve_device("cpu" if args.model else args.device, local_rank_from_env())
    except ValueError as e:  # a --device this machine does not have
        raise SystemExit(f"error: {e}") from None


def get_dataset(args: argparse.Namespace, model: Any) -> CityscapesDataset | FolderDataset:
    """The split to score (checked: images, classes the model predicts, outputs outside it)."""
    root = data_root_from_args(args)
    check_outputs(args, root)
    # ms+flip resizes every view from the original image, as mmseg's MultiScaleFlipAug does; a
    # first resize to --scale would blur the views above ratio 1.
    transform = EvalTransform(None if args.ms_flip else settings_from_args(args).scale)
    if args.data == "folder":
        check_folder_split(root, load_spec(args.classes), args.split)
    (dataset,) = dataset_from_args(args, [args.split], {args.split: transform})
    if len(dataset) == 0:
        raise DatasetError(f"split '{args.split}' under '{root}' has no images")
    check_classes(model, dataset.classes, args)
    # Every file before the first image is scored: a damaged PNG would otherwise stop the run
    # late, or kill it (torchvision's libpng aborts on PNG data shorter than its size).
    check_datasets({args.split: dataset}, progress=False)
    return dataset


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    device = get_device(args)
    info = init_distributed(device)
    try:
        # One thread plan with train.py: threads + workers leave a core free on the CPU.
        workers, threads = apply_cpu_plan(device.type, args.workers, args.threads)
        if args.amp and device.type != "cuda" and info.is_main:
            print("note: --amp only applies on CUDA; evaluating in float32", file=sys.stderr)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes
        model = load_for_eval(args, device, threads)
        try:
            dataset = get_dataset(args, model)
            results = evaluate(
                model,
                build_eval_loader(dataset, workers=workers),
                device,
                settings_from_args(args),
                num_classes=len(dataset.classes),
                on_prediction=prediction_writers(args, model, dataset),
                progress=info.is_main,
            )
            if info.is_main:
                report(args, dataset, results, model.meta["class_names"])
        except (ValueError, OSError) as e:  # DatasetError included, also from loader workers
            raise SystemExit(f"error: {one_line(e)}") from None
    finally:
        cleanup_distributed()
    return 0


def report(
    args: argparse.Namespace,
    dataset: CityscapesDataset | FolderDataset,
    results: dict | None,
    output_names: Sequence[str] | None = None,
) -> None:
    """The console table, the --out-dir reports and the --json file (rank 0)."""
    how = f"ms+flip {list(settings_from_args(args).ratios)}" if args.ms_flip else "single scale"
    scale = list(settings_from_args(args).scale)
    print(f"{args.split}: {len(dataset)} images, {how}, mode {args.mode}, scale {scale}")
    if results is not None:
        print(format_table(results, dataset.classes))
    if args.out_dir is not None and args.data == "cityscapes":
        print(f"submission PNGs (label ids) written to {args.out_dir}")
    if args.out_dir is not None and results is not None:
        matrix = results["confusion_matrix"].numpy()
        written, note = write_reports(
            args.out_dir, matrix, dataset.classes, results["IoU"], output_names=output_names
        )
        print(f"reports written to {args.out_dir}: {', '.join(p.name for p in written)}")
        if note:
            print(f"note: {note}")
    if args.save_color is not None:
        print(f"colour renderings written to {args.save_color}")
    if args.json is not None:
        # The images actually scored (summed over ranks), not just the split's size.
        count = results["num_images"] if results is not None else len(dataset)
        data = results_json(results, args, count, dataset.classes)
        write_text_atomic(Path(args.json), json.dumps(data, indent=2) + "\n")
        print(f"metrics written to {args.json}")


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file renamed over it; OSError naming the path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write '{path}': {e.strerror or e}") from None


if __name__ == "__main__":
    sys.exit(main())
