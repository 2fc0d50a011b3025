"""``evaluate``: a loader through ``erfnet.evaluation.inference.predict``, scored as mmseg does.

The metric is a dataset-wide confusion matrix (``erfnet.evaluation.metrics``). Under torchrun each
rank takes a strided shard of the images (no padding duplicates) and the matrices are summed, so the
result equals a single process's exactly. Predictions can be written as the Cityscapes
test-server PNGs and as colour renderings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from erfnet.config import RECIPE
from erfnet.data.cityscapes import save_label_ids
from erfnet.data.transforms import resize_image
from erfnet.distributed import all_reduce_sum
from erfnet.evaluation.inference import (
    MODES,
    Size,
    Stats,
    model_stats,
    predict,
    prefers_channels_last,
)
from erfnet.evaluation.metrics import ConfusionMatrix
from erfnet.evaluation.visualize import Palette, palette_lut, rgb_array, save_color
from erfnet.labels import CLASS_NAMES

# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every image exactly once over all ranks (no padding,
    unlike DistributedSampler), so summed metrics equal a single process's."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_eval_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    workers: int = 2,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A loader over this rank's shard of ``dataset`` (the whole dataset when not distributed)."""
    rank, world = rank_and_world()
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def _sharded(loader: DataLoader) -> DataLoader:
    """Under DDP, a loader that is not already a ShardSampler loader is rebuilt as one, so that
    no image is counted twice (DistributedSampler pads) or on every rank."""
    rank, world = rank_and_world()
    if world == 1 or isinstance(loader.sampler, ShardSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError(
            "evaluate under torchrun needs a DataLoader with batch_size set (or one built by"
            " erfnet.evaluation.inference.build_eval_loader)"
        )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(len(loader.dataset), rank, world),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _out_size(batch: dict, image: torch.Tensor) -> Size:
    """The original size: the label's, else the batch's ``ori_size``, else the image's."""
    if "label" in batch:
        return tuple(batch["label"].shape[-2:])
    size = batch.get("ori_size")
    if size is not None:
        size = torch.as_tensor(size).reshape(-1, 2)
        if not bool((size == size[0]).all()):
            raise ValueError("images of different original sizes in one batch: use batch size 1")
        return int(size[0, 0]), int(size[0, 1])
    return tuple(image.shape[-2:])


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    # DDP's forward may broadcast buffers, a collective that would hang when ranks hold different
    # image counts; evaluation needs none of it.
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _dataset_attr(loader: DataLoader, name: str) -> object:
    return getattr(getattr(loader, "dataset", None), name, None)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device,
    *,
    num_classes: int | None = None,
    ms_flip: bool = False,
    scales: Sequence[float] | None = None,
    mode: str = "whole",
    test_scale: Sequence[int] = RECIPE.test_scale,
    amp: bool = False,
    out_dir: str | Path | None = None,
    color_dir: str | Path | None = None,
    progress: bool = True,
    slide_crop: Sequence[int] = RECIPE.slide_crop,
    slide_stride: Sequence[int] = RECIPE.slide_stride,
    mean: Stats | None = None,
    std: Stats | None = None,
    palette: Palette | None = None,
) -> dict | None:
    """Run ``loader`` (batches of dataset dicts) through ``model`` and return the metrics.

    Batches hold ``image`` on the 0-255 scale (uint8 from ``EvalTransform``; the original image
    for ms+flip), ``label`` at the original size, ``name`` and ``city``. ``num_classes`` is the
    number of scored classes, default ``len(loader.dataset.classes)``, else the model's; a model
    with one more output whose ``meta["void_class"]`` is that last index (erfnet_pytorch) is
    scored on the others. ``mean`` / ``std`` default to the model's (``model_normalization``),
    ``palette`` (for ``color_dir``) to ``model.meta["palette"]``, else the dataset's.
    ``out_dir`` gets the Cityscapes test-server PNGs (label ids).

    The returned dict is ``ConfusionMatrix.compute()``'s plus ``num_images``; ``None`` when the
    split has no labels (predictions are still written to ``out_dir`` / ``color_dir``). Under
    torchrun every rank must call this; the loader is sharded per rank if it is not already.
    The model is put in eval mode and its previous mode restored afterwards.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scales is not None and not ms_flip:
        raise ValueError("scales are the ms+flip ratios: pass ms_flip=True with them")
    device = torch.device(device)
    net = _unwrap_ddp(model)
    meta = getattr(net, "meta", None) or {}
    if num_classes is None:
        classes = _dataset_attr(loader, "classes")
        num_classes = len(classes) if classes is not None else getattr(net, "num_classes", None)
        if num_classes is None:
            raise ValueError("pass num_classes: neither the dataset nor the model has classes")
    model_classes = getattr(net, "num_classes", None) or num_classes
    # A trailing "void" output (erfnet_pytorch's class 19) is predicted but never scored.
    if model_classes != num_classes and not (
        model_classes == num_classes + 1 and meta.get("void_class") == num_classes
    ):
        raise ValueError(f"the model predicts {model_classes} classes, expected {num_classes}")
    mean, std = model_stats(net, mean, std)
    lut = None
    if color_dir is not None:
        if palette is None:
            palette = meta.get("palette") or _dataset_attr(loader, "palette")
        if palette is None or len(palette) == 0:
            raise ValueError("color_dir needs a palette: pass palette= (one RGB per class)")
        lut = palette_lut(palette)
    if out_dir is not None:  # the test server's PNGs map Cityscapes' 19 train ids to label ids
        classes = _dataset_attr(loader, "classes")
        if classes is not None and tuple(classes) != tuple(CLASS_NAMES):
            raise ValueError(
                "out_dir writes the Cityscapes test server's label-id PNGs, but this dataset's"
                f" classes are not Cityscapes' ({len(classes)} classes: {list(classes)[:3]} ...);"
                " write colour renderings (color_dir / --save-color) instead"
            )
    was_training = net.training
    net.eval()
    loader = _sharded(loader)
    rank, _ = rank_and_world()
    channels_last = prefers_channels_last(net)
    try:
        with torch.inference_mode():
            cm = ConfusionMatrix(model_classes, device)
            num_images = num_labelled = 0
            batches = loader
            if progress and rank == 0:
                batches = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True)
            for batch in batches:
                image = batch["image"].to(device, non_blocking=True)
                size = _out_size(batch, image)
                pred = predict(
                    net,
                    image,
                    size,
                    ms_flip=ms_flip,
                    scales=scales,
                    mode=mode,
                    test_scale=test_scale,
                    amp=amp,
                    channels_last=channels_last,
                    slide_crop=slide_crop,
                    slide_stride=slide_stride,
                    mean=mean,
                    std=std,
                )
                num_images += image.shape[0]
                if "label" in batch:
                    label = batch["label"].to(device, non_blocking=True)
                    cm.update(pred, label)
                    num_labelled += image.shape[0]
                if out_dir is not None or lut is not None:
                    _write(pred, batch, image, size, out_dir, color_dir, lut)
            all_reduce_sum(cm.mat)
            seen = torch.tensor([num_images, num_labelled], dtype=torch.int64, device=device)
            num_images, num_labelled = all_reduce_sum(seen).tolist()
            has_labels = num_labelled > 0
            if has_labels and num_labelled != num_images:
                raise ValueError(
                    f"only {num_labelled} of {num_images} images have labels; cannot score a"
                    " partly labelled split"
                )
            results = cm.compute(num_classes) if has_labels else None
            if results is not None:  # label rows x prediction columns, for the reports
                results["confusion_matrix"] = cm.mat[:num_classes].cpu()
    finally:
        net.train(was_training)
    if results is not None:
        results["num_images"] = num_images
    return results


def _write(
    pred: torch.Tensor,
    batch: dict,
    image: torch.Tensor,
    size: Size,
    out_dir: str | Path | None,
    color_dir: str | Path | None,
    lut: np.ndarray | None,
) -> None:
    preds = pred.to("cpu", torch.uint8).numpy()
    names, cities = batch["name"], batch["city"]
    for i in range(preds.shape[0]):
        if out_dir is not None:
            save_label_ids(preds[i], out_dir, cities[i], names[i])
        if color_dir is not None and lut is not None:
            rgb = rgb_array(resize_image(image[i], size))  # the image at the prediction's size
            save_color(preds[i], rgb, color_dir, cities[i], names[i], palette=lut)


__all__ = ["ShardSampler", "build_eval_loader", "evaluate", "rank_and_world"]
