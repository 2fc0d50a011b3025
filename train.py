"""Train ERFNet with mmsegmentation's Cityscapes recipe (or on synthetic data, in minutes).

    python train.py --data synthetic                              # quick start on the CPU
    python train.py --data cityscapes --data-root data/cityscapes # the full recipe
    torchrun --nproc_per_node=4 train.py --data cityscapes        # 4 GPUs x 4 images = 16
    python train.py --data cityscapes --accum-steps 4             # 1 GPU: 4 x 4 accumulated
    python train.py --recipe erfnet_pytorch --data cityscapes     # the paper's two stages

Exit status: 0 when training finished, 130 / 143 when stopped by SIGINT / SIGTERM (after saving
latest.pth; continue with --resume), 1 on an error (bad data, full disk, a work dir in use by
another run...), 2 for bad flags. README.md "What survives what" has the details.
"""

from __future__ import annotations

# ruff: noqa: E402 - the handler below must be in place before torch takes seconds to import.
import argparse
import math
import signal
import sys
from types import FrameType


def stopped_while_starting(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C (or SIGTERM) before the run has begun: one line, no traceback, 128 + signal."""
    print(
        f"error: stopped by {signal.Signals(signum).name} while starting; no training was done",
        file=sys.stderr,
    )
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # until the run installs its own handlers (open_run)
    signal.signal(signal.SIGINT, stopped_while_starting)
    signal.signal(signal.SIGTERM, stopped_while_starting)

from argparse import Namespace
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from erfnet import distributed, runtime
from erfnet.checkpoint import dataset_meta
from erfnet.config import PAPER_RECIPE, RECIPE, RECIPES
from erfnet.data.from_args import (
    DATA_KINDS,
    check_data_flags,
    data_root_from_args,
    dataset_from_args,
)
from erfnet.data.paper_transforms import PaperTrainTransform
from erfnet.data.transforms import TrainTransform
from erfnet.errors import FlagError, run_cli
from erfnet.evaluation.evaluate import build_eval_loader
from erfnet.model import HEADS
from erfnet.test_size import keep_ratio
from erfnet.training import loop, paper_recipe, process, resume, step
from erfnet.training.data_check import MIN_SIDE, check_data, make_synthetic, on_rank0
from erfnet.training.logs import log
from erfnet.training.loop import train_loop
from erfnet.training.setup import (
    build_model,
    check_start,
    get_criterion,
    make_run,
    open_run,
    setup_process,
    to_device,
    train_stages,
)

# ``--data synthetic`` is a quick-start preset: small images and more, larger steps, so that
# `python train.py --data synthetic` learns something visible in minutes on a laptop CPU (the
# recipe's 512x1024 crops would take hours). Each value applies only where its flag is not given.
SYNTHETIC_PRESET: dict[str, Any] = {
    "iters": 800,
    "batch_size": 8,
    "lr": 0.1,
    "crop_size": (64, 128),
    "scale": (128, 256),
    "val_interval": 200,
    "ckpt_interval": 400,
}
MAX_SEED = 2**63 - 1  # torch's seeds are 64-bit; the sampler adds the epoch to it


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default, except where the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def defaults_note(key: str, recipe_value: Any) -> str:
    """'(default: <recipe value>; synthetic: <quick-start value>)' for a flag's help text."""
    a, b = (
        " ".join(map(str, v)) if isinstance(v, tuple) else v
        for v in (recipe_value, SYNTHETIC_PRESET[key])
    )
    return f"(default: {a}; synthetic: {b})"


def get_args_parser() -> argparse.ArgumentParser:
    r = RECIPE
    intro, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        prog="train.py", description=intro, epilog=epilog, formatter_class=_HelpFormatter
    )
    # fmt: off
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATA_KINDS, default="cityscapes",
                   help="Cityscapes (gtFine), a synthetic one made on demand, or your folders")
    g.add_argument("--data-root", metavar="DIR", default=None,
                   help="Cityscapes root (default: $CITYSCAPES_DATASET, else data/cityscapes),"
                   " synthetic's folder (default: a cache folder) or --data folder's root")
    g.add_argument("--classes", metavar="FILE", default=None,
                   help="--data folder: its classes JSON file (README, Train on your own data)")
    g.add_argument("--crop-size", nargs=2, type=int, metavar=("H", "W"), default=r.crop_size,
                   help=f"random crop {defaults_note('crop_size', r.crop_size)}")
    g.add_argument("--scale", nargs=2, type=int, metavar=("H", "W"), default=r.scale,
                   help=f"base size of the random resize (ratio {r.ratio_range[0]}-"
                   f"{r.ratio_range[1]}) and of validation {defaults_note('scale', r.scale)}")
    g.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True,
                   help="mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)")
    g.add_argument("--skip-data-check", action="store_true",
                   help="skip the check of every image and label header before training")
    g.add_argument("--data-cache", metavar="DIR", default=None,
                   help="the train split from this decoded cache (prepare_cityscapes.py --cache)")

    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", choices=RECIPES, default="mmseg",
                   help="mmseg: mmsegmentation's ERFNet recipe; erfnet_pytorch: the paper's"
                   " two-stage training, which sets every default (docs/erfnet_pytorch.md)")
    g.add_argument("--epochs", type=int, metavar="N", default=None,
                   help="--recipe erfnet_pytorch: epochs per stage (default: 150; synthetic:"
                   f" {paper_recipe.SYNTHETIC_DEFAULTS['epochs']})")
    g.add_argument("--stage", choices=paper_recipe.STAGE_CHOICES, default=None,
                   help="--recipe erfnet_pytorch: both stages (default), or one of them")

    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, metavar="N", default=r.iters,
                   help=f"training iterations {defaults_note('iters', r.iters)}")
    g.add_argument("--batch-size", type=int, metavar="N", default=r.batch_size_per_gpu,
                   help=f"images per process and iteration (the recipe: x {r.reference_gpus}"
                   f" GPUs) {defaults_note('batch_size', r.batch_size_per_gpu)}")
    g.add_argument("--lr", type=float, default=r.lr,
                   help=f"SGD base learning rate {defaults_note('lr', r.lr)}")
    g.add_argument("--momentum", type=float, default=r.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=r.weight_decay, help="SGD weight decay")
    g.add_argument("--min-lr", type=float, default=r.min_lr, help="the poly schedule's final lr")
    g.add_argument("--poly-power", type=float, default=r.poly_power, help="poly schedule power")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data and dropout")
    g.add_argument("--accum-steps", type=int, metavar="K", default=1,
                   help="gradient accumulation: K micro-batches of --batch-size per step")
    g.add_argument("--sync-bn", choices=step.SYNC_BN_SCOPES, default="head",
                   help="the BatchNorms synchronised under torchrun on CUDA (head: as mmseg)")
    g.add_argument("--head", choices=HEADS, default="fcn",
                   help="fcn: mmseg's FCNHead; deconv: the paper's transposed-conv output")
    g.add_argument("--init-from", metavar="CKPT", default=None,
                   help="start from these weights (ours, mmseg's, erfnet_pytorch's, ImageNet's)")

    # fmt: on
    add_run_flags(p)
    return p


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The loss, speed and output flags."""
    r = RECIPE
    # fmt: off
    g = p.add_argument_group("loss (mmseg's CrossEntropyLoss)")
    g.add_argument("--avg-non-ignore", action="store_true",
                   help="average the pixel loss over labelled pixels (mmseg 1.x) (default: all)")
    g.add_argument("--class-weights", metavar="FILE", default=None,
                   help="per-class loss weights, scripts/class_weights.py's JSON (default: none)")
    g.add_argument("--ohem", nargs=2, type=float, metavar=("THRESH", "MIN_KEPT"), default=None,
                   help="mmseg's OHEMPixelSampler, e.g. 0.7 100000 (default: off)")

    g = p.add_argument_group("speed")
    runtime.add_runtime_flags(g, workers=True)  # --device, --threads, --workers
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: fp16 on CUDA, off on the CPU; bf16 there)")
    g.add_argument("--amp-dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="autocast dtype with --amp: auto = float16 on CUDA, bfloat16 on the CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--gpu-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="augment on the device (default: on for CUDA, off on the CPU)")

    g = p.add_argument_group("outputs and checkpoints")
    g.add_argument("--work-dir", metavar="DIR", default=None,
                   help="the run's outputs (default: work_dirs/erfnet_<data>)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from PATH, else the work dir's latest.pth (default: a new run)")
    g.add_argument("--restart", action="store_true",
                   help="start over in a work dir with an earlier run (moved to previous-*/)")
    g.add_argument("--val-interval", type=int, metavar="N", default=r.val_interval,
                   help="validate every N iterations"
                   f" {defaults_note('val_interval', r.val_interval)}")
    g.add_argument("--ckpt-interval", type=int, metavar="N", default=r.ckpt_interval,
                   help="write iter_<N>.pth every N iterations"
                   f" {defaults_note('ckpt_interval', r.ckpt_interval)}")
    g.add_argument("--keep-ckpts", type=int, metavar="K", default=3,
                   help="keep the newest K iter_<N>.pth files (0: all)")
    g.add_argument("--log-interval", type=int, metavar="N", default=50,
                   help="log the mean loss every N iterations")
    g.add_argument("--num-vis", type=int, metavar="N", default=4,
                   help="val predictions shown in TensorBoard")
    g.add_argument("--max-nonfinite", type=int, metavar="N", default=20,
                   help="stop after N consecutive non-finite losses")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars")
    # fmt: on


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Namespace:
    """The flags, with the synthetic preset for --data synthetic, checked."""
    args = parser.parse_args(argv)
    if args.data == "synthetic":  # the quick-start preset, under any flag given explicitly
        parser.set_defaults(**SYNTHETIC_PRESET)
        args = parser.parse_args(argv)
    if args.recipe == PAPER_RECIPE.name:  # its defaults, under any flag given explicitly
        given = explicit_flags(parser, argv)
        parser.set_defaults(**paper_recipe.recipe_defaults(args.data))
        args = parser.parse_args(argv)
        try:
            paper_recipe.check_flags(args, given)
        except FlagError as e:
            parser.error(str(e))
    elif args.epochs is not None or args.stage is not None:
        parser.error(f"--epochs and --stage belong to --recipe {PAPER_RECIPE.name}")
    if args.work_dir is None:  # erfnet_<data>, or erfnet_pytorch_<data> under that recipe
        name = "erfnet" if args.recipe == "mmseg" else args.recipe
        args.work_dir = str(Path("work_dirs") / f"{name}_{args.data}")
    check_args(parser, args)
    return args


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the flags given on the command line (a parse without defaults)."""
    unset = object()  # no flag's value: argparse converts only string defaults
    bare = get_args_parser()
    bare.set_defaults(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    return {k for k, v in vars(bare.parse_args(argv)).items() if v is not unset}


def check_args(parser: argparse.ArgumentParser, args: Namespace) -> None:
    """What argparse cannot check; ``parser.error`` (exit status 2) names the flag."""
    positive = "iters batch_size accum_steps val_interval ckpt_interval log_interval max_nonfinite"
    for dest in positive.split():
        if getattr(args, dest) <= 0:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag} must be a positive integer, got {getattr(args, dest)}")
    for dest in ("keep_ckpts", "num_vis", "seed"):
        if getattr(args, dest) < 0:
            parser.error(f"--{dest.replace('_', '-')} must be >= 0, got {getattr(args, dest)}")
    for flag, size in (("--crop-size", args.crop_size), ("--scale", args.scale)):
        if min(size) < MIN_SIDE:
            parser.error(f"{flag} takes H W, each at least {MIN_SIDE}, got {list(size)}")
    if args.recipe == PAPER_RECIPE.name:  # no crop: whole images at --scale's shorter side
        args.crop_size = (args.scale[0], args.scale[0])
    (ch, cw), (sh, sw) = args.crop_size, args.scale
    if ch > sh or cw > sw:
        parser.error(
            f"--crop-size {ch} {cw} is larger than --scale {sh} {sw}: the crop must fit"
            " in the resize base size (H W)"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not (0 <= args.min_lr <= args.lr):
        parser.error(f"--min-lr must be in [0, --lr={args.lr}], got {args.min_lr}")
    if not (0 <= args.momentum < 1):
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (args.weight_decay >= 0):
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not (args.poly_power > 0):
        parser.error(f"--poly-power must be positive, got {args.poly_power}")
    if args.seed > MAX_SEED:
        parser.error(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if args.batch_size * -(-ch // 8) * -(-cw // 8) < 2:  # --accum-steps splits nothing
        parser.error(
            f"--batch-size {args.batch_size} with --crop-size {ch} {cw} leaves BatchNorm one"
            " value per channel at the 1/8 bottleneck (training needs two): use"
            " --batch-size 2 or a crop over 8 pixels on a side"
        )
    if args.ohem is not None:
        thresh, min_kept = args.ohem
        finite = math.isfinite(thresh) and math.isfinite(min_kept)
        if not finite or not (0 < thresh <= 1) or min_kept != int(min_kept) or min_kept < 2:
            parser.error(
                f"--ohem takes THRESH in (0, 1] and an integer MIN_KEPT >= 2, got"
                f" {thresh:g} {min_kept:g}"
            )
        args.ohem = (thresh, int(min_kept))
    try:
        runtime.check_runtime_flags(args)
        check_data_flags(args)
    except FlagError as e:
        parser.error(str(e))
    if args.restart and args.resume is not None:
        parser.error("--restart starts a new run and --resume continues one; give one of them")
    if args.init_from is not None and args.resume is not None:
        parser.error(
            "--init-from starts a new run from other weights and --resume continues"
            " this one; give one of them"
        )
    if Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        parser.error(f"--work-dir '{args.work_dir}' exists and is not a folder")


def main(args: Namespace) -> int:
    """Train (or resume) as ``args`` say; returns 0, or 128 + the signal that stopped the run."""
    proc = setup_process(args)
    start = check_start(args, proc.dist)  # before anything is written
    with ExitStack() as cleanup:
        stop = open_run(args, proc.dist, cleanup)
        train_set, val_set = get_dataset(args, proc.dist)
        check_data(args, train_set, val_set, proc.dist, stop)
        meta = dataset_meta(train_set)  # class names, palette, ignore index, mean / std
        meta["test_size"] = keep_ratio(args.scale)  # validation's size: predict's default
        if args.recipe == PAPER_RECIPE.name:  # its stages, each through train_loop
            return train_stages(args, proc, start, train_set, meta, stop, cleanup, build_loaders)
        criterion = get_criterion(args, meta["class_names"], meta["ignore_index"])
        model = build_model(args, meta, start, proc)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        scheduler = step.PolyLR(optimizer, args.iters, args.poly_power, args.min_lr)
        parts = loop.Parts(model, optimizer, scheduler, criterion)
        run, state = make_run(
            args, proc, start, train_set, val_set, meta, cleanup, parts, build_loaders
        )
        return train_loop(run, state, stop)


def get_dataset(args: Namespace, dist_info: distributed.DistInfo) -> tuple[Dataset, Dataset]:
    """The augmented train split and the plain val split (the evaluator resizes it to --scale).
    To train on other data, return your own datasets here: ``classes``, ``palette`` (RGB) and
    ``ignore_index`` attributes (the train split's make the meta), items ``image`` float [3, H, W]
    normalised and ``label`` int64 [H, W]."""
    transform: Callable = TrainTransform(
        crop_size=tuple(args.crop_size), scale=tuple(args.scale), photometric=args.photometric
    )
    if args.recipe == PAPER_RECIPE.name:
        transform = PaperTrainTransform(shorter_side=paper_recipe.shorter_side(args))
    if args.data == "synthetic":  # made on first use, by rank 0 alone
        on_rank0(partial(make_synthetic, data_root_from_args(args)), dist_info)
    if args.data_cache:  # the train split from the decoded cache instead of the PNGs
        from erfnet.data.fast.cache import CachedCityscapesDataset

        root = data_root_from_args(args)
        train_set = CachedCityscapesDataset(root, "train", args.data_cache, transform=transform)
        return train_set, dataset_from_args(args, ["val"])[0]
    train_set, val_set = dataset_from_args(args, ["train", "val"], {"train": transform})
    return train_set, val_set


def build_loaders(
    args: Namespace,
    train_set: Dataset,
    val_set: Dataset,
    proc: loop.Process,
    state: loop.TrainState,
    labels: Callable | None = None,
) -> loop.Loaders:
    """The endless training loader at the state's position, the validation loader, and how a
    training batch reaches the device. --gpu-aug: the workers decode and draw the augmentation,
    the device applies it (the same batches)."""
    from erfnet.data.fast import device_aug  # --gpu-aug's switch

    device, pin = proc.device, proc.device.type == "cuda"
    augment = device_aug.resolve_gpu_aug(args.gpu_aug, device, train_set)
    log.info("augmentation on %s", f"the device ({device})" if augment else "the workers")
    loader, sampler = resume.build_train_loader(
        device_aug.DeviceAugDataset(train_set) if augment else train_set,
        batch_size=args.batch_size * args.accum_steps,  # per process and optimizer step
        workers=args.workers,
        seed=args.seed,
        rank=proc.dist.rank,
        world_size=proc.dist.world_size,
        start_samples=state.consumed,
        start_iter=state.iteration,
        pin_memory=pin,
        collate_fn=device_aug.collate if augment else None,
    )
    val_loader = build_eval_loader(
        val_set, batch_size=1, workers=min(args.workers, 2), pin_memory=pin
    )
    upload = partial(to_device, augment=augment, device=device, labels=labels)
    return loop.Loaders(loader, sampler, val_loader, upload)


def cli(argv: list[str] | None = None) -> int:
    """The command line: flags, the run, and its exit status (see the module docstring)."""
    parser = get_args_parser()
    args = parse_args(parser, argv)
    try:  # errors.run_cli: one line (also for an error raised in a DataLoader worker)
        return run_cli(parser, partial(main, args))
    except RuntimeError as e:
        if not process.is_peer_failure(e):
            raise
        raise SystemExit(f"error: stopping: {process.PEER_FAILED}") from None
    except process.StopRequested as e:  # before the first iteration (the data check)
        print(f"stopped by {e} before training began; nothing saved", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second Ctrl-C: abort without saving
        print(
            "error: aborted by a second SIGINT/SIGTERM without saving this iteration."
            f" {process.resume_hint(Path(args.work_dir))}",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    try:
        sys.exit(cli())
    finally:  # the run is over: a signal now (torchrun ending the job) just ends the process
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
