"""Train ERFNet with mmsegmentation's Cityscapes recipe (or on synthetic data, in minutes).

    python train.py --data synthetic                              # quick start on the CPU
    python train.py --data cityscapes --data-root data/cityscapes # the full recipe
    torchrun --nproc_per_node=4 train.py --data cityscapes        # 4 GPUs x 4 images = 16
    python train.py --data cityscapes --accum-steps 4             # 1 GPU: 4 x 4 accumulated

Exit status: 0 when training finished, 130 / 143 when stopped by SIGINT / SIGTERM (after saving
latest.pth; continue with --resume), 1 on an error (bad data, full disk, a work dir in use by
another run...), 2 for bad flags. README.md "What survives what" has the details.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from erfnet import runtime
from erfnet.checkpoint import (
    CheckpointError,
    atomic_save,
    dataset_meta,
    lineage_meta,
    make_checkpoint,
)
from erfnet.config import RECIPE
from erfnet.data.check import check_datasets
from erfnet.data.cityscapes import CityscapesDataset, DatasetError, resolve_data_root
from erfnet.data.fast import device_aug
from erfnet.data.fast.cache import CachedCityscapesDataset
from erfnet.data.folder import FolderDataset, load_spec
from erfnet.data.synthetic import ensure_synthetic_cityscapes, synthetic_cache_root
from erfnet.data.transforms import TrainTransform
from erfnet.distributed import (
    DeviceError,
    DistInfo,
    barrier,
    cleanup_distributed,
    init_distributed,
    local_rank_from_env,
    resolve_device,
)
from erfnet.evaluation.evaluate import build_eval_loader, evaluate
from erfnet.model import ERFNet
from erfnet.training import logs, resume, step
from erfnet.training.finetune import init_from
from erfnet.training.logs import log
from erfnet.training.loss import LossConfigError, load_class_weights, make_criterion
from erfnet.training.step import ConfigError, TrainingError
from erfnet.training.workdir import WorkDirBusyError, WorkDirLock, remove_stale_tmp

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default, except where the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _preset(key: str, recipe_value: Any) -> str:
    """'(default: <recipe value>; synthetic: <quick-start value>)' for a help text."""

    def show(v: Any) -> str:
        return " ".join(str(x) for x in v) if isinstance(v, tuple) else str(v)

    return f"(default: {show(recipe_value)}; synthetic: {show(SYNTHETIC_PRESET[key])})"


def get_args_parser() -> argparse.ArgumentParser:
    r = RECIPE
    p = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=_HelpFormatter,
    )
    # fmt: off
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("cityscapes", "synthetic", "folder"), default="cityscapes",
                   help="dataset: Cityscapes (gtFine), a synthetic Cityscapes made on demand, or"
                   " your own folders described by --classes FILE")
    g.add_argument("--data-root", metavar="DIR", default=None,
                   help="Cityscapes root (default: $CITYSCAPES_DATASET, else data/cityscapes);"
                   " for --data synthetic the folder to create/use (default: a cache folder,"
                   " ~/.cache/erfnet/synthetic-...); for --data folder the dataset root")
    g.add_argument("--classes", metavar="FILE", default=None,
                   help="--data folder: the JSON file of names, palette, ignore_index,"
                   " label_map, splits and suffixes (see README, Train on your own data)")
    g.add_argument("--crop-size", nargs=2, type=int, metavar=("H", "W"), default=r.crop_size,
                   help=f"random crop {_preset('crop_size', r.crop_size)}")
    g.add_argument("--scale", nargs=2, type=int, metavar=("H", "W"), default=r.scale,
                   help=f"base size of the random resize (ratio {r.ratio_range[0]}-"
                   f"{r.ratio_range[1]}), also the validation resize {_preset('scale', r.scale)}")
    g.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True,
                   help="mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)")
    g.add_argument("--workers", type=int, metavar="N", default=None,
                   help="DataLoader worker processes per training process (default: on CUDA"
                   " min(4, cores - 1); on the CPU 0 up to 4 cores, else min(4, cores / 4))")
    g.add_argument("--skip-data-check", action="store_true",
                   help="skip the check of every image and label header before the first"
                   " iteration (bad files then stop the run when first read)")
    g.add_argument("--data-cache", metavar="DIR", default=None,
                   help="read the train split from this decoded uint8 cache (written by"
                   " scripts/prepare_cityscapes.py --cache DIR) instead of decoding PNGs"
                   " (default: none)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, metavar="N", default=r.iters,
                   help=f"training iterations {_preset('iters', r.iters)}")
    g.add_argument("--batch-size", type=int, metavar="N", default=r.batch_size_per_gpu,
                   help="images per process and iteration; the recipe's total is"
                   f" {r.batch_size_per_gpu} x {r.reference_gpus} GPUs"
                   f" {_preset('batch_size', r.batch_size_per_gpu)}")
    g.add_argument("--lr", type=float, default=r.lr,
                   help=f"SGD base learning rate {_preset('lr', r.lr)}")
    g.add_argument("--momentum", type=float, default=r.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=r.weight_decay, help="SGD weight decay")
    g.add_argument("--min-lr", type=float, default=r.min_lr, help="the poly schedule's final lr")
    g.add_argument("--poly-power", type=float, default=r.poly_power, help="poly schedule power")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of weights, data order, augmentation and dropout")
    g.add_argument("--accum-steps", type=int, metavar="K", default=1,
                   help="gradient accumulation: K micro-batches of --batch-size per optimizer"
                   " step (each loss divided by K); --iters counts optimizer steps")
    g.add_argument("--sync-bn", choices=step.SYNC_BN_SCOPES, default="head",
                   help="which BatchNorms become SyncBatchNorm under torchrun on CUDA: head (the"
                   " FCN head's only, as mmseg's recipe ran), all, or none")
    g.add_argument("--head", choices=("fcn", "deconv"), default="fcn",
                   help="fcn: mmseg's FCNHead; deconv: the paper's transposed-conv output")
    g.add_argument("--init-from", metavar="CKPT", default=None,
                   help="start from these weights (ours, mmseg's, erfnet_pytorch's, or Eromera's"
                   " ImageNet encoder as an encoder-only start) with a new optimizer and"
                   " schedule; another class count re-initialises the classifier only")

    g = p.add_argument_group("loss (mmseg's CrossEntropyLoss)")
    g.add_argument("--avg-non-ignore", action="store_true",
                   help="divide the summed pixel loss by the labelled pixels (mmseg 1.x's"
                   " avg_non_ignore=True) instead of by all pixels N*H*W (default: all, as the"
                   " recipe)")
    g.add_argument("--class-weights", metavar="FILE", default=None,
                   help='per-class loss weights: a JSON file {"names": [...], "weights": [...]}'
                   ", one weight per class in class order, e.g. from scripts/class_weights.py"
                   " (default: none)")
    g.add_argument("--ohem", nargs=2, type=float, metavar=("THRESH", "MIN_KEPT"), default=None,
                   help="mmseg's OHEMPixelSampler: train on the labelled pixels whose true-class"
                   " probability is below max(THRESH, the (MIN_KEPT x images)-th lowest)"
                   " (e.g. 0.7 100000) (default: off)")

    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto",
                   help="auto (this process's GPU if any, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA with fp16 autocast + GradScaler,"
                   " off on the CPU; --amp on the CPU means bf16 autocast)")
    g.add_argument("--amp-dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="autocast dtype with --amp: auto = float16 on CUDA, bfloat16 on the CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, metavar="N", default=None,
                   help="torch CPU threads (default on the CPU: cores - workers - 1, at least 1,"
                   " so a busy neighbour cannot stall every step; $OMP_NUM_THREADS if set)")
    g.add_argument("--gpu-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="resize, crop, flip, photometric and normalise the batch on the device;"
                   " workers only decode and draw (same batches) (default: on for CUDA, off"
                   " on the CPU)")

    g = p.add_argument_group("outputs and checkpoints")
    g.add_argument("--work-dir", metavar="DIR", default=None,
                   help="outputs: latest.pth, best.pth, iter_<N>.pth, train.log, args.json,"
                   " tensorboard/ (default: work_dirs/erfnet_<data>)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue a run: from PATH, or without PATH from the work dir's"
                   " latest.pth (default: start a new run)")
    g.add_argument("--val-interval", type=int, metavar="N", default=r.val_interval,
                   help="validate (single scale) every N iterations and at the end"
                   f" {_preset('val_interval', r.val_interval)}")
    g.add_argument("--ckpt-interval", type=int, metavar="N", default=r.ckpt_interval,
                   help="write iter_<N>.pth every N iterations"
                   f" {_preset('ckpt_interval', r.ckpt_interval)}")
    g.add_argument("--keep-ckpts", type=int, metavar="K", default=3,
                   help="keep only the newest K iter_<N>.pth files (0 keeps all); latest.pth and"
                   " best.pth are always kept")
    g.add_argument("--log-interval", type=int, metavar="N", default=50,
                   help="log the mean loss to train.log and TensorBoard every N iterations")
    g.add_argument("--num-vis", type=int, metavar="N", default=4,
                   help="val images whose predictions go to TensorBoard at each validation")
    g.add_argument("--max-nonfinite", type=int, metavar="N", default=20,
                   help="stop after N consecutive iterations with a non-finite loss")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars on rank 0 (the log reports progress either way)")
    # fmt: on
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Namespace:
    """The flags, with the synthetic preset for --data synthetic, checked."""
    args = parser.parse_args(argv)
    if args.data == "synthetic":  # the quick-start preset, under any flag given explicitly
        parser.set_defaults(**SYNTHETIC_PRESET)
        args = parser.parse_args(argv)
    if args.work_dir is None:
        args.work_dir = str(Path("work_dirs") / f"erfnet_{args.data}")
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: Namespace) -> None:
    """What argparse cannot check; ``parser.error`` (exit status 2) names the flag."""
    for flag in ("iters", "batch_size", "accum_steps", "val_interval", "ckpt_interval",
                 "log_interval", "max_nonfinite"):  # fmt: skip
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got"
                         f" {getattr(args, flag)}")  # fmt: skip
    for flag in ("workers", "keep_ckpts", "num_vis", "seed"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    for flag, size in (("--crop-size", args.crop_size), ("--scale", args.scale)):
        if min(size) < 8:
            parser.error(f"{flag} takes H W, each at least 8, got {list(size)}")
    (ch, cw), (sh, sw) = args.crop_size, args.scale
    if ch > sh or cw > sw:
        parser.error(f"--crop-size {ch} {cw} is larger than --scale {sh} {sw}: the crop must fit"
                     " in the resize base size (H W)")  # fmt: skip
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
    if args.ohem is not None:
        thresh, min_kept = args.ohem
        if not (0 < thresh <= 1) or min_kept != int(min_kept) or min_kept < 2:
            parser.error(f"--ohem takes THRESH in (0, 1] and an integer MIN_KEPT >= 2, got"
                         f" {thresh:g} {min_kept:g}")  # fmt: skip
        args.ohem = (thresh, int(min_kept))
    if args.data == "folder" and (args.classes is None or not args.data_root):
        parser.error("--data folder needs --data-root DIR and --classes FILE")
    if args.classes is not None and args.data != "folder":
        parser.error(f"--classes describes a folder dataset; add --data folder (got --data"
                     f" {args.data})")  # fmt: skip
    if args.data_cache is not None and args.data == "folder":
        parser.error("--data-cache holds a Cityscapes train split (scripts/prepare_cityscapes.py"
                     " --cache); it does not apply to --data folder")  # fmt: skip
    if args.init_from is not None and args.resume is not None:
        parser.error("--init-from starts a new run from other weights and --resume continues"
                     " this one; give one of them")  # fmt: skip
    if Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        parser.error(f"--work-dir '{args.work_dir}' exists and is not a folder")


def get_dataset(args: Namespace, dist_info: DistInfo) -> tuple[Dataset, Dataset]:
    """The augmented train split and the plain val split (the evaluator resizes it to --scale).

    A dataset exposes ``classes`` (names), ``palette`` (RGB per class) and ``ignore_index``; the
    model, the loss, validation and the checkpoint meta take them from the train split. To train
    on other data, return your own datasets here (items: ``image`` float [3, H, W] normalised,
    ``label`` int64 [H, W]).
    """
    transform = TrainTransform(
        crop_size=tuple(args.crop_size), scale=tuple(args.scale), photometric=args.photometric
    )
    if args.data == "folder":  # labels arrive with 255 = ignore, as Cityscapes' do
        spec = load_spec(args.classes)
        root = Path(args.data_root)
        return FolderDataset(root, spec, "train", transform), FolderDataset(root, spec, "val")
    if args.data == "synthetic":
        root = Path(args.data_root) if args.data_root else synthetic_cache_root()
        make_synthetic_on_rank0(root, dist_info)
    else:
        root = resolve_data_root(args.data_root)
    if args.data_cache:
        train_set = CachedCityscapesDataset(root, "train", args.data_cache, transform=transform)
    else:
        train_set = CityscapesDataset(root, "train", transform=transform)
    return train_set, CityscapesDataset(root, "val")


def make_synthetic_on_rank0(root: Path, dist_info: DistInfo) -> None:
    """Rank 0 creates the synthetic dataset on first use; every rank stops on its error."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"--data-root '{root}' exists and is not a folder")

    def create() -> None:
        try:
            if not (root.exists() and any(root.iterdir())):
                log.info("creating the synthetic dataset in %s", root)
            ensure_synthetic_cityscapes(root)
        except OSError as e:
            raise DatasetError(f"cannot create the synthetic dataset in '{root}': {e}") from None

    on_rank0(create, dist_info)


def on_rank0(work: Callable[[], None], dist_info: DistInfo) -> None:
    """Run ``work`` on rank 0 alone (the others wait); its DatasetError stops every rank."""
    error = [""]
    if dist_info.is_main:
        try:
            work()
        except DatasetError as e:
            error[0] = str(e)
    if dist_info.distributed:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise DatasetError(error[0])


def get_criterion(args: Namespace, class_names: list[str], ignore_index: int) -> step.Criterion:
    """mmseg's CrossEntropyLoss: summed pixel CE / (N*H*W), or / labelled pixels with
    --avg-non-ignore; --class-weights and --ohem as mmseg applies them (see erfnet/loss.py)."""
    class_weights = None
    if args.class_weights is not None:
        class_weights = load_class_weights(args.class_weights, class_names)
        log.info("class weights from %s: %s", args.class_weights, class_weights)
    return make_criterion(
        ignore_index=ignore_index,
        avg_non_ignore=args.avg_non_ignore,
        class_weights=class_weights,
        ohem=args.ohem,
    )


def main(args: Namespace) -> int:
    """Train (or resume) as ``args`` say; returns 0, or 128 + the signal that stopped the run."""
    fault_signal = step.fault_signal_from_env()  # tests only: (signal, iteration) or None
    device = resolve_device(args.device, local_rank_from_env())
    autocast_dtype, use_scaler = step.amp_settings(device, args.amp, args.amp_dtype)
    # threads + busy loader workers <= cores (see erfnet.runtime.cpu_plan)
    args.workers, threads = runtime.cpu_plan(device.type, args.workers, args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    args.threads = torch.get_num_threads()  # as used, for args.json
    work_dir = Path(args.work_dir)
    dist_info = init_distributed(device)
    is_main = dist_info.is_main
    with ExitStack() as cleanup:
        cleanup.callback(cleanup_distributed)
        # A closed stdout/stderr (``| tee`` stopped by Ctrl-C) must not kill a save.
        cleanup.enter_context(runtime.guarded_console())
        if is_main:
            try:
                work_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                msg = f"--work-dir '{work_dir}': cannot create it ({e.strerror})"
                raise ConfigError(msg) from None
            lock = WorkDirLock(work_dir)  # one run per work dir; released on any exit
            lock.acquire()
            cleanup.callback(lock.release)
        cleanup.callback(
            logs.close_logging, logs.setup_logging(work_dir if is_main else None, is_main)
        )
        cleanup.enter_context(logs.errors_in_log())  # the error line lands in train.log too
        if is_main:  # only now: while we hold the lock, no live writer owns a .tmp file
            count, size = remove_stale_tmp(work_dir)
            if count:
                log.info("removed %d stale .tmp file(s) (%.1f MB) of interrupted writes", count,
                         size / 1e6)  # fmt: skip
        # SIGINT / SIGTERM: save latest.pth after this iteration, then exit
        stop = step.StopFlag()
        stop.install()
        cleanup.callback(stop.restore)

        resume_path = resume.resolve_resume(args.resume, work_dir)
        train_set, val_set = get_dataset(args, dist_info)
        if not args.skip_data_check:  # every file now, not the first bad one hours from now

            def check_data() -> None:  # rank 0 reads every file once; the others wait
                # A --data-cache run never reads the train PNGs: the cache's own check covers it.
                splits = {"train": train_set, "val": val_set}
                if args.data_cache:
                    del splits["train"]
                checked = check_datasets(splits, args.progress)
                log.info("data check: %s", ", ".join(
                    f"{k} {'skipped (no samples list)' if n is None else f'{n} files ok'}"
                    for k, n in checked.items()))  # fmt: skip

            on_rank0(check_data, dist_info)
        meta = dataset_meta(train_set)  # class names, palette, ignore index, mean / std
        criterion = get_criterion(args, meta["class_names"], meta["ignore_index"])
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = ERFNet(num_classes=len(meta["class_names"]), head=args.head)
        if args.init_from is not None:  # same weights on every rank: each loads the file
            report = init_from(model, args.init_from)
            meta.update(report.lineage_meta())  # the weights keep their source's licence
            for line in report.describe(args.init_from):
                log.info("%s", line)
        ckpt = resume.load_training_checkpoint(resume_path, model) if resume_path else None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            meta.update(lineage_meta(ckpt.get("meta")))
        if dist_info.distributed and device.type == "cuda":
            model = step.convert_sync_batchnorm(model, args.sync_bn)
        elif dist_info.distributed and args.sync_bn != "none":
            log.info("SyncBatchNorm needs CUDA; on the CPU each process keeps its own BN stats")
        # channels_last is the fast layout for cuDNN and for oneDNN on the CPU alike (same maths;
        # scripts/benchmark.py measures 1.2-1.5x per training iteration on a 2-core CPU).
        model.to(device, memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        scheduler = step.PolyLR(optimizer, args.iters, args.poly_power, args.min_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        start, best_miou, consumed = 0, -1.0, 0
        if ckpt is not None:
            start, best_miou, consumed = resume.restore_training_state(
                ckpt,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                args=args,
                dataset_size=len(train_set),
                world_size=dist_info.world_size,
            )
            log.info(
                "resumed from %s at iteration %d (best mIoU %.2f)", resume_path, start, best_miou
            )
        train_model: nn.Module = model
        if dist_info.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if args.compile:
            train_model = torch.compile(train_model)

        if is_main:
            logs.write_run_settings(
                args, work_dir, train_set, val_set, device, dist_info, autocast_dtype, resume_path
            )
        step_batch = args.batch_size * args.accum_steps  # images per process and optimizer step
        # --gpu-aug: workers decode and draw; the device augments (the same batches).
        gpu_aug = device_aug.resolve_gpu_aug(args.gpu_aug, device, train_set)
        log.info("augmentation on %s", f"the device ({device})" if gpu_aug else "the workers")
        loader, sampler = resume.build_train_loader(
            device_aug.DeviceAugDataset(train_set) if gpu_aug else train_set,
            batch_size=step_batch,
            workers=args.workers,
            seed=args.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            start_samples=consumed,
            start_iter=start,
            pin_memory=device.type == "cuda",
            collate_fn=device_aug.collate if gpu_aug else None,
        )
        val_loader = build_eval_loader(
            val_set, batch_size=1, workers=min(args.workers, 2), pin_memory=device.type == "cuda"
        )
        writer = logs.open_tensorboard(work_dir, start) if is_main else None
        if writer is not None:
            cleanup.callback(writer.close)

        def save(name: str, full: bool = True, **extra_meta: Any) -> None:
            """Rank 0 writes ``work_dir/name``: the weights and meta, and (``full``) all that
            --resume needs."""
            if not is_main:
                return
            state = {}
            if full:
                state = resume.training_state(optimizer, scheduler, scaler, sampler, consumed, args)
            ckpt_meta = {**meta, "iteration": done, **extra_meta}
            out = make_checkpoint(model, ckpt_meta, iteration=done, best_miou=best_miou, **state)
            atomic_save(out, work_dir / name)

        def save_then_explain(what: str, e: BaseException, do_ckpt: bool = False) -> str:
            """Save the training state of ``done`` iterations (unless the loss is non-finite),
            then the one-line error for a data failure met during ``what``."""
            saved = "nothing saved (no iteration done yet)"
            if nonfinite:
                saved = "latest.pth not updated (non-finite loss)"
            elif done > start:
                if do_ckpt:
                    save(f"iter_{done}.pth")
                save("latest.pth")
                saved = f"latest.pth of iteration {done} saved"
            return (
                f"{what} at iteration {done} failed: {runtime.one_line(e)}; {saved}. Fix the"
                " file, then continue with --resume"
            )

        if start >= args.iters:
            log.info(
                "nothing to do: the checkpoint is at iteration %d of --iters %d", start, args.iters
            )
            return 0
        log.info(
            f"training for {args.iters} iterations (from {start}), batch {args.batch_size}"
            f" x {args.accum_steps} accumulated x {dist_info.world_size} process(es)"
            f" = {step_batch * dist_info.world_size}, lr {args.lr:g}, amp {autocast_dtype},"
            f" on {device} ({torch.get_num_threads()} threads, {args.workers} loader workers,"
            f" {runtime.available_cores()} cores)"
        )
        progress = None
        if is_main and args.progress:
            progress = tqdm(
                total=args.iters,
                initial=start,
                unit="it",
                desc="train",
                dynamic_ncols=True,
                smoothing=0.05,
            )
            cleanup.callback(progress.close)
        model.train()
        data_iter = iter(loader)
        window = logs.LossWindow()  # the losses since the last log line
        last_miou: float | None = None
        nonfinite = 0  # consecutive iterations with a non-finite loss
        for iteration in range(start, args.iters):
            resume.seed_iteration(args.seed, dist_info.rank, iteration)  # dropout's RNG
            t0 = time.perf_counter()
            done = iteration  # what a checkpoint written now holds
            try:
                batch = next(data_iter)
            except (DatasetError, OSError) as e:  # a file changed since the check
                raise TrainingError(save_then_explain("reading a training batch", e)) from None
            t1 = time.perf_counter()
            window.data_time += t1 - t0
            if gpu_aug is not None:
                images, labels = gpu_aug(batch, device)
            else:
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
            images = images.contiguous(memory_format=torch.channels_last)
            lr = optimizer.param_groups[0]["lr"]
            loss = step.train_step(
                train_model,
                images,
                labels,
                optimizer,
                scaler,
                criterion=criterion,
                autocast_dtype=autocast_dtype,
                reduce=step.mean_over_ranks if dist_info.distributed else None,
                accum_steps=args.accum_steps,
            )
            scheduler.step()
            window.compute_time += time.perf_counter() - t1  # train_step waited for the loss
            consumed += step_batch  # the sampler's position: micro-batches x their images
            done = iteration + 1  # iterations completed: what logs and checkpoints count

            if math.isfinite(loss):
                nonfinite = 0
                window.add(loss)
            else:  # the step was skipped
                nonfinite += 1
                log.warning(
                    "iteration %d: non-finite loss (%s), step skipped (%d in a row)",
                    done,
                    loss,
                    nonfinite,
                )
                if nonfinite >= args.max_nonfinite:
                    raise TrainingError(
                        f"the loss was non-finite for {nonfinite} consecutive iterations (last at"
                        f" iteration {done}); stopping. {last_good(work_dir)} Try a lower --lr"
                        " or --no-amp, and check the data."
                    )
            if progress is not None:
                progress.update(1)
                stall = f"{window.stall_share():.0%}"  # of this log window so far
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", stall=stall, refresh=False)
            last = done == args.iters
            if done % args.log_interval == 0 or last:
                logs.log_training(
                    window,
                    writer,
                    iteration=done,
                    first=start,
                    iters=args.iters,
                    log_interval=args.log_interval,
                    lr=lr,
                    device=device,
                )

            do_val = done % args.val_interval == 0 or last
            do_ckpt = done % args.ckpt_interval == 0
            if do_val:  # single scale, every rank takes part, rank 0 logs
                try:
                    metrics = evaluate(
                        model,
                        val_loader,
                        device,
                        num_classes=len(meta["class_names"]),
                        test_scale=tuple(args.scale),
                        progress=args.progress,
                        amp=autocast_dtype == torch.float16 and device.type == "cuda",
                    )
                except (DatasetError, OSError) as e:  # a val file changed since the check
                    model.train()
                    raise TrainingError(save_then_explain("validation", e, do_ckpt)) from None
                last_miou = float(metrics["mIoU"])
                if is_main:
                    logs.log_validation(metrics, meta["class_names"], done, writer)
                if writer is not None:
                    if args.num_vis:
                        logs.log_predictions(
                            writer,
                            model,
                            val_set,
                            num=args.num_vis,
                            palette=meta["palette"],
                            test_scale=tuple(args.scale),
                            device=device,
                            step=done,
                        )
                    writer.flush()
                if last_miou > best_miou:
                    best_miou = last_miou
                    save("best.pth", full=False, mIoU=last_miou)
                    log.info("new best mIoU %.2f: best.pth", last_miou)
            if nonfinite and (do_ckpt or do_val or last):
                # BN statistics may hold NaNs now: keep the last good checkpoint.
                log.warning("iteration %d: no checkpoint during non-finite losses", done)
            elif do_ckpt or do_val or last:
                if do_ckpt:
                    save(f"iter_{done}.pth")
                    if is_main:
                        resume.prune_checkpoints(work_dir, args.keep_ckpts)
                save("latest.pth")

            if fault_signal is not None and done == fault_signal[1]:
                os.kill(os.getpid(), fault_signal[0])
            if stop.requested(device if dist_info.distributed else None) and not last:
                if not nonfinite:
                    save("latest.pth")
                log.warning(
                    "stopped by %s at iteration %d; latest.pth saved. Continue with --resume.",
                    stop.name(),
                    done,
                )
                if progress is not None:
                    progress.close()
                barrier()
                return 128 + (stop.signum or signal.SIGTERM)  # SIGTERM: another rank's
        if progress is not None:
            progress.close()
        barrier()
        log.info(
            "done: %d iterations, best val mIoU %.2f, last %.2f; outputs in %s",
            args.iters,
            best_miou,
            last_miou if last_miou is not None else float("nan"),
            work_dir,
        )
    return 0


def last_good(work_dir: Path) -> str:
    """Where the run can continue from: a sentence that never names a file that is not there."""
    if (work_dir / "latest.pth").is_file():
        return f"The last good checkpoint, {work_dir / 'latest.pth'}, is intact (--resume)."
    return f"No checkpoint was written in {work_dir} yet; --resume has nothing to continue."


def cli(argv: list[str] | None = None) -> int:
    """The command line: flags, the run, and its exit status (see the module docstring)."""
    parser = get_args_parser()
    args = parse_args(parser, argv)
    try:
        return main(args)
    except ConfigError as e:
        parser.error(str(e))
    except (
        CheckpointError,
        DatasetError,
        DeviceError,
        LossConfigError,
        TrainingError,
        WorkDirBusyError,
    ) as e:  # one line, also for an error raised in a DataLoader worker
        raise SystemExit(f"error: {runtime.one_line(e)}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: abort without saving
        print(
            "error: aborted by a second SIGINT/SIGTERM without saving this iteration."
            f" {last_good(Path(args.work_dir))}",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(cli())
