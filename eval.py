"""Evaluate an ERFNet checkpoint on Cityscapes exactly as mmsegmentation reports its numbers.

    python eval.py --checkpoint erfnet.pth                      # val, single scale (whole image)
    python eval.py --checkpoint erfnet.pth --ms-flip            # 6 scales x flip
    python eval.py --checkpoint erfnet.pth --protocol erfnet_pytorch  # the paper's 512-px test
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
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from erfnet import distributed
from erfnet.config import PAPER_RECIPE
from erfnet.data import CityscapesDataset, DatasetError, EvalTransform, from_args
from erfnet.data.check import check_datasets, image_header
from erfnet.data.folder import FolderDataset, FolderSpec, load_spec
from erfnet.data.paper_transforms import ShorterSideEvalTransform, shorter_side_scale
from erfnet.data.transforms import rescale_size
from erfnet.errors import FlagError, UserError, cli_main, one_line
from erfnet.evaluation.cityscapes_submission import SubmissionWriter
from erfnet.evaluation.evaluate import build_eval_loader, evaluate, scored_classes
from erfnet.evaluation.inference import DEFAULT_SETTINGS, MIN_VIEW, MODES, TestSettings, ratio_scale
from erfnet.evaluation.metrics import format_table
from erfnet.evaluation.reports import REPORT_FILES, write_reports
from erfnet.evaluation.visualize import ColorWriter
from erfnet.outputs import atomic_write_text, output_dir, output_file, printable
from erfnet.outputs import check_outputs as check_output_rule
from erfnet.runtime import add_runtime_flags, apply_cpu_plan, check_runtime_flags

_RATIOS = " ".join(map(str, DEFAULT_SETTINGS.ratios))
# --protocol: mmseg's test (the default) or erfnet_pytorch's eval_iou.py at a shorter side of 512.
PAPER_PROTOCOL = PAPER_RECIPE.name
PROTOCOLS = ("mmseg", PAPER_PROTOCOL)
PAPER_SIZE = PAPER_RECIPE.shorter_side
_SCALE = " ".join(map(str, DEFAULT_SETTINGS.scale))


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    """eval.py's flags: what to score, on which data, with which protocol, and the outputs."""
    p = argparse.ArgumentParser(
        description="Evaluate an ERFNet checkpoint on Cityscapes (mmseg protocol)."
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="PATH", help="our checkpoint (.pth)")
    what.add_argument("--model", metavar="PATH", help="an exported model (.onnx through"
                      " onnxruntime, OpenVINO .xml, AOTInductor .pt2), on the CPU; needs the"
                      " optional onnxruntime / openvino package (a .pt2: PyTorch only)")
    p.add_argument("--data", choices=from_args.DATA_KINDS, default="cityscapes", help="Cityscapes,"
                   " the quick start's synthetic set, or your own folders described by --classes"
                   " FILE (default: cityscapes)")
    p.add_argument("--data-root", metavar="DIR", default=None, help="dataset root (Cityscapes"
                   " default: $CITYSCAPES_DATASET, else data/cityscapes)")
    p.add_argument("--classes", metavar="FILE", default=None, help="--data folder: the"
                   " dataset's JSON classes file (README: Train on your own data)")
    p.add_argument("--split", choices=("val", "test", "train"), default="val", help="split to"
                   " evaluate (default: val); test only writes --out-dir predictions")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test: softmax of"
                   " every ratio x (no flip, flip) view averaged")
    p.add_argument("--scales", type=float, nargs="+", metavar="R", default=None,
                   help=f"ratios of --scale for --ms-flip (default: {_RATIOS})")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_SETTINGS.mode,
                   help=f"whole image (default), or sliding {DEFAULT_SETTINGS.slide_crop} crops,"
                   f" stride {DEFAULT_SETTINGS.slide_stride}")
    p.add_argument("--scale", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help=f"test resize, keeping the image's ratio (default: {_SCALE}; a"
                   " fixed-size export: its input size)")
    p.add_argument("--out-dir", metavar="DIR", default=None, help="write official submission"
                   " PNGs (Cityscapes label ids, original size) in per-city folders and, for a"
                   " labelled split, the confusion matrix (.npy, .json, .png) and a per-class"
                   " IoU chart")
    p.add_argument("--save-color", metavar="DIR", default=None, help="write colour renderings"
                   " and blends over the image (apart from --out-dir)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the metrics as JSON")
    add_runtime_flags(p, workers=True)
    p.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="mmseg", help="mmseg: the"
                   " full-resolution test above (default); erfnet_pytorch: the paper's code's,"
                   f" images and labels resized to a shorter side of {PAPER_SIZE} (or H of"
                   " --scale) by PIL, scored there (docs/erfnet_pytorch.md)")
    return p
# fmt: on


def check_args(args: argparse.Namespace) -> None:
    """Flag values and combinations that cannot work (``FlagError``), and the outputs."""
    from_args.check_data_flags(args)
    check_runtime_flags(args, exported=args.model is not None)
    if args.split == "test" and args.out_dir is None and args.data != "folder":
        raise FlagError(
            "--split test has no labels to score; add --out-dir DIR to write the submission PNGs"
        )
    if args.scales is not None and not args.ms_flip:
        raise FlagError("--scales sets the --ms-flip ratios; add --ms-flip")
    if args.scales is not None and not all(r > 0 and math.isfinite(r) for r in args.scales):
        raise FlagError(f"--scales must be positive ratios, got {args.scales}")
    check_sizes(args)
    check_protocol(args)
    if args.out_dir is not None and args.save_color is not None:
        out, color = Path(args.out_dir).resolve(), Path(args.save_color).resolve()
        if out == color or out in color.parents or color in out.parents:
            raise FlagError(
                f"--save-color {args.save_color} must be outside --out-dir {args.out_dir}: the"
                " official evaluator rejects a second PNG per image under its folder"
            )
    check_outputs(args)


def check_protocol(args: argparse.Namespace) -> None:
    """--protocol erfnet_pytorch fixes the views: one whole image at the shorter side."""
    if args.protocol != PAPER_PROTOCOL:
        return
    views = (("--ms-flip", args.ms_flip), ("--scales", args.scales is not None))
    more = (("--mode slide", args.mode != "whole"), ("--split test", args.split == "test"))
    given = [flag for flag, on in (*views, *more) if on]
    if given:
        raise FlagError(
            f"{', '.join(given)}: not part of --protocol {PAPER_PROTOCOL} (it scores a"
            " labelled split, one whole image at a shorter side)"
        )


def paper_size(args: argparse.Namespace) -> int:
    """--protocol erfnet_pytorch's shorter side: 512, or H of --scale H W (as train.py's)."""
    return PAPER_SIZE if args.scale is None else int(args.scale[0])


def check_sizes(args: argparse.Namespace) -> None:
    """--scale and the --ms-flip views it gives must reach the network's minimum size."""
    scale = args.scale if args.scale is not None else DEFAULT_SETTINGS.scale
    if min(scale) < MIN_VIEW:
        raise FlagError(
            f"--scale H W must be at least {MIN_VIEW} {MIN_VIEW} (the network's minimum input),"
            f" got {scale[0]} {scale[1]}"
        )
    for r in args.scales or ():
        if min(ratio_scale(scale, r)) < MIN_VIEW:
            h, w = ratio_scale(scale, r)
            raise FlagError(
                f"--scales {r:g} makes {h}x{w} views of --scale {scale[0]} {scale[1]},"
                f" under the network's minimum {MIN_VIEW}x{MIN_VIEW}"
            )


def check_outputs(args: argparse.Namespace, with_data: bool = False) -> None:
    """Every output by the one output rule (``erfnet.outputs.check_outputs``), before the
    (possibly hours-long) evaluation; ``with_data`` adds the data folders to the inputs."""
    report_files = [Path(args.out_dir) / name for name in REPORT_FILES] if args.out_dir else []
    outputs = [
        *output_dir("--out-dir", args.out_dir),
        *output_dir("--save-color", args.save_color),
        *output_file("--json", args.json),
        *(out for path in report_files for out in output_file("--out-dir", path)),
    ]
    inputs = [("--checkpoint", args.checkpoint), ("--model", args.model)]
    if args.model is not None and Path(args.model).suffix.lower() == ".xml":
        inputs.append(("--model", Path(args.model).with_suffix(".bin")))  # the IR's weights
    inputs += [("--classes", args.classes)]
    if with_data:
        inputs += from_args.data_inputs_from_args(args)
    check_output_rule(outputs, inputs)


def settings_from_args(args: argparse.Namespace) -> TestSettings:
    """The flags as ``TestSettings`` (defaults: mmseg's protocol)."""
    if args.protocol == PAPER_PROTOCOL:  # the images come resized: keep them as they are
        return TestSettings(scale=shorter_side_scale(paper_size(args)), amp=args.amp)
    ratios = {"ratios": tuple(args.scales)} if args.scales is not None else {}
    scale = tuple(args.scale) if args.scale is not None else DEFAULT_SETTINGS.scale
    return TestSettings(scale=scale, mode=args.mode, ms_flip=args.ms_flip, amp=args.amp, **ratios)


def load_for_eval(args: argparse.Namespace, device: torch.device, threads: int) -> Any:
    """Our checkpoint's plain weights (no BN folding: it changes float rounding), or an
    exported graph (deploy is opt-in: imported here only) checked against the views asked."""
    from erfnet.deploy.exported import load_network

    model = load_network(args.checkpoint, args.model, device, threads)
    if args.model is None:
        return model
    if model.output == "labels" and (args.ms_flip or args.mode != "whole"):
        raise UserError(
            f"--model {args.model} ends in an argmax (it outputs labels): only the whole-image"
            " single-scale test applies; drop --ms-flip / --mode slide"
        )
    if model.input_size is not None and args.protocol == PAPER_PROTOCOL:
        raise UserError(
            f"--model {args.model} takes fixed-size inputs; --protocol {PAPER_PROTOCOL}"
            " needs a dynamic-size export (images keep their aspect at the shorter side)"
        )
    if model.input_size is not None:
        args.scale = check_fixed_size(args, model.input_size)
    return model


def check_fixed_size(args: argparse.Namespace, size: tuple[int, int]) -> list[int]:
    """--scale for an export fixed to ``size`` inputs (default: that size); refuses others."""
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
        raise UserError(
            f"--model {args.model} takes only {h}x{w} inputs (a fixed-size export), not"
            f" {why}; export with a dynamic size, or evaluate at {h}x{w}"
        )
    return scale


def check_classes(model: Any, classes: Sequence[str], args: argparse.Namespace) -> None:
    """The model must predict the dataset's classes (``scored_classes``' rule); one warning line
    when the names it was trained with differ from the dataset's (scored by position)."""
    flag = f"--model {args.model}" if args.model else f"--checkpoint {args.checkpoint}"
    try:
        scored_classes(model, len(classes))
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None
    trained = list(model.meta["class_names"])[: len(classes)]
    # class_<i>: the placeholder of a checkpoint saved without names (complete_meta), no claim
    unnamed = [f"class_{i}" for i in range(len(trained))]
    differ = [
        i
        for i, (a, b, u) in enumerate(zip(trained, classes, unnamed, strict=True))
        if a not in (b, u)
    ]
    if differ:
        i = differ[0]
        print(
            f"warning: {flag} was trained with other class names than the dataset's"
            f" ({len(differ)} of {len(classes)} differ, e.g. class {i}:"
            f" '{printable(trained[i])}' vs '{printable(classes[i])}'); scored by position",
            file=sys.stderr,
        )


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

    def write_each(preds: torch.Tensor, batch: dict) -> None:
        for write in writers:
            write(preds, batch)

    return write_each if writers else None


def check_folder_split(root: Path, spec: FolderSpec, split: str) -> None:
    """A folder dataset's splits are scored, so they need labels; an unlabelled test split is
    the Cityscapes test-server case, which has no equivalent here: say so."""
    if split != "test":
        return
    try:
        labels = root / spec.split_dirs(split)[1]
    except DatasetError:
        labels = None
    if labels is None or not labels.is_dir():
        where = f"'{labels}' does not exist" if labels is not None else "is not in its splits"
        raise DatasetError(
            f"split 'test' of classes file '{spec.path}' has no labels ({where}): the test-server"
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
    out: dict = {}
    if results is not None:
        out = {key: _num(results[key]) for key in ("mIoU", "mAcc", "aAcc")}
        for key in ("IoU", "Acc"):
            out[key] = {n: _num(v) for n, v in zip(class_names, results[key], strict=True)}
    out.update(
        checkpoint=args.checkpoint and str(args.checkpoint),
        model=args.model and str(args.model),
        ms_flip=settings.ms_flip,
        scales=list(settings.view_ratios),
        mode=settings.mode,
        scale=list(settings.scale) if args.protocol != PAPER_PROTOCOL else None,
        shorter_side=paper_size(args) if args.protocol == PAPER_PROTOCOL else None,
        split=args.split,
        protocol=args.protocol,
        num_images=num_images,
        amp=settings.amp,
    )
    return out


def get_dataset(args: argparse.Namespace, model: Any) -> CityscapesDataset | FolderDataset:
    """The split to score (checked: images, classes the model predicts, outputs outside it)."""
    root = from_args.data_root_from_args(args)
    check_outputs(args, with_data=True)
    # ms+flip resizes every view from the original image, as mmseg's MultiScaleFlipAug does; a
    # first resize to --scale would blur the views above ratio 1.
    transform: Callable = EvalTransform(None if args.ms_flip else settings_from_args(args).scale)
    if args.protocol == PAPER_PROTOCOL:  # PIL's resizes of image and label
        transform = ShorterSideEvalTransform(paper_size(args))
    if args.data == "folder":
        check_folder_split(root, load_spec(args.classes), args.split)
    (dataset,) = from_args.dataset_from_args(args, [args.split], {args.split: transform})
    if len(dataset) == 0:
        raise DatasetError(f"split '{args.split}' under '{root}' has no images")
    check_classes(model, dataset.classes, args)
    # Every file before the first image is scored: a damaged PNG would otherwise stop the run
    # late, or kill it (torchvision's libpng aborts on PNG data shorter than its size).
    check_datasets({args.split: dataset}, progress=False)
    if args.model is not None and model.input_size is not None and not args.ms_flip:
        check_resized_sizes(args, dataset, model.input_size)
    return dataset


def check_resized_sizes(args: argparse.Namespace, dataset: Any, size: tuple[int, int]) -> None:
    """Every image, resized to fit --scale, must come out at a fixed-size export's ``size``
    (a 64x128 image fits 31 63 as 31x62)."""
    scale = tuple(settings_from_args(args).scale)
    for sample in getattr(dataset, "samples", []):
        shape, _ = image_header(Path(sample.image))
        resized = rescale_size(shape, scale)
        if resized != tuple(size):
            raise UserError(
                f"--model {args.model} takes only {size[0]}x{size[1]} inputs, but --scale"
                f" {scale[0]} {scale[1]} resizes '{sample.image}' ({shape[0]}x{shape[1]}) to"
                f" {resized[0]}x{resized[1]} (the resize keeps the image's ratio); export with"
                " a dynamic size, or give images of the export's ratio"
            )


def main(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> int:
    """Check the flags and outputs, load, check the data, evaluate, report."""
    check_args(args)
    local_rank = distributed.local_rank_from_env()
    device = distributed.resolve_device("cpu" if args.model else args.device, local_rank)
    info = distributed.init_distributed(device)
    try:
        # One thread plan with train.py: threads + workers leave a core free on the CPU.
        workers, threads = apply_cpu_plan(device.type, args.workers, args.threads)
        if args.amp and device.type != "cuda" and info.is_main:
            print("note: --amp only applies on CUDA; evaluating in float32", file=sys.stderr)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes
        model = load_for_eval(args, device, threads)
        dataset = get_dataset(args, model)
        try:
            results = evaluate(
                model,
                build_eval_loader(dataset, workers=workers),
                device,
                settings_from_args(args),
                num_classes=len(dataset.classes),
                on_prediction=prediction_writers(args, model, dataset),
                progress=info.is_main,
            )
        except ValueError as e:  # a label value out of range, a view the model cannot take
            raise UserError(one_line(e)) from None
        if info.is_main:
            report(args, dataset, results, model.meta["class_names"])
    finally:
        distributed.cleanup_distributed()
    return 0


def report(
    args: argparse.Namespace,
    dataset: CityscapesDataset | FolderDataset,
    results: dict | None,
    output_names: Sequence[str] | None = None,
) -> None:
    """The console table, the --out-dir reports and the --json file (rank 0)."""
    if args.protocol == PAPER_PROTOCOL:
        print(
            f"{args.split}: {len(dataset)} images, protocol {PAPER_PROTOCOL}: images (PIL"
            f" bilinear) and labels (PIL nearest) at a shorter side of {paper_size(args)}, argmax"
            " over all outputs, scored there"
        )
    else:
        settings = settings_from_args(args)
        how = f"ms+flip {list(settings.ratios)}" if args.ms_flip else "single scale"
        print(
            f"{args.split}: {len(dataset)} images, protocol mmseg, {how}, mode {args.mode},"
            f" scale {list(settings.scale)}"
        )
    if results is not None:
        print(format_table(results, dataset.classes))
    if args.out_dir is not None and args.data == "cityscapes":
        print(f"submission PNGs (label ids) written to {args.out_dir}")
    if args.save_color is not None:
        print(f"colour renderings written to {args.save_color}")
    if args.json is not None:  # the results first: a report below that fails cannot lose them
        # The images actually scored (summed over ranks), not just the split's size.
        count = results["num_images"] if results is not None else len(dataset)
        data = results_json(results, args, count, dataset.classes)
        atomic_write_text(Path(args.json), json.dumps(data, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    if args.out_dir is not None and results is not None:
        matrix = results["confusion_matrix"].numpy()
        written, note = write_reports(
            args.out_dir, matrix, dataset.classes, results["IoU"], output_names=output_names
        )
        print(f"reports written to {args.out_dir}: {', '.join(p.name for p in written)}")
        if note:
            print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
