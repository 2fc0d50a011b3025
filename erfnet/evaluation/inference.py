"""Inference and evaluation as mmsegmentation tests this recipe; shared by eval.py and training.

Images come in on the 0-255 scale ([N, 3, H, W], uint8 or float): each network input ("view") is
resized there (``resize_image``: bilinear, rounded, as mmseg resizes the uint8 image) and then
normalised once with the model's own statistics (``model.meta["mean"]`` / ``["std"]``, default
the ImageNet ones of ``erfnet.config``), so a checkpoint trained with another normalisation
(erfnet_pytorch's mean 0 / std 255) needs nothing extra.

- Whole image (the recipe's test mode): the image is resized keeping its ratio to the test scale
  (mmcv's rescale rule), the logits are resized bilinearly (align_corners=False) to the original
  label size, argmax.
- Slide: overlapping crops (``RECIPE.slide_crop`` / ``RECIPE.slide_stride``) of the resized image,
  logits summed and divided by the number of crops covering each pixel (mmseg's slide_inference).
- ms+flip: every ratio of the test scale, each view resized from the original image, with and
  without a horizontal flip; the softmax of each view's logits at the original size (flip
  undone) is summed in place; argmax.

``erfnet.evaluation.evaluate.evaluate`` runs a loader through ``predict`` and returns the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from erfnet.config import MEAN_RGB, RECIPE, STD_RGB
from erfnet.data.transforms import normalize, rescale_size, resize_image

MODES = ("whole", "slide")
Size = tuple[int, int]
Stats = Sequence[float]


# --------------------------------------------------------------------------------------------
# Sizes, resizing and normalisation
# --------------------------------------------------------------------------------------------


def ratio_scale(scale: Sequence[int], ratio: float) -> Size:
    """The test scale multiplied by an ms ratio, truncated as mmseg's MultiScaleFlipAug does."""
    return int(scale[0] * ratio), int(scale[1] * ratio)


def resize_logits(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of NCHW logits (align_corners=False); identity if already that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def model_normalization(model: nn.Module) -> tuple[Stats, Stats]:
    """(mean, std) on the 0-255 scale the model was trained with: its ``meta``'s, else ImageNet's
    (what ``TrainTransform`` uses by default)."""
    meta = getattr(model, "meta", None) or {}
    return tuple(meta.get("mean", MEAN_RGB)), tuple(meta.get("std", STD_RGB))


def network_input(
    image: torch.Tensor, size: Sequence[int], mean: Stats, std: Stats
) -> torch.Tensor:
    """One view: the 0-255 image resized to ``size`` (in 0-255, rounded), then normalised."""
    return normalize(resize_image(image, size), mean, std)


def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an RGB image batch [N, 3, H, W], got {tuple(image.shape)}")
    if image.is_floating_point() and bool(image.amin() < 0):
        raise ValueError(
            "images must be on the 0-255 scale (they are resized there and normalised with the"
            " model's mean/std); got negative values, i.e. an already normalised image"
        )


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
    return resize_logits(out.float(), x.shape[-2:])


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


def model_stats(model: nn.Module, mean: Stats | None, std: Stats | None) -> tuple[Stats, Stats]:
    """``mean`` / ``std`` where given, else the model's (``model_normalization``)."""
    model_mean, model_std = model_normalization(model)
    return (model_mean if mean is None else mean), (model_std if std is None else std)


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
    mean: Stats | None = None,
    std: Stats | None = None,
) -> torch.Tensor:
    """Single-scale logits [N, C, *out_size] for a 0-255 RGB image batch [N, 3, h, w].

    ``out_size`` is the original (label) size, default the image's own; the network input is that
    size rescaled to ``test_scale`` keeping the ratio, normalised with ``mean`` / ``std``
    (default ``model_normalization(model)``).
    """
    _check_mode(mode)
    _check_image(image)
    mean, std = model_stats(model, mean, std)
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[-2:])
    if channels_last is None:
        channels_last = prefers_channels_last(model)
    x = network_input(image, rescale_size(out_size, test_scale), mean, std)
    logits = _view_logits(model, x, mode, amp, channels_last, slide_crop, slide_stride)
    return resize_logits(logits, out_size)


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
    mean: Stats | None = None,
    std: Stats | None = None,
) -> torch.Tensor:
    """Mean softmax [N, C, *out_size] over ``ratios`` x (no flip, flip) views (mmseg aug_test)
    of a 0-255 RGB image batch [N, 3, h, w].

    Every view is resized from ``image`` (pass the original image, as MultiScaleFlipAug resizes
    the original) and normalised with ``mean`` / ``std`` (default the model's). Each view's
    logits are resized to the original size, softmaxed and un-flipped, then added in place to
    one accumulator, so peak memory is a few full-size maps whatever the view count.
    """
    _check_mode(mode)
    _check_image(image)
    mean, std = model_stats(model, mean, std)
    if not ratios:
        raise ValueError("ms+flip needs at least one ratio")
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[-2:])
    if channels_last is None:
        channels_last = prefers_channels_last(model)
    acc: torch.Tensor | None = None
    for r in ratios:
        if not r > 0:
            raise ValueError(f"scale ratios must be positive, got {r}")
        x = network_input(image, rescale_size(out_size, ratio_scale(test_scale, r)), mean, std)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            logits = _view_logits(model, xi, mode, amp, channels_last, slide_crop, slide_stride)
            logits = resize_logits(logits, out_size)
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
    mean: Stats | None = None,
    std: Stats | None = None,
) -> torch.Tensor:
    """Class map [N, *out_size] (int64) for a 0-255 RGB image batch [N, 3, h, w] (uint8 or
    float), normalised per view with ``mean`` / ``std`` (default ``model.meta``'s, else
    ImageNet's)."""
    kw = dict(
        test_scale=test_scale,
        mode=mode,
        amp=amp,
        channels_last=channels_last,
        slide_crop=slide_crop,
        slide_stride=slide_stride,
        mean=mean,
        std=std,
    )
    if ms_flip:
        ratios = RECIPE.ms_flip_ratios if scales is None else scales
        return infer_probs_ms_flip(model, image, out_size, ratios=ratios, **kw).argmax(1)
    if scales is not None:
        raise ValueError("scales are the ms+flip ratios: pass ms_flip=True with them")
    return infer_logits(model, image, out_size, **kw).argmax(1)


__all__ = [
    "MODES",
    "forward_logits",
    "infer_logits",
    "infer_probs_ms_flip",
    "model_normalization",
    "model_stats",
    "network_input",
    "predict",
    "prefers_channels_last",
    "ratio_scale",
    "rescale_size",
    "resize_image",
    "resize_logits",
    "slide_logits",
]
