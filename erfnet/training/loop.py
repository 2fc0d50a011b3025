"""``train.py``'s loop (``train_loop``, ``iterate``), what it works with (``Run``, set up once;
``TrainState``, where it stands) and the steps it calls; ``failure`` saves the completed
iterations before an error stops the run.
"""

from __future__ import annotations

import math
import signal
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from erfnet.checkpoint import atomic_save, make_checkpoint
from erfnet.data.cityscapes import DatasetError
from erfnet.distributed import DistInfo, barrier
from erfnet.errors import one_line
from erfnet.evaluation.evaluate import evaluate
from erfnet.evaluation.inference import TestSettings
from erfnet.evaluation.visualize import prediction_strips
from erfnet.training import logs, process, resume, step
from erfnet.training.logs import log
from erfnet.training.loss import Criterion
from erfnet.training.process import PEER_FAILED, StopFlag, TrainingError, is_peer_failure
from erfnet.training.resume import InfiniteSampler
from erfnet.training.step import ClosedFormLR


@dataclass
class TrainState:
    """Where the run stands; every count is of this process (rank)."""

    iteration: int = 0  # optimizer steps completed: what logs and checkpoints count
    consumed: int = 0  # samples drawn from the sampler: the data order's position
    best_miou: float = -1.0
    last_miou: float | None = None
    nonfinite: int = 0  # consecutive iterations with a non-finite loss
    start: int = 0  # the iteration this process started from (0, or the resumed one)
    # The validation of ``iteration`` is due and not done (a stop signal interrupted it): a
    # resumed run does it first, so that best.pth ends as in an uninterrupted run.
    val_pending: bool = False


@dataclass(frozen=True)
class Process:
    """Where and how this process computes."""

    device: torch.device
    dist: DistInfo
    autocast_dtype: torch.dtype | None  # None: full precision
    use_scaler: bool  # fp16 autocast on CUDA needs a GradScaler


@dataclass
class Loaders:
    """The endless training loader, its sampler (whose position checkpoints save), the
    validation loader, and ``to_device(batch) -> (images, labels)`` for a training batch."""

    train: DataLoader
    sampler: InfiniteSampler
    val: DataLoader
    to_device: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Parts:
    """What a recipe trains: the model, its optimizer, schedule and criterion, and a transform
    of the labels on the device (--recipe erfnet_pytorch's stages)."""

    model: nn.Module  # the weights: what checkpoints and validation use
    optimizer: torch.optim.Optimizer
    scheduler: ClosedFormLR  # step.PolyLR, paper_recipe.EpochPolyLR
    criterion: Criterion
    label_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(kw_only=True)
class Run(Parts):
    """The parts and what else the loop works with, set up once (``train.make_run``)."""

    args: Namespace
    work_dir: Path
    proc: Process
    train_model: nn.Module  # the same model, wrapped for training (DDP, torch.compile)
    scaler: torch.amp.GradScaler
    loaders: Loaders
    val_set: Dataset
    meta: dict[str, Any]  # class names, palette, ignore index, mean / std
    writer: Any  # TensorBoard's SummaryWriter on rank 0, else None


def fetch_batch(batches: Iterator[Any], run: Run, state: TrainState, stop: StopFlag) -> Any:
    """The next training batch (a stop signal ends the wait at once); a file that fails now
    (changed since the data check) saves the completed iterations, then stops the run."""
    try:
        with stop.interruptible():
            return next(batches)
    except (DatasetError, OSError) as e:
        raise failure(run, state, "reading a training batch", e) from None


def account(state: TrainState, loss: float, run: Run, window: logs.LossWindow) -> None:
    """Count one optimizer step of ``run.args`` images; a non-finite loss (the step was skipped)
    counts towards ``--max-nonfinite``, which stops the run."""
    args = run.args
    state.consumed += args.batch_size * args.accum_steps  # micro-batches x their images
    state.iteration += 1
    if math.isfinite(loss):
        state.nonfinite = 0
        window.add(loss)
        return
    state.nonfinite += 1
    log.warning(
        "iteration %d: non-finite loss (%s), step skipped (%d in a row)",
        state.iteration,
        loss,
        state.nonfinite,
    )
    if state.nonfinite >= args.max_nonfinite:
        raise TrainingError(
            f"the loss was non-finite for {state.nonfinite} consecutive iterations (last at"
            f" iteration {state.iteration}); stopping. {process.resume_hint(run.work_dir)} Try a"
            " lower --lr or --no-amp, and check the data."
        )


def validate(run: Run, state: TrainState, stop: StopFlag, save_iter: bool = False) -> None:
    """Single-scale validation at ``--scale`` (every rank takes part, rank 0 logs); a new best
    mIoU writes best.pth. A stop signal abandons it at once; any failure (a changed file, an
    image the model cannot take, out of memory) saves the completed iterations (and
    iter_<N>.pth when ``save_iter``), then stops the run."""
    args, proc = run.args, run.proc
    state.val_pending = True
    # The scored classes: all outputs but a "void" one (--recipe erfnet_pytorch's last).
    names = run.meta["class_names"][: run.meta.get("void_class", len(run.meta["class_names"]))]
    try:
        with stop.interruptible():
            amp = proc.autocast_dtype == torch.float16 and proc.device.type == "cuda"
            metrics = evaluate(
                run.model,
                run.loaders.val,
                proc.device,
                TestSettings(scale=tuple(args.scale), amp=amp),
                num_classes=len(names),
                progress=args.progress,
            )
            if run.writer is not None and args.num_vis:
                strips = prediction_strips(
                    run.model,
                    run.val_set,
                    num=args.num_vis,
                    palette=run.meta["palette"],
                    settings=TestSettings(scale=tuple(args.scale)),
                    device=proc.device,
                )
                for i, strip in enumerate(strips):  # HxWx3 uint8
                    run.writer.add_image(
                        f"val/prediction_{i}", strip, state.iteration, dataformats="HWC"
                    )
    except Exception as e:
        run.model.train()
        raise failure(run, state, "validation", e, save_iter) from None
    state.val_pending = False
    state.last_miou = float(metrics["mIoU"])
    if proc.dist.is_main:
        logs.log_validation(metrics, names, state.iteration, run.writer)
    if run.writer is not None:
        run.writer.flush()
    if state.last_miou > state.best_miou:
        state.best_miou = state.last_miou
        save_checkpoint(run, state, "best.pth", full=False, mIoU=state.last_miou)
        log.info("new best mIoU %.2f: best.pth", state.last_miou)


def save_checkpoint(
    run: Run, state: TrainState, name: str, full: bool = True, **extra_meta: Any
) -> None:
    """Rank 0 writes ``work_dir/name`` atomically: the weights and meta, and (``full``) all that
    --resume needs."""
    if not run.proc.dist.is_main:
        return
    training = {}
    if full:
        training = resume.training_state(
            run.optimizer, run.scheduler, run.scaler, run.loaders.sampler, state.consumed, run.args
        )
        training["validation_pending"] = state.val_pending
    meta = {**run.meta, "iteration": state.iteration, **extra_meta}
    ckpt = make_checkpoint(
        run.model, meta, iteration=state.iteration, best_miou=state.best_miou, **training
    )
    atomic_save(ckpt, run.work_dir / name)


def save_when_due(run: Run, state: TrainState, save_iter: bool) -> None:
    """latest.pth (and iter_<N>.pth when ``save_iter``, pruned to ``--keep-ckpts``); nothing
    while the loss is non-finite, whose BatchNorm statistics may hold NaNs."""
    if state.nonfinite:
        log.warning("iteration %d: no checkpoint during non-finite losses", state.iteration)
        return
    if save_iter:
        save_checkpoint(run, state, f"iter_{state.iteration}.pth")
        if run.proc.dist.is_main:
            resume.prune_checkpoints(run.work_dir, run.args.keep_ckpts)
    save_checkpoint(run, state, "latest.pth")


def stop_wanted(run: Run, state: TrainState, stop: StopFlag) -> bool:
    """Whether to stop after this iteration: a signal to this process, or under torchrun to any
    (an all-reduce). A process that is gone fails it: the completed iteration is saved first."""
    try:
        return stop.requested(run.proc.device if run.proc.dist.distributed else None)
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        raise failure(run, state, "training", e) from None


def stop_after(run: Run, state: TrainState, stop: StopFlag) -> int:
    """End the run a SIGINT / SIGTERM stopped: latest.pth of the completed iterations (none done
    or a non-finite loss: nothing saved), one warning, and the exit status 128 + the signal."""
    outcome = "nothing saved (no iteration done)"
    if state.iteration > state.start and not state.nonfinite:
        save_checkpoint(run, state, "latest.pth")
        outcome = "latest.pth saved. Continue with --resume"
        if state.val_pending:
            outcome = "latest.pth saved; its validation runs first on --resume"
    elif state.start:
        outcome = "latest.pth unchanged. Continue with --resume"
    log.warning("stopped by %s at iteration %d; %s.", stop.name(), state.iteration, outcome)
    barrier()
    return 128 + (stop.signum or signal.SIGTERM)  # no signal here: another rank's SIGTERM


def failure(
    run: Run, state: TrainState, what: str, e: BaseException, save_iter: bool = False
) -> TrainingError:
    """The one-line error for a failure during ``what``, after saving the training state of
    the completed iterations (unless the loss is non-finite or none was done)."""
    saved = "nothing saved (no iteration done yet)"
    if state.nonfinite:
        saved = "latest.pth not updated (non-finite loss)"
    elif state.iteration > state.start:
        if save_iter:
            save_checkpoint(run, state, f"iter_{state.iteration}.pth")
        save_checkpoint(run, state, "latest.pth")
        saved = f"latest.pth of iteration {state.iteration} saved"
    if isinstance(e, DatasetError | OSError):
        cause, fix = one_line(e), "Fix the file"
    elif is_peer_failure(e):
        cause, fix = PEER_FAILED, "Fix what stopped it"
    else:  # not the data: the model, the memory, ...
        cause, fix = f"{type(e).__name__}: {one_line(e)}", "Fix the cause"
    # --resume only where there is a checkpoint to continue from (before the first one, as in
    # a bad label value found by the first batch, --resume would refuse: run again instead).
    resumable = (run.work_dir / "latest.pth").is_file()
    again = "continue with --resume" if resumable else "run the same command again"
    return TrainingError(
        f"{what} at iteration {state.iteration} failed: {cause}; {saved}. {fix}, then {again}"
    )


def train_loop(run: Run, state: TrainState, stop: StopFlag) -> int:
    """The validation a stop signal interrupted (if any), then the iterations to --iters.
    Returns the exit status."""
    args = run.args
    try:
        if state.val_pending:  # as the uninterrupted run did it, before going on
            validate(run, state, stop)
        if state.iteration >= args.iters:
            log.info(
                "nothing to do: the checkpoint is at iteration %d of --iters %d",
                state.iteration,
                args.iters,
            )
            return 0
        if iterate(run, state, stop) == "stopped":  # asked to, between two iterations
            return stop_after(run, state, stop)
    except process.StopRequested:  # in the data wait or validation: the iteration is complete
        return stop_after(run, state, stop)
    barrier()
    last_miou = state.last_miou if state.last_miou is not None else float("nan")
    # -1 means "none yet": no validation scored a labelled pixel (an all-ignore val split).
    best = f"{state.best_miou:.2f}" if state.best_miou >= 0 else "n/a"
    log.info(
        "done: %d iterations, best val mIoU %s, last %.2f; outputs in %s",
        args.iters,
        best,
        last_miou,
        run.work_dir,
    )
    return 0


def iterate(run: Run, state: TrainState, stop: StopFlag) -> str:
    """From ``state.iteration`` to --iters ("done"), or to a stop request ("stopped"): fetch,
    step, account, log, validate when due, save when due, stop when asked."""
    args, proc = run.args, run.proc
    logs.log_start(args, proc, state.iteration)
    reduce = step.mean_over_ranks if proc.dist.distributed else None
    window = logs.LossWindow()  # the losses and times since the last log line
    batches = iter(run.loaders.train)
    run.model.train()
    with logs.progress_bar(args, proc.dist.is_main, state.iteration) as bar:
        for iteration in range(state.iteration, args.iters):
            resume.seed_iteration(args.seed, proc.dist.rank, iteration)  # dropout's RNG
            t0 = time.perf_counter()
            batch = fetch_batch(batches, run, state, stop)
            t1 = time.perf_counter()
            images, labels = run.loaders.to_device(batch)
            lr = run.optimizer.param_groups[0]["lr"]
            loss = step.train_step(
                run.train_model,
                images,
                labels,
                run.optimizer,
                run.scaler,
                criterion=run.criterion,
                autocast_dtype=proc.autocast_dtype,
                reduce=reduce,
                accum_steps=args.accum_steps,
            )
            run.scheduler.step()
            window.data_time += t1 - t0
            window.compute_time += time.perf_counter() - t1  # train_step waited for the loss
            account(state, loss, run, window)
            done, last = state.iteration, state.iteration == args.iters
            if bar is not None:
                bar.update(1)
                stall = f"{window.stall_share():.0%}"
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", stall=stall, refresh=False)
            if done % args.log_interval == 0 or last:
                logs.log_training(window, run.writer, done, state.start, args, lr, proc.device)
            due_val = done % args.val_interval == 0 or last
            due_ckpt = done % args.ckpt_interval == 0
            if due_val:
                validate(run, state, stop, save_iter=due_ckpt)
            if due_val or due_ckpt or last:
                save_when_due(run, state, save_iter=due_ckpt)
            if stop_wanted(run, state, stop) and not last:
                return "stopped"
    return "done"
