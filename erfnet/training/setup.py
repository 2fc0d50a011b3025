"""train.py's setup steps, each named in its ``main``: the process (device, AMP, threads), what the
run starts from, the run's surroundings (lock, logging, signals), the criterion, the model, and
the Run of the loop (``make_run``), once or per stage of ``--recipe erfnet_pytorch``.

The loaders come from train.py (``loaders_for``): it alone may import ``--gpu-aug``'s extra.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from erfnet import distributed, outputs, runtime
from erfnet.config import PAPER_RECIPE
from erfnet.data.from_args import data_inputs_from_args, dataset_from_args
from erfnet.errors import FlagError
from erfnet.model import ERFNet
from erfnet.training import logs, loop, paper_recipe, process, resume, step
from erfnet.training.finetune import start_weights
from erfnet.training.logs import log
from erfnet.training.loss import Criterion, load_class_weights, make_criterion


@dataclass(frozen=True)
class Start:
    """What a run continues: the --resume checkpoint's path and contents, or None and None."""

    path: Path | None = None
    ckpt: dict | None = None


def setup_process(args: Namespace) -> loop.Process:
    """The device, AMP, CPU threads and loader workers (written back to ``args``), and the
    process group under torchrun."""
    device = distributed.resolve_device(args.device, distributed.local_rank_from_env())
    autocast_dtype, use_scaler = step.amp_settings(device, args.amp, args.amp_dtype)
    # threads + busy loader workers <= cores (see erfnet.runtime.cpu_plan)
    args.workers, threads = runtime.cpu_plan(device.type, args.workers, args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    args.threads = torch.get_num_threads()  # as used, for args.json
    return loop.Process(device, distributed.init_distributed(device), autocast_dtype, use_scaler)


def check_start(args: Namespace, dist_info: distributed.DistInfo) -> Start:
    """What the run starts from, checked before anything is written: the work dir (rank 0)
    follows the one output rule (``erfnet.outputs``), is not in use and holds no earlier run
    that a new one would overwrite; the --resume checkpoint is a training checkpoint."""
    work_dir = Path(args.work_dir)
    paper = args.recipe == PAPER_RECIPE.name
    if dist_info.is_main:
        inputs = [
            *data_inputs_from_args(args),
            ("--init-from", args.init_from),
            ("--class-weights", args.class_weights),
        ]
        outputs.check_outputs([outputs.Output("--work-dir", work_dir, folder=True)], inputs)
        process.check_not_busy(work_dir)
        process.check_new_run(work_dir, resume=args.resume is not None, restart=args.restart)
        if paper:
            paper_recipe.check_new_stage_run(args)
    path = paper_recipe.resume_path(args) if paper else resume.resolve_resume(args.resume, work_dir)
    return Start() if path is None else Start(path, resume.load_training_checkpoint(path))


def open_run(
    args: Namespace, dist_info: distributed.DistInfo, cleanup: ExitStack
) -> process.StopFlag:
    """The run's surroundings, each undone by ``cleanup``: the process group, a console that
    cannot kill a save, the work dir and its lock (rank 0), logging, no stale temporary files,
    and the SIGINT / SIGTERM flag (returned) that stops the loop after saving."""
    cleanup.callback(distributed.cleanup_distributed)
    # A closed stdout/stderr (``| tee`` stopped by Ctrl-C) must not kill a save.
    cleanup.enter_context(runtime.guarded_console())
    work_dir, moved = Path(args.work_dir), None
    if dist_info.is_main:
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FlagError(f"--work-dir '{work_dir}': cannot create it ({e.strerror})") from None
        lock = process.WorkDirLock(work_dir)  # one run per work dir; released on any exit
        lock.acquire()
        cleanup.callback(lock.release)
        moved = process.move_previous_run(work_dir) if args.restart else None
    handlers = logs.setup_logging(work_dir if dist_info.is_main else None, dist_info.is_main)
    cleanup.callback(logs.close_logging, handlers)
    cleanup.enter_context(logs.errors_in_log())  # the error line lands in train.log too
    if moved is not None:
        log.info("--restart: the earlier run's files are now in %s", moved)
    if dist_info.is_main:  # only now: while we hold the lock, no live writer owns a .tmp file
        n, size = process.remove_stale_tmp(work_dir)
        if n:
            log.info("removed %d stale .tmp file(s) (%.1f MB) of interrupted writes", n, size / 1e6)
    # SIGINT / SIGTERM: save latest.pth after this iteration (at once in the data check, a batch
    # wait or validation), then exit.
    stop = process.StopFlag(immediate=not dist_info.distributed)
    stop.install()
    cleanup.callback(stop.restore)
    return stop


def get_criterion(args: Namespace, class_names: list[str], ignore_index: int) -> Criterion:
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


def build_model(args: Namespace, meta: dict[str, Any], start: Start, proc: loop.Process) -> ERFNet:
    """The model on the device, from --seed, --init-from or the --resume checkpoint;
    SyncBatchNorm as --sync-bn says under torchrun on CUDA."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = ERFNet(num_classes=len(meta["class_names"]), head=args.head)
    start_weights(model, meta, args.init_from, start.path, start.ckpt)
    model.meta = meta  # validation normalises with the data's mean / std, not the defaults
    if proc.dist.distributed and proc.device.type == "cuda":
        model = step.convert_sync_batchnorm(model, args.sync_bn)
    elif proc.dist.distributed and args.sync_bn != "none":
        log.info("SyncBatchNorm needs CUDA; on the CPU each process keeps its own BN stats")
    # channels_last is the fast layout for cuDNN and for oneDNN on the CPU alike (same maths).
    model.to(proc.device, memory_format=torch.channels_last)
    if proc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


def train_stages(
    args: Namespace,
    proc: loop.Process,
    start: Start,
    train_set: Dataset,
    meta: dict[str, Any],
    stop: process.StopFlag,
    cleanup: ExitStack,
    loaders_for: Callable[..., loop.Loaders],
) -> int:
    """--recipe erfnet_pytorch: its stages in order, each a Run of the same loop with the
    stage's settings, parts and validation at the shorter side; the decoder stage starts from
    the encoder stage's weights (or --init-from, or its --resume checkpoint). The exit status."""
    encoder = None
    for stage in paper_recipe.stages_to_run(args, start.path, start.ckpt):
        sargs = paper_recipe.stage_args(args, stage, len(train_set), proc.dist.world_size)
        parts, stage_meta = paper_recipe.stage_parts(sargs, meta, start.path, start.ckpt, encoder)
        parts.model.to(proc.device, memory_format=torch.channels_last)
        val_transform = paper_recipe.val_transform(args, stage)
        (val_set,) = dataset_from_args(args, ["val"], {"val": val_transform})
        run, state = make_run(
            sargs, proc, start, train_set, val_set, stage_meta, cleanup, parts, loaders_for
        )
        log.info(
            "%s stage: %d epochs x %d iterations, outputs in %s",
            stage,
            args.epochs,
            sargs.iters_per_epoch,
            run.work_dir,
        )
        status = loop.train_loop(run, state, stop)
        if status:
            return status
        encoder, start = run.model, Start()
    return 0


def make_run(
    args: Namespace,
    proc: loop.Process,
    start: Start,
    train_set: Dataset,
    val_set: Dataset,
    meta: dict[str, Any],
    cleanup: ExitStack,
    parts: loop.Parts,
    loaders_for: Callable[..., loop.Loaders],
) -> tuple[loop.Run, loop.TrainState]:
    """The Run of ``parts`` from ``start``: the GradScaler, the --resume state, args.json, the
    loaders, TensorBoard and the model wrapped for training."""
    work_dir = paper_recipe.stage_dir(Path(args.work_dir), args.stage)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.use_scaler)
    state = loop.TrainState()
    if start.ckpt is not None:  # the optimizer, schedule, scaler and RNGs; where it stood
        ckpt, world = start.ckpt, proc.dist.world_size
        done, best, consumed = resume.restore_training_state(
            ckpt, parts.optimizer, parts.scheduler, scaler, args, len(train_set), world
        )
        pending = bool(ckpt.get("validation_pending", False))
        state = loop.TrainState(done, consumed, best, start=done, val_pending=pending)
        if args.stage is None:
            log.info("resumed from %s at iteration %d (best mIoU %.2f)", start.path, done, best)
        else:
            log.info("resumed the %s stage from %s at iteration %d", args.stage, start.path, done)
    if proc.dist.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        logs.write_run_settings(args, work_dir, train_set, val_set, proc, start.path)
    loaders = loaders_for(args, train_set, val_set, proc, state, parts.label_transform)
    writer = logs.open_tensorboard(work_dir, state.iteration) if proc.dist.is_main else None
    if writer is not None:
        cleanup.callback(writer.close)
    wrapped = step.wrap_for_training(parts.model, proc.device, proc.dist.distributed, args.compile)
    run = loop.Run(
        **vars(parts),
        args=args,
        work_dir=work_dir,
        proc=proc,
        train_model=wrapped,
        scaler=scaler,
        loaders=loaders,
        val_set=val_set,
        meta=meta,
        writer=writer,
    )
    return run, state


def to_device(
    batch: dict, augment: Callable | None, device: torch.device, labels: Callable | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on the device, images channels_last: as the workers augmented it, or
    with --gpu-aug (decoded images and drawn parameters) augmented there; its labels through
    the recipe's ``labels`` transform, if any."""
    if augment is not None:
        images, target = augment(batch, device)
    else:
        images = batch["image"].to(device, non_blocking=True)
        target = batch["label"].to(device, non_blocking=True)
    images = images.contiguous(memory_format=torch.channels_last)
    return images, target if labels is None else labels(target)
