"""``scripts/benchmark.py --sections data``: the tables of the data path (one worker per split,
the worker's stages, the paths side by side, the loader's scaling) and the recipe's projected
wall time, from ``erfnet.bench.data_throughput``'s measurements."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erfnet.bench import data_throughput as throughput
from erfnet.bench import measure
from erfnet.config import RECIPE
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.data.fast.cache import CachedCityscapesDataset, write_cache
from erfnet.data.synthetic import make_synthetic_cityscapes
from erfnet.data.transforms import EvalTransform, TrainTransform


def section_data(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The data path: images/s of one loader worker (train and val), the train worker's time
    per stage, images/s per path (PNG or decoded cache; augmentation in the worker or on the
    device) for one worker and for the real loader with 1, 2, 4, ... workers, and the full
    recipe's projected wall time from the measured step and data rates."""
    (h, w), n, rows = ((128, 256) if args.quick else (1024, 2048)), args.data_images, []
    if args.quick:
        tfs = {
            "train": TrainTransform(crop_size=(h // 2, w // 2), scale=(h, w)),
            "val": EvalTransform(scale=(h, w)),
        }
    else:
        tfs = {"train": TrainTransform(), "val": EvalTransform()}
    with tempfile.TemporaryDirectory(prefix="erfnet_bench_") as tmp:
        made = args.data or f"synthetic {n}+{n} images at {h}x{w} (HxW)"
        root = Path(args.data or Path(tmp) / "cityscapes")
        if not args.data:
            make_synthetic_cityscapes(root, train=n, val=n, test=0, size=(h, w), extras=False)
        for split, tf in tfs.items():
            torch.manual_seed(0)
            dataset = CityscapesDataset(root, split, transform=tf)
            res = throughput.time_pipeline(dataset, num=3 if args.quick else 8, warmup=1)
            rows.append(
                {
                    "split": split,
                    "transform": repr(tf),
                    "dataset": made,
                    **res,
                    "transform_name": type(tf).__name__,
                }
            )
        measure.show(
            f"Data pipeline, one worker (1 torch thread): {made}",
            rows,
            "split | images/s=images_per_s | load s=load_s | transform s=transform_s | "
            "transform=transform_name",
        )
        png = CityscapesDataset(root, "train", transform=tfs["train"])
        cache = write_cache(root, Path(tmp) / "cache", "train", progress=False)["folder"]
        cached = CachedCityscapesDataset(root, "train", Path(cache).parent, png.transform)
        return {"data": rows, **data_paths(args, png, cached, made)}


def data_paths(
    args: argparse.Namespace, png: CityscapesDataset, cached: CityscapesDataset, made: str
) -> dict[str, Any]:
    """section_data's stage table, per-path rates and loader scaling, then the projection."""
    device, quick = args.device, args.quick
    batch = args.data_batch or (16 if device.type == "cuda" else 2 if quick else 4)
    num = 2 * batch if quick else max(8, 2 * batch)
    stages = throughput.time_stages(png, cached, batch=batch, device=device, num=num)
    where = {"pin": "main", "host to device": "main", "device aug": str(device)}
    stage_rows = [
        {
            "stage": k,
            "where": where.get(k, "worker"),
            "ms_per_image": v * 1e3,
            "paths": ", ".join(p for p, names in throughput.PATHS.items() if k in names),
        }
        for k, v in stages.items()
    ]
    measure.show(
        f"Train data path per stage, median ms per image (1 torch thread; collate, pin, upload "
        f"and device aug per image of batch {batch}): {made}",
        stage_rows,
        "stage | where | ms/image=ms_per_image | paths",
    )
    measured = throughput.time_paths(png, cached, rounds=2 if quick else 6)
    from_stages = throughput.path_rates(stages)
    path_rows = [
        {
            "path": p,
            "worker_images_per_s": r,
            "from_stages": from_stages.get(p),
            "speedup": r / measured["PNG + worker aug"],
        }
        for p, r in measured.items()
    ]
    measure.show(
        "One worker per path (images/s, side by side; 'from stages' = 1 / sum of its stages)",
        path_rows,
        "path | img/s=worker_images_per_s | from stages=from_stages | vs today={speedup:.2f}x",
    )
    counts = args.data_workers or [k for k in (1, 2, 4, 8, 16, 32) if k <= (os.cpu_count() or 1)]
    loader_rows, batches = [], 2 if quick else 4
    for workers in counts:
        for path in throughput.PATHS:
            rate = throughput.time_loader(
                path, png, cached, workers=workers, batch=batch, batches=batches, device=device
            )
            loader_rows.append(
                {
                    "path": path,
                    "workers": workers,
                    "images_per_s": rate,
                    "per_worker": rate / workers,
                    "efficiency": rate / workers / measured[path],
                }
            )
    measure.show(
        f"Training loader (build_train_loader, batch {batch}; without the device aug)",
        loader_rows,
        "path | workers | img/s=images_per_s | img/s per worker=per_worker | of 1-worker rate="
        "{efficiency:.0%}",
    )
    best = {p: max(r["images_per_s"] for r in loader_rows if r["path"] == p) for p in measured}
    out = {"data_stages": stage_rows, "data_paths": path_rows, "data_loader": loader_rows}
    return out | recipe_projection(args, stages["device aug"], measured, best)


def recipe_projection(
    args: argparse.Namespace, device_aug_s: float, per_worker: dict, best: dict
) -> dict[str, Any]:
    """The recipe's wall time per data path from a measured step and the best loader rates."""
    device, cuda, quick = args.device, args.device.type == "cuda", args.quick
    step_batch = args.data_step_batch or (16 if cuda else 1)
    size = (64, 128) if quick else RECIPE.crop_size
    step_s = throughput.time_step(device, step_batch, size, repeats=2 if quick or not cuda else 10)
    projection = throughput.project_recipe(step_s, step_batch, best, device_aug_s)
    for r in projection:  # workers of one worker's rate that keep the step fed, if they scaled
        r["workers_to_feed"] = math.ceil(step_batch / step_s / per_worker[r["path"]])
    measure.show(
        f"Projected recipe ({RECIPE.iters} iterations x 16 images, {size[0]}x{size[1]}) on "
        f"{device}: step {step_s:.3f} s at batch {step_batch}"
        f"{' (fp16 AMP)' if cuda else ''} (+ device aug per image on the gpu-aug paths), data "
        "at the best loader rate above",
        projection,
        "path | data img/s=data_images_per_s | step s/it=step_s | data s/it=data_s | hours="
        "recipe_hours | bound | stall={stall_share:.0%} | workers to feed=workers_to_feed",
    )
    recipe = dict(step_s=step_s, step_batch=step_batch, step_size=list(size), rows=projection)
    return {"recipe_projection": recipe}
