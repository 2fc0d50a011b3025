"""Where the training loader's time goes (``scripts/benchmark.py --sections data``).

- ``time_stages``: seconds per image of each stage of a loader worker (seeding, decode, draw,
  resize/crop, photometric, normalise, collate) and of the main process (pin, host to device,
  device-side augmentation), one image at a time with one torch thread, as in a worker;
- ``time_paths``: images/s of one worker for each data path (PNG or decoded cache, augmentation
  in the worker or on the device), measured side by side in interleaved rounds;
- ``time_loader``: images/s of the real training loader (``build_train_loader``) with N workers;
- ``time_step`` and ``project_recipe``: the step alone, and the full recipe's wall time from
  the measured step and data rates (whichever is slower bounds it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import default_collate

from erfnet.bench.measure import sync, torch_threads
from erfnet.config import IGNORE_INDEX, RECIPE
from erfnet.data.cityscapes import CityscapesDataset, load_image, load_label
from erfnet.data.fast import device_aug
from erfnet.data.transforms import normalize, pad_to, resize_crop_bilinear, resize_crop_nearest
from erfnet.model import ERFNet
from erfnet.training.resume import SeededDataset, build_train_loader, mix_seed, seeded_rngs
from erfnet.training.step import train_step

# Stages of each path, for one worker; the main-process stages are listed separately.
_PNG = ("seeding", "decode image", "decode label")
_CACHE = ("seeding", "read cache")
_RESIZE = ("resize/crop image", "resize/crop label")
_WORKER_AUG = ("draw", *_RESIZE, "photometric", "normalise + pad", "collate")
_GPU_AUG = ("draw + taps", "collate decoded")
PATHS: dict[str, tuple[str, ...]] = {
    "PNG + worker aug": _PNG + _WORKER_AUG,
    "cache + worker aug": _CACHE + _WORKER_AUG,
    "PNG + gpu-aug": _PNG + _GPU_AUG,
    "cache + gpu-aug": _CACHE + _GPU_AUG,
}


def time_stages(
    dataset: CityscapesDataset,
    cached: CityscapesDataset | None,
    *,
    batch: int,
    device: torch.device,
    num: int = 8,
    threads: int | None = 1,
) -> dict[str, float]:
    """Median seconds per image of every stage (see ``PATHS``), plus "pin", "host to device"
    and "device aug" (per image of a ``batch``) where they apply. ``dataset.transform`` must be
    a ``TrainTransform``; ``cached`` (the same split from a decoded cache) adds "read cache"."""
    tf = dataset.transform
    times: dict[str, list[float]] = {}
    worker, decoded = [], []

    @contextmanager
    def clock(name: str, per: int = 1) -> Iterator[None]:
        t = time.perf_counter()
        yield
        sync(device)
        times.setdefault(name, []).append((time.perf_counter() - t) / per)

    with torch_threads(threads):
        for k in range(num):
            i = k % len(dataset)
            s = dataset.samples[i]
            # What SeededDataset adds to every sample (save, seed, restore), timed alone.
            with clock("seeding"), seeded_rngs(mix_seed(0, k)):
                pass
            with seeded_rngs(mix_seed(0, k)):  # the real seeding, untimed: same draws below
                with clock("decode image"):
                    image = load_image(s.image)
                with clock("decode label"):
                    label = load_label(s.label, s.label_kind)
                if cached is not None:
                    with clock("read cache"):  # the pair as collate copies it: every page
                        [t.clone() for t in cached.load(i)]
                state = torch.get_rng_state()
                with clock("draw"):
                    p = tf.draw(label)
                with clock("resize/crop image"):
                    img = resize_crop_bilinear(image, p["size"], p["box"], p["flip"])
                with clock("resize/crop label"):
                    lab = resize_crop_nearest(label, p["size"], p["box"], p["flip"])
                if tf.photometric is not None:
                    with clock("photometric"):
                        img = tf.photometric.apply(img, p["photometric"])
                with clock("normalise + pad"):
                    img, lab = pad_to(normalize(img, tf.mean, tf.std), lab, tf.crop_size)
                    lab = lab.long()
                worker.append({"image": img, "label": lab})
                torch.set_rng_state(state)  # the device path draws the same choices
                with clock("draw + taps"):
                    params = device_aug.draw_params(tf, label)
                decoded.append({"image": image, "label": label, **params})
        for start in range(0, num - batch + 1, batch):
            with clock("collate", batch):
                default_collate(worker[start : start + batch])
            with clock("collate decoded", batch):
                b = device_aug.collate(decoded[start : start + batch])
            if device.type == "cuda":
                with clock("pin", batch):
                    b = {k: v.pin_memory() for k, v in b.items()}
                with clock("host to device", batch):
                    {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with clock("device aug", batch):
                device_aug.DeviceAugment(tf)(b, device)
    return {name: statistics.median(ts) for name, ts in times.items()}


def path_rates(stages: dict[str, float]) -> dict[str, float]:
    """Images/s of one worker per path, from the stage medians."""
    return {
        path: 1.0 / sum(stages[s] for s in names)
        for path, names in PATHS.items()
        if all(s in stages for s in names)
    }


def _path_dataset(path: str, png: CityscapesDataset, cached: CityscapesDataset | None) -> Any:
    ds = cached if path.startswith("cache") else png
    return device_aug.DeviceAugDataset(ds) if path.endswith("gpu-aug") else ds


def time_paths(
    png: CityscapesDataset,
    cached: CityscapesDataset | None,
    *,
    rounds: int = 6,
    threads: int | None = 1,
) -> dict[str, float]:
    """Images/s of one worker (one sample, seeded and collated, as a worker loads it) per path,
    from the median of ``rounds`` interleaved rounds (one sample of every path per round)."""
    sets = {
        p: SeededDataset(_path_dataset(p, png, cached))
        for p in PATHS
        if cached is not None or not p.startswith("cache")
    }
    times: dict[str, list[float]] = {p: [] for p in sets}
    with torch_threads(threads):
        for r in range(rounds + 1):
            key = (r % len(png), mix_seed(1, r))
            for p, ds in sets.items():
                collate = device_aug.collate if p.endswith("gpu-aug") else default_collate
                t = time.perf_counter()
                collate([ds[key]])  # the copy a worker makes of a mapped or decoded pair
                if r:  # the first round warms up
                    times[p].append(time.perf_counter() - t)
    return {p: 1.0 / statistics.median(ts) for p, ts in times.items()}


def time_loader(
    path: str,
    png: CityscapesDataset,
    cached: CityscapesDataset | None,
    *,
    workers: int,
    batch: int,
    batches: int,
    device: torch.device,
) -> float:
    """Images/s that ``build_train_loader`` delivers with ``workers`` workers (steady state), up
    to the device (pinned and uploaded on CUDA). The device-side augmentation of the gpu-aug
    paths is not included: it belongs to the step (``time_stages``' "device aug")."""
    loader, _ = build_train_loader(
        _path_dataset(path, png, cached),
        batch_size=batch,
        workers=workers,
        seed=0,
        pin_memory=device.type == "cuda",
        collate_fn=device_aug.collate if path.endswith("gpu-aug") else None,
    )
    it = iter(loader)
    try:
        # Drain what the workers prefetched at the start (2 batches each), then time the
        # steady state: every batch timed was produced while timing.
        for _ in range(2 * workers + 1):
            next(it)
        batches = max(batches, 2 * workers)
        t = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            for key in ("image", "label"):
                b[key].to(device, non_blocking=True)
            sync(device)
        return batches * batch / (time.perf_counter() - t)
    finally:
        del it  # shuts the workers down


def time_step(device: torch.device, batch: int, size: tuple[int, int], repeats: int = 3) -> float:
    """Median seconds of one training iteration of ERFNet at ``batch`` x ``size``, as train.py
    runs it (channels_last; fp16 autocast + GradScaler on CUDA), on data already on the device."""
    torch.manual_seed(0)
    model = ERFNet().to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 19, (batch, *size), device=device)
    y[:, :4] = IGNORE_INDEX
    times = []
    for r in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        train_step(model, x, y, opt, scaler, autocast_dtype=torch.float16 if cuda else None)
        sync(device)
        if r:  # the first is the warm-up (cudnn.benchmark, allocator)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def project_recipe(
    step_s: float,
    step_batch: int,
    data_rates: dict[str, float],
    device_aug_s: float = 0.0,
    iters: int = RECIPE.iters,
    batch: int = 16,
) -> list[dict[str, Any]]:
    """The recipe's wall time (``iters`` x ``batch`` images) per data path: each iteration
    takes the slower of the step (``step_s`` at ``step_batch``, scaled linearly to ``batch``,
    plus ``device_aug_s`` per image on the gpu-aug paths) and the data (``batch`` / the path's
    images/s), as when loading overlaps the step perfectly."""
    rows = []
    for path, rate in data_rates.items():
        step = step_s * batch / step_batch + (device_aug_s * batch if "gpu-aug" in path else 0)
        data = batch / rate
        it = max(step, data)
        rows.append(
            {
                "path": path,
                "data_images_per_s": rate,
                "step_s": step,
                "data_s": data,
                "iteration_s": it,
                "recipe_hours": iters * it / 3600,
                "bound": "data" if data > step else "step",
                "stall_share": max(0.0, data - step) / it,
            }
        )
    return rows


def time_pipeline(
    dataset: CityscapesDataset, num: int = 20, warmup: int = 2, threads: int | None = 1
) -> dict[str, float]:
    """Time ``dataset[i]`` (decode + labels + transform) in this process, like one DataLoader
    worker (``threads=1`` matches a worker's single torch thread): images/s from the median
    (the better figure on a shared machine) and the mean time per image, and the median
    seconds of the two stages, load (PNG decode + label mapping and checks) and transform."""
    n, loads, tfs = len(dataset), [], []
    with torch_threads(threads):
        for i in range(warmup):
            dataset[i % n]
        for i in range(num):
            t0 = time.perf_counter()
            image, label = dataset.load(i % n)
            t1 = time.perf_counter()
            dataset.transform(image, label)
            loads.append(t1 - t0)
            tfs.append(time.perf_counter() - t1)
    totals = [a + b for a, b in zip(loads, tfs, strict=True)]
    return {
        "images_per_s": 1.0 / statistics.median(totals),
        "images_per_s_mean": num / sum(totals),
        "load_s": statistics.median(loads),
        "transform_s": statistics.median(tfs),
    }
