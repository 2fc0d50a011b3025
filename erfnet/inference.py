"""Inference and evaluation as mmsegmentation tests this recipe; shared by eval.py and training.

- Whole image (the recipe's test mode): the normalised image is resized keeping its ratio to the
  test scale (mmcv's rescale rule, with mmseg's uint8 rounding: ``resize_image``), the logits
  are resized bilinearly (align_corners=False) to the original label size, argmax.
- Slide: overlapping crops (``RECIPE.slide_crop`` / ``RECIPE.slide_stride``) of the resized image,
  logits summed and divided by the number of crops covering each pixel (mmseg's slide_inference).
- ms+flip: every ratio of the test scale, with and without a horizontal flip; the softmax of each
  view's logits at the original size (flip undone) is summed in place; argmax.

``evaluate`` runs a loader through one of these and returns the metrics. Under torchrun each rank
takes a strided shard of the images (no padding duplicates) and the confusion matrix is summed,
so the result equals a single process's exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from erfnet.config import MEAN_RGB, RECIPE, STD_RGB
from erfnet.data.transforms import denormalize as _denormalize
from erfnet.data.transforms import rescale_size
from erfnet.distributed import all_reduce_sum
from erfnet.labels import TRAIN_ID_TO_COLOR, TRAIN_ID_TO_ID
from erfnet.metrics import ConfusionMatrix

MODES = ("whole", "slide")
Size = tuple[int, int]


# --------------------------------------------------------------------------------------------
# Sizes and resizing
# --------------------------------------------------------------------------------------------


def ratio_scale(scale: Sequence[int], ratio: float) -> Size:
    """The test scale multiplied by an ms ratio, truncated as mmseg's MultiScaleFlipAug does."""
    return int(scale[0] * ratio), int(scale[1] * ratio)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of an NCHW float tensor (align_corners=False); identity if already there."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a normalised NCHW image as mmseg resizes the uint8 one before normalising it:
    bilinear in 0-255 space, rounded to integers, clipped, normalised again."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    rgb = resize(image.float() * std + mean, size).round_().clamp_(0, 255)
    return rgb.sub_(mean).div_(std)


def adapt_normalization(model: nn.Module, meta: dict) -> nn.Module:
    """``model`` for inputs normalised with MEAN_RGB / STD_RGB (what ``resize_image`` and the
    dataset assume): a checkpoint trained with another mean/std (its ``meta``, e.g. erfnet_pytorch's
    0 / 255) gets its own normalisation back through one per-channel affine map."""
    mean, std = meta.get("mean", MEAN_RGB), meta.get("std", STD_RGB)
    if list(map(float, mean)) == list(MEAN_RGB) and list(map(float, std)) == list(STD_RGB):
        return model

    class Renormalized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.num_classes, self.meta = model, model.num_classes, meta
            # (x * STD + MEAN - mean) / std = x * a + b
            a = torch.tensor(STD_RGB, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
            b = (torch.tensor(MEAN_RGB) - torch.tensor(mean)) / torch.tensor(std)
            self.register_buffer("a", a.view(1, 3, 1, 1).float())
            self.register_buffer("b", b.view(1, 3, 1, 1).float())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x * self.a + self.b)

    p = next(model.parameters())
    return Renormalized().to(p.device).eval()


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------


def prefers_channels_last(model: nn.Module) -> bool:
    """True if the model's spatial conv weights are stored channels_last."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-1] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def forward_logits(
    model: nn.Module, x: torch.Tensor, *, amp: bool = False, channels_last: bool = False
) -> torch.Tensor:
    """``model(x)`` as float32 logits at x's size; fp16 autocast on CUDA when ``amp``."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp and x.device.type == "cuda"):
        out = model(x)
    return resize(out.float(), x.shape[-2:])


def slide_logits(
    model: nn.Module,
    x: torch.Tensor,
    *,
    crop: Sequence[int] = RECIPE.slide_crop,
    stride: Sequence[int] = RECIPE.slide_stride,
    amp: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """mmseg's slide_inference: overlapping crops clamped to the image, logits averaged."""
    crop_h, crop_w = int(crop[0]), int(crop[1])
    stride_h, stride_w = int(stride[0]), int(stride[1])
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"slide crop {tuple(crop)} and stride {tuple(stride)} must be positive")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(
            f"slide stride {tuple(stride)} larger than the crop {tuple(crop)} would leave pixels"
            " uncovered"
        )
    h, w = x.shape[-2:]
    h_grids = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
    out: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=x.device)
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * stride_h + crop_h, h)
            x2 = min(wi * stride_w + crop_w, w)
            y1 = max(y2 - crop_h, 0)
            x1 = max(x2 - crop_w, 0)
            logits = forward_logits(
                model, x[:, :, y1:y2, x1:x2], amp=amp, channels_last=channels_last
            )
            if out is None:
                out = logits.new_zeros((x.shape[0], logits.shape[1], h, w))
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    assert out is not None
    return out.div_(count)


def _view_logits(
    model: nn.Module,
    x: torch.Tensor,
    mode: str,
    amp: bool,
    channels_last: bool,
    crop: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    if mode == "whole":
        return forward_logits(model, x, amp=amp, channels_last=channels_last)
    return slide_logits(model, x, crop=crop, stride=stride, amp=amp, channels_last=channels_last)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@torch.inference_mode()
def infer_logits(
    model: nn.Module,
    image: torch.Tensor,
    out_size: Sequence[int] | None = None,
    *,
    test_scale: Sequence[int] = RECIPE.test_scale,
    mode: str = "whole",
    amp: bool = False,
    channels_last: bool | None = None,
    slide_crop: Sequence[int] = RECIPE.slide_crop,
    slide_stride: Sequence[int] = RECIPE.slide_stride,
) -> torch.Tensor:
    """Single-scale logits [N, C, *out_size] for a normalised image batch [N, 3, h, w].

    ``out_size`` is the original (label) size, default the image's own; the network input is that
    size rescaled to ``test_scale`` keeping the ratio.
    """
    _check_mode(mode)
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[-2:])
    if channels_last is None:
        channels_last = prefers_channels_last(model)
    x = resize_image(image, rescale_size(out_size, test_scale))
    logits = _view_logits(model, x, mode, amp, channels_last, slide_crop, slide_stride)
    return resize(logits, out_size)


@torch.inference_mode()
def infer_probs_ms_flip(
    model: nn.Module,
    image: torch.Tensor,
    out_size: Sequence[int] | None = None,
    *,
    ratios: Sequence[float] = RECIPE.ms_flip_ratios,
    flip: bool = True,
    test_scale: Sequence[int] = RECIPE.test_scale,
    mode: str = "whole",
    amp: bool = False,
    channels_last: bool | None = None,
    slide_crop: Sequence[int] = RECIPE.slide_crop,
    slide_stride: Sequence[int] = RECIPE.slide_stride,
) -> torch.Tensor:
    """Mean softmax [N, C, *out_size] over ``ratios`` x (no flip, flip) views (mmseg aug_test).

    Each view's logits are resized to the original size, softmaxed and un-flipped, then added in
    place to one accumulator, so peak memory is a few full-size maps whatever the view count.
    """
    _check_mode(mode)
    if not ratios:
        raise ValueError("ms+flip needs at least one ratio")
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[-2:])
    if channels_last is None:
        channels_last = prefers_channels_last(model)
    acc: torch.Tensor | None = None
    for r in ratios:
        if not r > 0:
            raise ValueError(f"scale ratios must be positive, got {r}")
        x = resize_image(image, rescale_size(out_size, ratio_scale(test_scale, r)))
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            logits = _view_logits(model, xi, mode, amp, channels_last, slide_crop, slide_stride)
            logits = resize(logits, out_size)
            if flipped:
                logits = logits.flip(-1)
            probs = torch.softmax(logits, dim=1)
            del logits
            if acc is None:
                acc = probs
            else:
                acc.add_(probs)
            del probs
    assert acc is not None
    return acc.div_(len(ratios) * (2 if flip else 1))


@torch.inference_mode()
def predict(
    model: nn.Module,
    image: torch.Tensor,
    out_size: Sequence[int] | None = None,
    *,
    ms_flip: bool = False,
    scales: Sequence[float] | None = None,
    mode: str = "whole",
    test_scale: Sequence[int] = RECIPE.test_scale,
    amp: bool = False,
    channels_last: bool | None = None,
    slide_crop: Sequence[int] = RECIPE.slide_crop,
    slide_stride: Sequence[int] = RECIPE.slide_stride,
) -> torch.Tensor:
    """Class map [N, *out_size] (int64) for a normalised image batch [N, 3, h, w].

    Images are normalised with MEAN_RGB / STD_RGB (the resizing assumes it); a model trained
    with another mean / std (its ``meta``) is wrapped with ``adapt_normalization`` first.
    """
    kw = dict(
        test_scale=test_scale,
        mode=mode,
        amp=amp,
        channels_last=channels_last,
        slide_crop=slide_crop,
        slide_stride=slide_stride,
    )
    if ms_flip:
        ratios = RECIPE.ms_flip_ratios if scales is None else scales
        return infer_probs_ms_flip(model, image, out_size, ratios=ratios, **kw).argmax(1)
    if scales is not None:
        raise ValueError("scales are the ms+flip ratios: pass ms_flip=True with them")
    return infer_logits(model, image, out_size, **kw).argmax(1)


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
            " erfnet.inference.build_eval_loader)"
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
# Writers
# --------------------------------------------------------------------------------------------


def save_label_ids(pred: np.ndarray, out_dir: str | Path, city: str, name: str) -> Path:
    """Official submission PNG: trainIds -> label ids, ``<out>/<city>/<name>_leftImg8bit.png``."""
    path = Path(out_dir) / city / f"{name}_leftImg8bit.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(TRAIN_ID_TO_ID[pred]).save(path)
    return path


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] float tensor back to an HxWx3 uint8 RGB array."""
    rgb = _denormalize(image.detach().float().cpu())
    return rgb.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_color(
    pred: np.ndarray, image: np.ndarray | None, out_dir: str | Path, city: str, name: str
) -> Path:
    """Cityscapes colours as ``<name>_color.png`` and, given the RGB image, ``<name>_blend.png``."""
    folder = Path(out_dir) / city
    folder.mkdir(parents=True, exist_ok=True)
    color = TRAIN_ID_TO_COLOR[pred]
    Image.fromarray(color).save(folder / f"{name}_color.png")
    if image is not None:
        blend = (0.5 * image.astype(np.float32) + 0.5 * color.astype(np.float32)).round()
        Image.fromarray(blend.astype(np.uint8)).save(folder / f"{name}_blend.png")
    return folder / f"{name}_color.png"


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


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device,
    *,
    num_classes: int,
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
) -> dict | None:
    """Run ``loader`` (batches of dataset dicts) through ``model`` and return the metrics.

    The returned dict is ``ConfusionMatrix.compute()``'s plus ``num_images``; ``None`` when the
    split has no labels (predictions are still written to ``out_dir`` / ``color_dir``). Under
    torchrun every rank must call this; the loader is sharded per rank if it is not already.
    The model is put in eval mode and its previous mode restored afterwards.
    """
    _check_mode(mode)
    if scales is not None and not ms_flip:
        raise ValueError("scales are the ms+flip ratios: pass ms_flip=True with them")
    device = torch.device(device)
    net = _unwrap_ddp(model)
    model_classes = getattr(net, "num_classes", None) or num_classes
    void_class = getattr(net, "meta", {}).get("void_class")
    # A trailing "void" output (erfnet_pytorch's class 19) is predicted but never scored.
    if model_classes != num_classes and not (
        model_classes == num_classes + 1 and void_class == num_classes
    ):
        raise ValueError(f"the model predicts {model_classes} classes, expected {num_classes}")
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
                from tqdm import tqdm

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
                )
                num_images += image.shape[0]
                if "label" in batch:
                    label = batch["label"].to(device, non_blocking=True)
                    cm.update(pred, label)
                    num_labelled += image.shape[0]
                if out_dir is not None or color_dir is not None:
                    _write(pred, batch, image, size, out_dir, color_dir)
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
) -> None:
    preds = pred.to("cpu", torch.uint8).numpy()
    names, cities = batch["name"], batch["city"]
    for i in range(preds.shape[0]):
        if out_dir is not None:
            save_label_ids(preds[i], out_dir, cities[i], names[i])
        if color_dir is not None:
            rgb = denormalize(resize_image(image[i : i + 1], size)[0])
            save_color(preds[i], rgb, color_dir, cities[i], names[i])


__all__ = [
    "MODES",
    "adapt_normalization",
    "ShardSampler",
    "build_eval_loader",
    "denormalize",
    "evaluate",
    "forward_logits",
    "infer_logits",
    "infer_probs_ms_flip",
    "predict",
    "rank_and_world",
    "rescale_size",
    "resize",
    "resize_image",
    "save_color",
    "save_label_ids",
    "slide_logits",
]
