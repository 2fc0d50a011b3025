"""The data a run needs before its first iteration, made and checked by rank 0 while the others
wait: the synthetic set on first use, every image and label header (not the first bad file hours
from now), and every val image large enough for the model at --scale."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import Dataset

from erfnet.data.check import check_datasets, image_header
from erfnet.data.cityscapes import DatasetError
from erfnet.data.synthetic import ensure_synthetic_cityscapes
from erfnet.data.transforms import rescale_size
from erfnet.distributed import DistInfo
from erfnet.training.logs import log
from erfnet.training.process import StopFlag

MIN_SIDE = 8  # pixels: the smallest image side the model takes (1 pixel at 1/8)


def make_synthetic(root: Path) -> None:
    """Create the synthetic dataset at ``root`` unless it is there; a DatasetError if it cannot."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"--data-root '{root}' exists and is not a folder")
    try:
        if not (root.exists() and any(root.iterdir())):
            log.info("creating the synthetic dataset in %s", root)
        ensure_synthetic_cityscapes(root)
    except OSError as e:
        raise DatasetError(f"cannot create the synthetic dataset in '{root}': {e}") from None


def check_data(
    args: Namespace, train_set: Dataset, val_set: Dataset, dist_info: DistInfo, stop: StopFlag
) -> None:
    """The headers and val sizes, unless --skip-data-check (a stop signal ends it at once). A
    --data-cache run never reads the train PNGs: the cache's own check covers it."""
    if args.skip_data_check:
        return
    splits = {"val": val_set} if args.data_cache else {"train": train_set, "val": val_set}

    def check() -> None:
        checked = check_datasets(splits, args.progress)
        check_val_sizes(val_set, tuple(args.scale))
        shown = (
            f"{k} {'skipped (no samples list)' if n is None else f'{n} files ok'}"
            for k, n in checked.items()
        )
        log.info("data check: %s", ", ".join(shown))

    with stop.interruptible():
        on_rank0(check, dist_info)


def check_val_sizes(val_set: Dataset, scale: tuple[int, int]) -> None:
    """DatasetError naming the val images that validation at ``scale`` would shrink below
    ``MIN_SIDE`` pixels on a side (the model's 1/8 bottleneck needs at least one pixel)."""
    small = []
    for sample in getattr(val_set, "samples", []):
        size, _ = image_header(Path(sample.image))
        h, w = rescale_size(size, scale)
        if min(h, w) < MIN_SIDE:
            small.append(f"'{sample.image}' ({size[0]}x{size[1]} -> {h}x{w})")
    if small:
        shown = ", ".join(small[:3]) + (f" and {len(small) - 3} more" if len(small) > 3 else "")
        raise DatasetError(
            f"{len(small)} val image(s) would be smaller than {MIN_SIDE} pixels on a side when"
            f" validation resizes them to fit --scale {scale[0]} {scale[1]}: {shown}; raise"
            " --scale or remove them"
        )


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
