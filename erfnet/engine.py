"""The training loop: mmseg's ERFNet recipe in plain PyTorch (SGD + poly, CE loss, AMP, DDP).

Reproducibility is designed in, so that an interrupted and resumed run ends with the same
weights as an uninterrupted one (bit for bit on the CPU):

- the data order comes from ``InfiniteSampler``: a per-epoch permutation drawn from
  ``seed + epoch`` and sharded by rank like ``DistributedSampler``; its position (samples consumed
  by this rank) is saved in the checkpoint;
- every sample's augmentation is drawn from RNGs seeded by ``(seed, epoch, position)``
  (``SeededDataset``), not from a worker's running RNG, so it does not depend on worker count or
  prefetching;
- the RNGs the model uses (dropout) are reseeded every iteration from ``(seed, rank, iteration)``;
- the poly schedule is a closed-form function of the iteration.

``train(cfg)`` runs everything; ``train.py`` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, Sampler

from erfnet.checkpoint import (
    CheckpointError,
    atomic_save,
    default_meta,
    load_checkpoint,
    make_checkpoint,
    unwrap_model,
)
from erfnet.config import IGNORE_INDEX, NUM_CLASSES, RECIPE
from erfnet.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
    local_rank_from_env,
    resolve_device,
)
from erfnet.model import ERFNet

log = logging.getLogger("erfnet.train")

_MASK64 = (1 << 64) - 1

# ``--data synthetic`` is a quick-start preset: small images and more, larger steps, so that
# `python train.py --data synthetic` learns something visible in minutes on a laptop CPU (the
# recipe's 512x1024 crops would take hours). Each value applies only where its flag is not given;
# Cityscapes gets the recipe's (RECIPE_DEFAULTS).
SYNTHETIC_PRESET: dict[str, Any] = {
    "iters": 800,
    "batch_size": 8,
    "lr": 0.1,
    "crop_size": (64, 128),
    "scale": (128, 256),
    "val_interval": 200,
    "ckpt_interval": 400,
}
RECIPE_DEFAULTS: dict[str, Any] = {
    "iters": RECIPE.iters,
    "batch_size": RECIPE.batch_size_per_gpu,
    "lr": RECIPE.lr,
    "crop_size": RECIPE.crop_size,
    "scale": RECIPE.scale,
    "val_interval": RECIPE.val_interval,
    "ckpt_interval": RECIPE.ckpt_interval,
}
# The synthetic dataset made on demand: images per split and their size (W, H).
SYNTHETIC_DATA: dict[str, Any] = {"train": 64, "val": 16, "size": (256, 128), "seed": 0}

# Environment hook for tests: "sigterm@K", "sigint@K" or "sigkill@K" sends that signal to this
# process after iteration K; "nan@K" makes the loss NaN from iteration K on.
FAULT_ENV = "ERFNET_TEST_FAULT"


class ConfigError(ValueError):
    """A bad training setting; the message names the flag."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to do."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the recipe's (``erfnet.config.RECIPE``).

    Fields left as None get a default by ``data`` in ``resolved()``: ``RECIPE_DEFAULTS`` for
    Cityscapes, ``SYNTHETIC_PRESET`` for synthetic data; ``work_dir`` and ``workers`` likewise.
    """

    data: str = "cityscapes"
    data_root: str | None = None
    iters: int | None = None
    batch_size: int | None = None
    crop_size: tuple[int, int] | None = None
    scale: tuple[int, int] | None = None
    lr: float | None = None
    momentum: float = RECIPE.momentum
    weight_decay: float = RECIPE.weight_decay
    min_lr: float = RECIPE.min_lr
    poly_power: float = RECIPE.poly_power
    workers: int | None = None  # None: min(4, CPU cores), mmseg's 4 per GPU where possible
    work_dir: str | None = None
    resume: str | None = None
    device: str = "auto"
    seed: int = 0
    val_interval: int | None = None
    ckpt_interval: int | None = None
    amp: bool | None = None
    amp_dtype: str = "auto"
    compile: bool = False
    head: str = "fcn"
    photometric: bool = True
    log_interval: int = 50
    keep_ckpts: int = 0
    num_vis: int = 4
    max_nonfinite: int = 20
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the data-dependent defaults filled in and sizes as int tuples."""
        preset = SYNTHETIC_PRESET if self.data == "synthetic" else RECIPE_DEFAULTS
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in preset.items()}
        values["crop_size"] = tuple(int(x) for x in values["crop_size"])
        values["scale"] = tuple(int(x) for x in values["scale"])
        if self.work_dir is None:
            values["work_dir"] = str(Path("work_dirs") / f"erfnet_{self.data}")
        if self.workers is None:
            values["workers"] = min(4, os.cpu_count() or 1)
        return dataclasses.replace(self, **values)


def check_config(cfg: TrainConfig) -> None:
    """Reject bad values with a message naming the flag (expects a ``resolved()`` config)."""
    if cfg.data not in ("cityscapes", "synthetic"):
        raise ConfigError(f"--data must be cityscapes or synthetic, got {cfg.data!r}")
    positive = {
        "--iters": cfg.iters,
        "--batch-size": cfg.batch_size,
        "--val-interval": cfg.val_interval,
        "--ckpt-interval": cfg.ckpt_interval,
        "--log-interval": cfg.log_interval,
        "--max-nonfinite": cfg.max_nonfinite,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    for flag, value in {
        "--workers": cfg.workers,
        "--keep-ckpts": cfg.keep_ckpts,
        "--num-vis": cfg.num_vis,
        "--seed": cfg.seed,
    }.items():
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    assert cfg.crop_size is not None and cfg.scale is not None
    for flag, size in (("--crop-size", cfg.crop_size), ("--scale", cfg.scale)):
        if len(size) != 2 or min(size) < 8:
            raise ConfigError(f"{flag} takes H W, each at least 8, got {list(size)}")
    if cfg.crop_size[0] > cfg.scale[0] or cfg.crop_size[1] > cfg.scale[1]:
        raise ConfigError(
            f"--crop-size {cfg.crop_size[0]} {cfg.crop_size[1]} is larger than --scale"
            f" {cfg.scale[0]} {cfg.scale[1]}: the crop must fit in the resize base size (H W)"
        )
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    if not (0 <= cfg.min_lr <= cfg.lr):
        raise ConfigError(f"--min-lr must be in [0, --lr={cfg.lr}], got {cfg.min_lr}")
    if not (0 <= cfg.momentum < 1):
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not (cfg.weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if not (cfg.poly_power > 0):
        raise ConfigError(f"--poly-power must be positive, got {cfg.poly_power}")
    if cfg.amp_dtype not in ("auto", "float16", "bfloat16"):
        raise ConfigError(f"--amp-dtype must be auto, float16 or bfloat16, got {cfg.amp_dtype}")
    if cfg.head not in ("fcn", "deconv"):
        raise ConfigError(f"--head must be fcn or deconv, got {cfg.head!r}")


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def poly_lr(
    base_lr: float,
    iteration: int,
    max_iters: int,
    power: float = RECIPE.poly_power,
    min_lr: float = RECIPE.min_lr,
) -> float:
    """mmseg's PolyLR with ``eta_min``: ``(base - min) * (1 - it / max) ** power + min``."""
    progress = min(max(iteration, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


class PolyLR(LRScheduler):
    """Per-iteration poly decay; closed form, so a resumed schedule matches exactly.

    Its state_dict holds only numbers (safe for ``torch.load(weights_only=True)``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        power: float = RECIPE.poly_power,
        min_lr: float = RECIPE.min_lr,
        last_epoch: int = -1,
    ) -> None:
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            poly_lr(base, self.last_epoch, self.max_iters, self.power, self.min_lr)
            for base in self.base_lrs
        ]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position and put the matching lr in the optimizer's groups."""
        super().load_state_dict(state_dict)
        self.apply()

    def set_max_iters(self, max_iters: int) -> None:
        """Stretch or shorten the schedule (e.g. ``--iters`` changed on resume)."""
        self.max_iters = int(max_iters)
        self.apply()

    def apply(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


# --------------------------------------------------------------------------------------------
# Seeds and data order
# --------------------------------------------------------------------------------------------


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


class InfiniteSampler(Sampler[tuple[int, int]]):
    """An endless stream of ``(dataset index, sample seed)`` for this rank.

    Epoch ``e`` is ``randperm(size)`` drawn from ``seed + e`` (``arange`` without shuffling),
    padded by repetition to a multiple of ``world_size`` and strided by rank, exactly like
    ``DistributedSampler``. ``start`` is the number of samples this rank already consumed, so a
    resumed run continues where the interrupted one stopped. Each sample's seed is a function of
    (seed, epoch, global position) and drives its augmentation (see ``SeededDataset``).
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle = shuffle
        self.start = int(start)
        self.num_samples = math.ceil(size / world_size)  # per rank and epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch``."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.num_samples * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def position(self, consumed: int) -> tuple[int, int]:
        """(epoch, index within this rank's epoch) after ``consumed`` samples."""
        return divmod(int(consumed), self.num_samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.position(self.start)
        while True:
            indices = self.epoch_indices(epoch)
            for pos in range(offset, self.num_samples):
                global_pos = pos * self.world_size + self.rank
                yield indices[pos], mix_seed(self.seed, epoch, global_pos)
            epoch, offset = epoch + 1, 0


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's, numpy's and Python's global RNGs inside the block; restore them after.

    Restoring keeps the caller's RNG streams untouched when samples load in the main process.
    """
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is loaded under ``seeded_rngs(seed)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with seeded_rngs(seed):
            return self.dataset[index]


def _worker_init(worker_id: int) -> None:
    # DataLoader seeds each worker's torch RNG from its generator (derived from seed, rank and
    # the starting iteration); numpy and random follow it. Ctrl-C is left to the main process,
    # which saves a checkpoint and shuts the workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = torch.initial_seed()
    np.random.seed(s % (1 << 32))
    random.seed(s)


def build_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_samples: int = 0,
    start_iter: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, InfiniteSampler]:
    """An endless loader of augmented batches, positioned after ``start_samples`` samples."""
    sampler = InfiniteSampler(
        len(dataset),  # type: ignore[arg-type]
        seed=seed,
        rank=rank,
        world_size=world_size,
        start=start_samples,
    )
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, rank, start_iter, 1))
    loader = DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=generator,
        prefetch_factor=2 if workers > 0 else None,
    )
    return loader, sampler


# --------------------------------------------------------------------------------------------
# RNG state in checkpoints (tensors, lists and numbers only: weights_only-safe)
# --------------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_iteration(seed: int, rank: int, iteration: int) -> None:
    """Reseed torch (CPU and CUDA) for one iteration: dropout then depends only on these."""
    torch.manual_seed(mix_seed(seed, rank, iteration, 2))


# --------------------------------------------------------------------------------------------
# One optimisation step
# --------------------------------------------------------------------------------------------


def compute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy over labelled pixels (mmseg's CrossEntropyLoss, no weights)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Forward, backward and (if the loss is finite) an optimizer step; returns the loss.

    ``reduce`` (DDP) averages the loss over processes before the finiteness test, so that every
    process takes the same decision. A non-finite loss skips the step (returned as nan/inf).
    """
    device_type = images.device.type
    ctx = (
        torch.autocast(device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    with ctx:
        logits = model(images)
    loss = compute_loss(logits, labels)
    if _fault_nan():
        loss = loss * float("nan")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
    else:
        loss.backward()
    value = loss.detach().float().reshape(1)
    if reduce is not None:
        value = reduce(value)
    loss_value = float(value.item())
    if math.isfinite(loss_value):
        if scaler is not None and scaler.is_enabled():
            scaler.step(optimizer)  # itself skips steps whose fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss_value


# --------------------------------------------------------------------------------------------
# Fault hook for tests
# --------------------------------------------------------------------------------------------

_FAULT_STATE = {"iteration": -1}


def _fault() -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if "@" not in spec:
        return None
    kind, at = spec.split("@", 1)
    return kind.strip().lower(), int(at)


def _fault_nan() -> bool:
    f = _fault()
    return f is not None and f[0] == "nan" and _FAULT_STATE["iteration"] >= f[1]


def _fault_after_iteration(iteration: int) -> None:
    """Called with the number of completed iterations; may signal this process."""
    f = _fault()
    if f is None or f[0] == "nan" or iteration != f[1]:
        return
    sig = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}[f[0]]
    os.kill(os.getpid(), sig)


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each iteration; a second one aborts."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting")
        self.signum = signum
        log.warning(
            "received %s: saving latest.pth after this iteration, then exiting"
            " (send it again to abort without saving)",
            signal.Signals(signum).name,
        )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def synthetic_root(cfg: TrainConfig) -> Path:
    """Where ``--data synthetic`` keeps its dataset: --data-root, else a cache folder."""
    if cfg.data_root:
        return Path(cfg.data_root)
    params = SYNTHETIC_DATA
    w, h = params["size"]
    tag = f"synthetic-{params['train']}-{params['val']}-{w}x{h}-s{params['seed']}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "erfnet" / tag


def ensure_synthetic(root: Path) -> Path:
    """Create the synthetic dataset at ``root`` unless something is there already.

    Written into a temporary sibling folder and renamed, so a killed run or a concurrent one
    never leaves a half-made dataset behind.
    """
    if root.exists() and any(root.iterdir()):
        return root
    from erfnet.data.synthetic import make_synthetic_cityscapes

    params = SYNTHETIC_DATA
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.{os.getpid()}.tmp"
    log.info("creating the synthetic dataset in %s", root)
    make_synthetic_cityscapes(
        tmp,
        train=params["train"],
        val=params["val"],
        test=0,
        size=params["size"],
        seed=params["seed"],
        extras=False,
    )
    try:
        if root.exists():
            root.rmdir()  # an empty folder, e.g. made by the user for --data-root
        os.replace(tmp, root)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        if not (root.exists() and any(root.iterdir())):
            raise
    return root


def build_datasets(cfg: TrainConfig, dist_info: DistInfo) -> tuple[Dataset, Dataset, Path]:
    """The augmented train split and the plain val split (resized later by the evaluator)."""
    from erfnet.data.cityscapes import CityscapesDataset, DatasetError, resolve_data_root
    from erfnet.data.transforms import TrainTransform

    if cfg.data == "synthetic":
        root = synthetic_root(cfg)
        if root.exists() and not root.is_dir():
            raise DatasetError(f"--data-root '{root}' exists and is not a folder")
        error = [""]
        if dist_info.is_main:
            try:
                ensure_synthetic(root)
            except OSError as e:
                error[0] = f"cannot create the synthetic dataset in '{root}': {e}"
        if dist_info.distributed:  # every rank stops with rank 0's error instead of hanging
            import torch.distributed as dist

            dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise DatasetError(error[0])
    else:
        root = resolve_data_root(cfg.data_root)
    transform = TrainTransform(
        crop_size=cfg.crop_size, scale=cfg.scale, photometric=cfg.photometric
    )
    train_set = CityscapesDataset(root, "train", transform=transform)
    val_set = CityscapesDataset(root, "val")
    return train_set, val_set, root


# --------------------------------------------------------------------------------------------
# Logging and outputs
# --------------------------------------------------------------------------------------------


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break the tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(work_dir: Path | None, is_main: bool) -> list[logging.Handler]:
    """Console + ``train.log`` on rank 0; warnings only elsewhere."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if work_dir is not None and is_main:
        handlers.append(logging.FileHandler(work_dir / "train.log", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return handlers


def _close_logging(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()


def _open_tensorboard(work_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # tensorboard missing or broken: training goes on without it
        log.warning("TensorBoard logging disabled (%s)", e)
        return None
    return SummaryWriter(log_dir=str(work_dir / "tensorboard"), purge_step=purge_step)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

TRAINING_KEYS = ("optimizer", "scheduler", "iteration", "sampler")


# Settings whose change on --resume alters the run. The first group continues from the
# checkpoint (the optimizer's and scheduler's saved state win); the rest take the new values.
RESUME_KEPT = ("lr", "min_lr", "poly_power", "momentum", "weight_decay")
RESUME_NEW = ("data", "batch_size", "crop_size", "scale", "photometric", "seed", "head")


def _warn_changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Say which settings differ from the checkpoint's run, and which of the two applies."""

    def changed(keys: tuple[str, ...]) -> list[str]:
        return [
            f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}"
            for k in keys
            if k in saved and k in now and saved[k] != now[k]
        ]

    kept, new = changed(RESUME_KEPT), changed(RESUME_NEW)
    if kept:
        log.warning(
            "resume: %s differ from the checkpoint's run; the checkpoint's values are kept"
            " (optimizer and schedule state)",
            ", ".join(kept),
        )
    if new:
        log.warning(
            "resume: %s differ from the checkpoint's run; the new values apply from here on,"
            " so the run is no longer the one that was interrupted",
            ", ".join(new),
        )


def config_to_json(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """``--resume`` without a path means ``latest.pth`` in the work dir."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        path = Path(cfg.work_dir) / "latest.pth"  # type: ignore[arg-type]
        if not path.is_file():
            raise CheckpointError(
                f"--resume: no latest.pth in the work dir {cfg.work_dir} (nothing to resume;"
                " drop --resume to start a new run, or pass a checkpoint path)"
            )
        return path
    return Path(cfg.resume)


def load_training_checkpoint(path: Path, model: ERFNet) -> dict:
    """Read a training checkpoint and check it fits ``model``; clear errors otherwise."""
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"--resume {path}: not a training checkpoint (it lacks {', '.join(missing)}); it holds"
            " weights only. Resume from latest.pth or an iter_<N>.pth of a work dir."
        )
    if dict(ckpt["model_args"]) != dict(model.config):
        diff = {
            k: (ckpt["model_args"].get(k), model.config.get(k))
            for k in sorted(set(ckpt["model_args"]) | set(model.config))
            if ckpt["model_args"].get(k) != model.config.get(k)
        }
        detail = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"--resume {path}: the checkpoint's model does not match this run ({detail})"
        )
    return ckpt


# --------------------------------------------------------------------------------------------
# Visualisation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _log_predictions(
    writer: Any,
    model: nn.Module,
    val_set: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    step: int,
) -> None:
    """A few val images as [image | ground truth | prediction] strips in TensorBoard."""
    from PIL import Image

    from erfnet.inference import denormalize, predict
    from erfnet.labels import TRAIN_ID_TO_COLOR

    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    try:
        for i in range(min(cfg.num_vis, len(val_set))):  # type: ignore[arg-type]
            sample = val_set[i]
            image = sample["image"].unsqueeze(0).to(device)
            label = sample["label"].numpy()
            pred = predict(net, image, label.shape, test_scale=cfg.scale)[0].cpu().numpy()
            rgb = denormalize(sample["image"])
            if rgb.shape[:2] != label.shape:
                rgb = np.asarray(Image.fromarray(rgb).resize(label.shape[::-1]))
            strip = np.concatenate(
                [rgb, TRAIN_ID_TO_COLOR[label.astype(np.uint8)], TRAIN_ID_TO_COLOR[pred]], axis=1
            )
            writer.add_image(f"val/prediction_{i}", strip, step, dataformats="HWC")
    finally:
        net.train(was_training)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    iteration: int
    best_miou: float
    last_miou: float | None
    interrupted_by: int  # signal number, 0 when training ran to the end
    work_dir: Path


def _amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    enabled = cfg.amp if cfg.amp is not None else device.type == "cuda"
    if not enabled:
        return None, False
    if cfg.amp_dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    else:
        dtype = getattr(torch, cfg.amp_dtype)
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("--amp-dtype float16 is for CUDA; use bfloat16 on the CPU")
    return dtype, (device.type == "cuda" and dtype == torch.float16)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module docstring. Call under torchrun for DDP."""
    cfg = cfg.resolved()
    check_config(cfg)
    device = resolve_device(cfg.device, local_rank_from_env())
    autocast_dtype, use_scaler = _amp_settings(cfg, device)
    work_dir = Path(cfg.work_dir)  # type: ignore[arg-type]
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(f"--work-dir '{work_dir}' exists and is not a folder")
    dist_info = init_distributed(device)
    if dist_info.is_main:
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--work-dir '{work_dir}': cannot create it ({e.strerror})") from None
    handlers = setup_logging(work_dir if dist_info.is_main else None, dist_info.is_main)
    stop = StopFlag()
    stop.install()
    trainer = None
    try:
        trainer = Trainer(cfg, device, dist_info, work_dir, autocast_dtype, use_scaler, stop)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        stop.restore()
        _close_logging(handlers)
        cleanup_distributed()


class Trainer:
    """One run's state (model, optimizer, schedule, data position, outputs) and its loop."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        dist_info: DistInfo,
        work_dir: Path,
        autocast_dtype: torch.dtype | None,
        use_scaler: bool,
        stop: StopFlag,
    ) -> None:
        from erfnet.inference import build_eval_loader

        self.cfg, self.device, self.dist, self.work_dir = cfg, device, dist_info, work_dir
        self.autocast_dtype, self.stop = autocast_dtype, stop
        self.is_main = dist_info.is_main
        resume_path = resolve_resume(cfg)
        self.train_set, self.val_set, data_root = build_datasets(cfg, dist_info)

        # The same initial weights on every rank (DDP also broadcasts them from rank 0).
        torch.manual_seed(cfg.seed)
        self.num_classes = NUM_CLASSES
        model = ERFNet(num_classes=self.num_classes, head=cfg.head)
        ckpt = load_training_checkpoint(resume_path, model) if resume_path else None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        if dist_info.distributed and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif dist_info.distributed:
            log.info("SyncBatchNorm needs CUDA; on the CPU each process keeps its own BN stats")
        # channels_last is the fast layout for cuDNN and for oneDNN on the CPU alike (same maths;
        # scripts/benchmark.py measures 1.2-1.5x per training iteration on a 2-core CPU).
        self.channels_last = True
        model.to(device, memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model = model

        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = PolyLR(self.optimizer, cfg.iters, cfg.poly_power, cfg.min_lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.iteration, self.best_miou, self.consumed = 0, -1.0, 0
        if ckpt is not None:
            self._restore(ckpt, resume_path)

        net: nn.Module = model
        if dist_info.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.train_model = torch.compile(net) if cfg.compile else net
        self.reduce = _mean_over_ranks if dist_info.distributed else None

        if self.is_main:
            self._write_args(data_root, resume_path)
        self.loader, self.sampler = build_train_loader(
            self.train_set,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            seed=cfg.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            start_samples=self.consumed,
            start_iter=self.iteration,
            pin_memory=device.type == "cuda",
        )
        self.val_loader = build_eval_loader(
            self.val_set,
            batch_size=1,
            workers=min(cfg.workers, 2),
            pin_memory=device.type == "cuda",
        )
        self.writer = _open_tensorboard(work_dir, self.iteration) if self.is_main else None

    # ------------------------------------------------------------------ state

    def _restore(self, ckpt: dict, path: Path | None) -> None:
        cfg = self.cfg
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scheduler.max_iters != cfg.iters:
            log.warning(
                "--iters %d differs from the checkpoint's %d: the poly schedule now ends at %d",
                cfg.iters,
                self.scheduler.max_iters,
                cfg.iters,
            )
            self.scheduler.set_max_iters(cfg.iters)
        _warn_changed_settings(ckpt.get("args") or {}, config_to_json(cfg))
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best_miou = float(ckpt.get("best_miou", -1.0))
        self.consumed = _resume_position(ckpt["sampler"], len(self.train_set), self.dist)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        log.info(
            "resumed from %s at iteration %d (best mIoU %.2f)", path, self.iteration, self.best_miou
        )

    def _write_args(self, data_root: Path, resume_path: Path | None) -> None:
        cfg, dtype = self.cfg, self.autocast_dtype
        args = config_to_json(cfg)
        args.update(
            data_root=str(data_root),
            device=str(self.device),
            world_size=self.dist.world_size,
            total_batch_size=cfg.batch_size * self.dist.world_size,
            amp_dtype_used=str(dtype).replace("torch.", "") if dtype else None,
            resumed_from=str(resume_path) if resume_path else None,
        )
        (self.work_dir / "args.json").write_text(json.dumps(args, indent=2) + "\n")
        log.info("run settings: %s", json.dumps(args))
        log.info(
            "train: %d images, val: %d images, from %s",
            len(self.train_set),
            len(self.val_set),
            data_root,
        )

    def save(self, name: str, full: bool = True, **meta: Any) -> None:
        """Write a checkpoint on rank 0: full training state, or (``full=False``) weights only."""
        if not self.is_main:
            return
        extra: dict[str, Any] = {"iteration": self.iteration, "best_miou": self.best_miou}
        if full:
            epoch, index = self.sampler.position(self.consumed)
            extra.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
                rng=get_rng_state(),
                sampler={
                    "epoch": epoch,
                    "index": index,
                    "consumed": self.consumed,
                    "world_size": self.dist.world_size,
                    "dataset_size": len(self.train_set),
                    "seed": self.cfg.seed,
                },
                args=config_to_json(self.cfg),
            )
        ckpt = make_checkpoint(self.model, {"iteration": self.iteration, **meta}, **extra)
        atomic_save(ckpt, self.work_dir / name)

    # ------------------------------------------------------------------ validation and logs

    def validate(self) -> float:
        """Single-scale val mIoU (every rank takes part; rank 0 logs)."""
        from erfnet.inference import evaluate

        metrics = evaluate(
            self.model,
            self.val_loader,
            self.device,
            num_classes=self.num_classes,
            test_scale=self.cfg.scale,
            amp=self.autocast_dtype == torch.float16 and self.device.type == "cuda",
            progress=self.cfg.progress,
        )
        assert metrics is not None
        miou = float(metrics["mIoU"])
        if not self.is_main:
            return miou
        names = default_meta(self.num_classes)["class_names"]
        ious = [(n, v) for n, v in zip(names, metrics["IoU"], strict=False) if not math.isnan(v)]
        log.info(
            "val at iteration %d: mIoU %.2f mAcc %.2f aAcc %.2f | %s",
            self.iteration,
            miou,
            metrics["mAcc"],
            metrics["aAcc"],
            " ".join(f"{n}={v:.1f}" for n, v in ious),
        )
        if self.writer is not None:
            step = self.iteration
            for key in ("mIoU", "mAcc", "aAcc"):
                self.writer.add_scalar(f"val/{key}", metrics[key], step)
            for n, v in ious:
                self.writer.add_scalar(f"val/IoU/{n}", v, step)
            if self.cfg.num_vis:
                _log_predictions(self.writer, self.model, self.val_set, self.cfg, self.device, step)
            self.writer.flush()
        return miou

    def _log_window(self, stats: dict[str, float], lr: float, run_start: float, first: int) -> None:
        now = time.perf_counter()
        it, cfg = self.iteration, self.cfg
        n = max(1, it - max(first, it - cfg.log_interval))
        sec_per_it = (now - stats["window_start"]) / n
        avg = stats["loss_sum"] / stats["loss_n"] if stats["loss_n"] else float("nan")
        eta = (now - run_start) / max(1, it - first) * (cfg.iters - it)
        mem = ""
        if self.device.type == "cuda":
            mem = f" | mem {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        log.info(
            "iter %d/%d | loss %.4f | lr %.3e | %.3f s/it (data %.3f) | eta %s%s",
            it,
            cfg.iters,
            avg,
            lr,
            sec_per_it,
            stats["data_time"] / n,
            _format_eta(eta),
            mem,
        )
        if self.writer is not None:
            self.writer.add_scalar("train/loss", avg, it)
            self.writer.add_scalar("train/lr", lr, it)
            self.writer.add_scalar("train/sec_per_iter", sec_per_it, it)
        stats.update(loss_sum=0.0, loss_n=0, window_start=now, data_time=0.0)

    def _stop_requested(self, flag: torch.Tensor) -> bool:
        if not self.dist.distributed:
            return bool(self.stop.signum)
        # Every rank must stop at the same iteration (torchrun signals all of them, but not
        # necessarily between the same two iterations).
        flag.fill_(1.0 if self.stop.signum else 0.0)
        return all_reduce_sum(flag).item() > 0

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        cfg, device = self.cfg, self.device
        first = self.iteration
        if first >= cfg.iters:
            log.info(
                "nothing to do: the checkpoint is at iteration %d of --iters %d", first, cfg.iters
            )
            return TrainResult(first, self.best_miou, None, 0, self.work_dir)
        log.info(
            "training for %d iterations (from %d), batch %d x %d process(es), lr %g, amp %s, on %s",
            cfg.iters,
            first,
            cfg.batch_size,
            self.dist.world_size,
            cfg.lr,
            self.autocast_dtype,
            device,
        )
        progress = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            progress = tqdm(
                total=cfg.iters,
                initial=first,
                unit="it",
                desc="train",
                dynamic_ncols=True,
                smoothing=0.05,
            )
        self.model.train()
        data_iter = iter(self.loader)
        last_miou: float | None = None
        nonfinite = 0
        run_start = time.perf_counter()
        stats = {"loss_sum": 0.0, "loss_n": 0, "window_start": run_start, "data_time": 0.0}
        stop_flag = torch.zeros(1, device=device)
        for it in range(first, cfg.iters):
            _FAULT_STATE["iteration"] = it
            seed_iteration(cfg.seed, self.dist.rank, it)
            t0 = time.perf_counter()
            batch = next(data_iter)
            stats["data_time"] += time.perf_counter() - t0
            images = batch["image"].to(device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            lr = self.optimizer.param_groups[0]["lr"]
            loss = train_step(
                self.train_model,
                images,
                labels,
                self.optimizer,
                self.scaler,
                autocast_dtype=self.autocast_dtype,
                reduce=self.reduce,
            )
            self.scheduler.step()
            self.consumed += cfg.batch_size
            self.iteration = it + 1

            if math.isfinite(loss):
                nonfinite = 0
                stats["loss_sum"] += loss
                stats["loss_n"] += 1
            else:
                nonfinite += 1
                self._nonfinite(loss, nonfinite)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            last = self.iteration == cfg.iters
            if self.iteration % cfg.log_interval == 0 or last:
                self._log_window(stats, lr, run_start, first)

            do_val = self.iteration % cfg.val_interval == 0 or last
            do_ckpt = self.iteration % cfg.ckpt_interval == 0
            if do_val:
                last_miou = self.validate()
                if last_miou > self.best_miou:
                    self.best_miou = last_miou
                    self.save("best.pth", full=False, mIoU=last_miou)
                    log.info("new best mIoU %.2f: best.pth", last_miou)
            if nonfinite and (do_ckpt or do_val or last):
                # BN statistics may hold NaNs now: keep the last good checkpoint.
                log.warning("iteration %d: no checkpoint during non-finite losses", self.iteration)
            elif do_ckpt or do_val or last:
                if do_ckpt:
                    self.save(f"iter_{self.iteration}.pth")
                    _prune_checkpoints(self.work_dir, cfg.keep_ckpts, self.is_main)
                self.save("latest.pth")

            _fault_after_iteration(self.iteration)
            if self._stop_requested(stop_flag) and not last:
                if not nonfinite:
                    self.save("latest.pth")
                log.warning(
                    "stopped by %s at iteration %d; latest.pth saved. Continue with --resume.",
                    _signame(self.stop.signum),
                    self.iteration,
                )
                self._close(progress)
                barrier()
                signum = self.stop.signum or signal.SIGTERM
                return TrainResult(self.iteration, self.best_miou, last_miou, signum, self.work_dir)
        self._close(progress)
        barrier()
        log.info(
            "done: %d iterations, best val mIoU %.2f, last %.2f; outputs in %s",
            self.iteration,
            self.best_miou,
            last_miou if last_miou is not None else float("nan"),
            self.work_dir,
        )
        return TrainResult(self.iteration, self.best_miou, last_miou, 0, self.work_dir)

    def _nonfinite(self, loss: float, count: int) -> None:
        log.warning(
            "iteration %d: non-finite loss (%s), step skipped (%d in a row)",
            self.iteration,
            loss,
            count,
        )
        if count >= self.cfg.max_nonfinite:
            raise TrainingError(
                f"the loss was non-finite for {count} consecutive iterations (last at iteration"
                f" {self.iteration}); stopping. The last good checkpoint is"
                f" {self.work_dir / 'latest.pth'} (if one was written). Try a lower --lr or"
                " --no-amp, and check the data."
            )

    def _close(self, progress: Any) -> None:
        if progress is not None:
            progress.close()
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.clone()
    all_reduce_sum(t)
    return t / dist.get_world_size()


def _resume_position(state: dict, dataset_size: int, dist_info: DistInfo) -> int:
    """Samples this rank already consumed, from the checkpoint's sampler position."""
    num_samples = math.ceil(dataset_size / dist_info.world_size)
    same = (
        int(state.get("world_size", 1)) == dist_info.world_size
        and int(state.get("dataset_size", -1)) == dataset_size
    )
    if same:
        return int(state["epoch"]) * num_samples + int(state["index"])
    # Another process count or dataset: keep the epoch and the global fraction of it done; the
    # data order then differs from an uninterrupted run.
    log.warning(
        "the checkpoint's sampler was for %s process(es) and %s images, this run has %d and %d;"
        " continuing at the same epoch, but the data order will differ from an uninterrupted run",
        state.get("world_size"),
        state.get("dataset_size"),
        dist_info.world_size,
        dataset_size,
    )
    old_per_rank = math.ceil(
        int(state.get("dataset_size", dataset_size)) / max(1, int(state.get("world_size", 1)))
    )
    frac = int(state["index"]) / max(1, old_per_rank)
    return int(state["epoch"]) * num_samples + int(frac * num_samples)


def _prune_checkpoints(work_dir: Path, keep: int, is_main: bool) -> None:
    """Keep the newest ``keep`` iter_<N>.pth files (0 keeps all)."""
    if not is_main or keep <= 0:
        return
    found = sorted(
        (int(p.stem.split("_", 1)[1]), p)
        for p in work_dir.glob("iter_*.pth")
        if p.stem.split("_", 1)[1].isdigit()
    )
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)
