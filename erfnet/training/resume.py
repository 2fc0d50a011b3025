"""The exact-resume contract: an interrupted and resumed run ends with the same weights as an
uninterrupted one (bit for bit on the CPU).

- the data order comes from ``InfiniteSampler``, whose position the checkpoint saves;
- every sample's augmentation is drawn from RNGs seeded by ``(seed, epoch, position)``
  (``SeededDataset``), not from a worker's running RNG: worker count and prefetching do not matter;
- dropout's RNGs are reseeded every iteration from ``(seed, rank, iteration)`` (``seed_iteration``);
- the lr schedule is a closed-form function of the iteration (``step.ClosedFormLR``);
- ``training_state`` / ``restore_training_state`` save and restore the rest (optimizer, schedule,
  GradScaler, RNGs, sampler position, the run's settings) in a weights_only-safe checkpoint.
"""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from erfnet.checkpoint import CheckpointError, load_checkpoint, model_args
from erfnet.model import ERFNet
from erfnet.training.logs import log, settings_json
from erfnet.training.step import PolyLR

_MASK64 = (1 << 64) - 1

# What makes a checkpoint resumable (best.pth holds weights only).
TRAINING_KEYS = ("optimizer", "scheduler", "iteration", "sampler")

# Settings whose change on --resume alters the run. The first group continues from the
# checkpoint (the optimizer's and scheduler's saved state win); the rest take the new values.
RESUME_KEPT = ("lr", "min_lr", "poly_power", "momentum", "weight_decay")
RESUME_NEW = (
    "data",
    "batch_size",
    "accum_steps",
    "crop_size",
    "scale",
    "photometric",
    "seed",
    "head",
    "sync_bn",
    "avg_non_ignore",
    "class_weights",
    "ohem",
)


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
    """An endless stream of ``(dataset index, sample seed)`` for this rank, after the ``start``
    samples it already consumed. Epoch ``e`` is ``randperm(size)`` drawn from ``seed + e``, padded
    to a multiple of ``world_size`` and strided by rank, exactly like ``DistributedSampler``."""

    def __init__(
        self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if size < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start = int(start)
        self.num_samples = math.ceil(size / world_size)  # per rank and epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch``."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=g).tolist()
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
    """Seed torch's, numpy's and Python's global RNGs inside the block; restore them after (the
    caller's RNG streams stay untouched when samples load in the main process)."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    # The CPU generator only (what the transforms draw from): torch.manual_seed also seeds
    # every accelerator's generators, which cost time per sample and are not restored here.
    torch.default_generator.manual_seed(seed)
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
    # numpy and random follow the worker's torch seed (from the loader's generator); Ctrl-C is
    # left to the main process, which saves a checkpoint and shuts the workers down itself.
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
    collate_fn: Any = None,
) -> tuple[DataLoader, InfiniteSampler]:
    """An endless loader of augmented batches, positioned after ``start_samples`` samples
    (``collate_fn``: the DataLoader's, e.g. ``erfnet.data.fast.device_aug.collate``)."""
    size = len(dataset)  # type: ignore[arg-type]
    sampler = InfiniteSampler(
        size, seed=seed, rank=rank, world_size=world_size, start=start_samples
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
        collate_fn=collate_fn,
    )
    return loader, sampler


def seed_iteration(seed: int, rank: int, iteration: int) -> None:
    """Reseed torch (CPU and CUDA) for one iteration: dropout then depends only on these."""
    torch.manual_seed(mix_seed(seed, rank, iteration, 2))


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


def training_state(
    optimizer: torch.optim.Optimizer,
    scheduler: PolyLR,
    scaler: torch.amp.GradScaler,
    sampler: InfiniteSampler,
    consumed: int,
    args: Any,
) -> dict[str, Any]:
    """Everything ``--resume`` needs beside the weights, as checkpoint entries."""
    epoch, index = sampler.position(consumed)
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": get_rng_state(),
        "sampler": {
            "epoch": epoch,
            "index": index,
            "consumed": consumed,
            "world_size": sampler.world_size,
            "dataset_size": sampler.size,
            "seed": sampler.seed,
        },
        "args": settings_json(args),
    }


def resolve_resume(resume: str | None, work_dir: str | Path) -> Path | None:
    """``--resume`` without a path (``"latest"``) means ``latest.pth`` in the work dir."""
    if resume is None:
        return None
    if resume == "latest":
        path = Path(work_dir) / "latest.pth"
        if not path.is_file():
            raise CheckpointError(
                f"--resume: no latest.pth in the work dir {work_dir} (nothing to resume;"
                " drop --resume to start a new run, or pass a checkpoint path)"
            )
        return path
    if not Path(resume).is_file():
        raise CheckpointError(f"--resume {resume}: no such file")
    return Path(resume)


def load_training_checkpoint(path: Path) -> dict:
    """Read a checkpoint that --resume can continue from; a clear CheckpointError otherwise."""
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"--resume {path}: not a training checkpoint (it lacks {', '.join(missing)}); it holds"
            " weights only. Resume from latest.pth or an iter_<N>.pth of a work dir."
        )
    return ckpt


def check_model_fits(ckpt: dict, model: ERFNet, path: Path) -> None:
    """CheckpointError naming each model setting where the --resume checkpoint and ``model``
    differ."""
    saved = model_args(ckpt["model_args"])  # a file older than an argument has its default
    now = dict(model.config)
    if saved != now:
        detail = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs this run {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        )
        raise CheckpointError(
            f"--resume {path}: the checkpoint's model does not match this run ({detail})"
        )


def restore_training_state(
    ckpt: dict,
    optimizer: torch.optim.Optimizer,
    scheduler: PolyLR,
    scaler: torch.amp.GradScaler,
    args: Any,
    dataset_size: int,
    world_size: int,
) -> tuple[int, float, int]:
    """Load the optimizer, schedule, scaler and RNGs; returns (iteration, best mIoU, samples
    this rank consumed). Warns about settings that differ from the checkpoint's run."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scheduler.max_iters != args.iters:
        log.warning(
            "--iters %d differs from the checkpoint's %d: the poly schedule now ends at %d",
            args.iters,
            scheduler.max_iters,
            args.iters,
        )
        scheduler.set_max_iters(args.iters)
    saved = ckpt.get("args") or {}
    warn_changed_settings(saved, settings_json(args))
    for key in RESUME_KEPT:  # what the restored optimizer and schedule really use: the log
        if key in saved and hasattr(args, key):  # line and args.json must show the same
            setattr(args, key, saved[key])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    consumed = resume_position(ckpt["sampler"], dataset_size, world_size)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return int(ckpt["iteration"]), float(ckpt.get("best_miou", -1.0)), consumed


def warn_changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Say which settings differ from the checkpoint's run, and which of the two applies."""
    for keys, outcome in (
        (RESUME_KEPT, "the checkpoint's values are kept (optimizer and schedule state)"),
        (
            RESUME_NEW,
            "the new values apply from here on, so the run is no longer the one that was"
            " interrupted",
        ),
    ):
        changed = [
            f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}"
            for k in keys
            if k in saved and k in now and saved[k] != now[k]
        ]
        if changed:
            log.warning(
                "resume: %s differ from the checkpoint's run; %s", ", ".join(changed), outcome
            )


def resume_position(state: dict, dataset_size: int, world_size: int) -> int:
    """Samples this rank already consumed, from the checkpoint's sampler position."""
    num_samples = math.ceil(dataset_size / world_size)
    same = (
        int(state.get("world_size", 1)) == world_size
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
        world_size,
        dataset_size,
    )
    old_per_rank = math.ceil(
        int(state.get("dataset_size", dataset_size)) / max(1, int(state.get("world_size", 1)))
    )
    frac = int(state["index"]) / max(1, old_per_rank)
    return int(state["epoch"]) * num_samples + int(frac * num_samples)


def prune_checkpoints(work_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` iter_<N>.pth files (0 keeps all)."""
    if keep <= 0:
        return
    found = sorted(
        (int(p.stem.split("_", 1)[1]), p)
        for p in work_dir.glob("iter_*.pth")
        if p.stem.split("_", 1)[1].isdigit()
    )
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)
