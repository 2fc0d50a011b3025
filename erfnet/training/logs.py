"""What a training run reports: train.log and the console, TensorBoard scalars, and
images of a few validation predictions (rendered by ``erfnet.evaluation.visualize``)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from argparse import Namespace
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from erfnet import runtime
from erfnet.errors import one_line
from erfnet.outputs import atomic_write, printable
from erfnet.training.process import WorkDirError

log = logging.getLogger("erfnet.train")


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break the tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _LogFile(logging.FileHandler):
    """train.log. A failed write (a full disk) prints nothing per line: logging's default is a
    traceback each time, and the run's own one-line error already says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def flush(self) -> None:
        with suppress(OSError):
            super().flush()

    def close(self) -> None:  # the last buffered lines may not fit either
        with suppress(OSError):
            super().close()


def setup_logging(work_dir: Path | None, is_main: bool) -> list[logging.Handler]:
    """Console + ``train.log`` on rank 0; warnings only elsewhere. Returns the handlers added."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if work_dir is not None and is_main:
        try:
            handlers.append(_LogFile(work_dir / "train.log", encoding="utf-8"))
        except OSError as e:
            raise WorkDirError(f"cannot write '{work_dir / 'train.log'}': {e.strerror}") from None
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return handlers


def close_logging(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()


@contextmanager
def errors_in_log() -> Iterator[None]:
    """An exception leaving the block is also written to train.log, as the one line the console
    shows, so that the log says why a run stopped (the console may be gone)."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, Exception | KeyboardInterrupt):  # not a stop request or an exit
            text = one_line(e)
            record = log.makeRecord(
                log.name, logging.ERROR, __file__, 0, "error: %s", (text or type(e).__name__,), None
            )
            for h in log.handlers:
                if isinstance(h, logging.FileHandler):
                    h.handle(record)
        raise


def open_tensorboard(work_dir: Path, purge_step: int | None) -> Any:
    """A SummaryWriter in ``work_dir/tensorboard`` (events after ``purge_step`` are dropped, so a
    resumed run does not draw twice), or None when TensorBoard cannot be used."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: training goes on without it
    except Exception as e:
        log.warning("TensorBoard logging disabled (%s)", e)
        return None
    return SummaryWriter(log_dir=str(work_dir / "tensorboard"), purge_step=purge_step)


def settings_json(args: Any) -> dict[str, Any]:
    """The run's settings (an argparse Namespace) as JSON values: sizes become lists."""
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in vars(args).items()}


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


class LossWindow:
    """The losses since the last log line, and how the loop spent its time: ``data_time``
    waiting for the next batch, ``compute_time`` on the step (upload, augmentation on the
    device, forward, backward, update; validation and checkpoints count in neither)."""

    def __init__(self) -> None:
        self.run_start = time.perf_counter()
        self.reset(self.run_start)

    def reset(self, now: float) -> None:
        self.start, self.loss_sum, self.loss_n, self.data_time = now, 0.0, 0, 0.0
        self.compute_time = 0.0

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.loss_n += 1

    def stall_share(self) -> float:
        """The share of the loop's time spent waiting for data (0..1): near 0 means the GPU is
        fed; a large share means more ``--workers`` (or the decoded cache, ``--gpu-aug``) help."""
        total = self.data_time + self.compute_time
        return self.data_time / total if total > 0 else 0.0


def log_training(
    window: LossWindow,
    writer: Any,
    iteration: int,
    first: int,
    args: Namespace,
    lr: float,
    device: torch.device,
) -> None:
    """One ``iter N/M | loss | lr | s/it | eta`` line (mean over the window) and its scalars;
    ``first``: the iteration this process started from."""
    now, iters = time.perf_counter(), args.iters
    n = max(1, iteration - max(first, iteration - args.log_interval))
    sec_per_it = (now - window.start) / n
    avg = window.loss_sum / window.loss_n if window.loss_n else float("nan")
    eta = (now - window.run_start) / max(1, iteration - first) * (iters - iteration)
    mem = ""
    if device.type == "cuda":
        mem = f" | mem {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    log.info(
        "iter %d/%d | loss %.4f | lr %.3e | %.3f s/it (data %.3f, stall %.0f%%) | eta %s%s",
        iteration,
        iters,
        avg,
        lr,
        sec_per_it,
        window.data_time / n,
        100 * window.stall_share(),
        format_eta(eta),
        mem,
    )
    if writer is not None:
        writer.add_scalar("train/loss", avg, iteration)
        writer.add_scalar("train/lr", lr, iteration)
        writer.add_scalar("train/sec_per_iter", sec_per_it, iteration)
        writer.add_scalar("train/data_stall_percent", 100 * window.stall_share(), iteration)
    window.reset(now)


def log_validation(metrics: dict, class_names: Sequence[str], iteration: int, writer: Any) -> None:
    """The val line of train.log (mIoU, mAcc, aAcc and each class's IoU) and its scalars."""
    ious = [(n, v) for n, v in zip(class_names, metrics["IoU"], strict=False) if not math.isnan(v)]
    log.info(
        "val at iteration %d: mIoU %.2f mAcc %.2f aAcc %.2f | %s",
        iteration,
        metrics["mIoU"],
        metrics["mAcc"],
        metrics["aAcc"],
        " ".join(f"{printable(n)}={v:.1f}" for n, v in ious),  # no name forges a line
    )
    if writer is not None:
        for key in ("mIoU", "mAcc", "aAcc"):
            writer.add_scalar(f"val/{key}", metrics[key], iteration)
        for n, v in ious:
            writer.add_scalar(f"val/IoU/{n}", v, iteration)


def write_run_settings(
    args: Namespace, work_dir: Path, train_set: Dataset, val_set: Dataset, proc: Any, resumed: Any
) -> None:
    """args.json (the flags as resolved, plus where and how ``proc``, ``loop.Process``, trains)
    and its log lines."""
    data_root = getattr(train_set, "root", args.data_root)
    settings = settings_json(args)
    world, dtype = proc.dist.world_size, proc.autocast_dtype
    settings.update(
        data_root=str(data_root),
        device=str(proc.device),
        world_size=world,
        total_batch_size=args.batch_size * getattr(args, "accum_steps", 1) * world,
        amp_dtype_used=str(dtype).replace("torch.", "") if dtype else None,
        resumed_from=str(resumed) if resumed else None,
    )
    text, path = json.dumps(settings, indent=2) + "\n", work_dir / "args.json"
    try:  # by the one atomic writer
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise WorkDirError(f"cannot write '{path}': {e.strerror}") from None
    log.info("run settings: %s", json.dumps(settings))
    log.info("train: %d images, val: %d images, from %s", len(train_set), len(val_set), data_root)


def log_start(args: Namespace, proc: Any, iteration: int) -> None:
    """The 'training for N iterations' line: batch, lr, precision, device, threads, workers."""
    world = proc.dist.world_size
    log.info(
        f"training for {args.iters} iterations (from {iteration}), batch {args.batch_size}"
        f" x {args.accum_steps} accumulated x {world} process(es)"
        f" = {args.batch_size * args.accum_steps * world}, lr {args.lr:g}, amp"
        f" {proc.autocast_dtype}, on {proc.device} ({torch.get_num_threads()} threads,"
        f" {args.workers} loader workers, {runtime.available_cores()} cores)"
    )


def progress_bar(args: Namespace, is_main: bool, iteration: int) -> AbstractContextManager:
    """tqdm's bar on rank 0 with --progress, else a context that yields None."""
    if not (is_main and args.progress):
        return nullcontext(None)
    return tqdm(
        total=args.iters,
        initial=iteration,
        unit="it",
        desc="train",
        dynamic_ncols=True,
        smoothing=0.05,
    )
