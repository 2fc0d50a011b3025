"""Inference as mmsegmentation tests this recipe; shared by eval.py, training and the scripts.

``predict(model, image, out_size, settings)``: ``TestSettings``' defaults are mmseg's protocol,
at the test size the checkpoint records (``meta["test_size"]``, ``erfnet.test_size``). Images
are on the 0-255 scale: each network input ("view") is resized there (``resize_image``:
bilinear, rounded, as mmseg resizes the uint8 image), then normalised once with the model's own
``meta["mean"]`` / ``["std"]``, so a checkpoint trained with another normalisation
(erfnet_pytorch's mean 0 / std 255) needs nothing extra.

- Whole image (the recipe's test mode): the image is resized keeping its ratio to the test scale
  (mmcv's rescale rule), the logits are resized bilinearly (align_corners=False) to the original
  label size, argmax.
- Slide: overlapping crops (``slide_crop`` / ``slide_stride``) of the resized image, logits
  summed and divided by the number of crops covering each pixel (mmseg's slide_inference).
- ms+flip: every ratio of the test scale, each view resized from the original image, with and
  without a horizontal flip; the softmax of each view's logits at the original size (flip
  undone) is summed in place; argmax.

Full-size float maps over ``STRIP_BYTES`` are never made: ``predict`` then resizes and reduces
them in horizontal strips (``labels_in_strips``), in the same order, with the same labels.

A model may also return class labels [N, H, W] instead of logits (an exported graph that ends in
an argmax): those are resized nearest to the label size, in whole-image single-scale mode only.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erfnet.config import RECIPE
from erfnet.data.transforms import Stats, normalize, resize_image
from erfnet.data.transforms import rescale_size as rescale_size  # re-exported
from erfnet.evaluation.inputs import as_image_batch, is_image_list, is_single_image
from erfnet.evaluation.settings import (
    DEFAULT_SETTINGS,
    MIN_VIEW,
    Size,
    TestSettings,
    model_meta,
    settings_for,
)
from erfnet.evaluation.settings import MODES as MODES  # re-exported
from erfnet.evaluation.settings import model_test_size as model_test_size  # re-exported
from erfnet.evaluation.strips import STRIP_BYTES, labels_in_strips, strip_rows
from erfnet.test_size import rule_size

LABELS_ONLY_WHOLE = (
    "this model outputs class labels (a graph exported with --argmax): only whole-image"
    " single-scale prediction applies (no slide, no ms+flip)"
)


def ratio_scale(scale: Sequence[int], ratio: float) -> Size:
    """The test scale multiplied by an ms ratio, truncated as mmseg's MultiScaleFlipAug does."""
    return int(scale[0] * ratio), int(scale[1] * ratio)


def view_size(
    out_size: Sequence[int], scale: Sequence[int], ratio: float = 1.0, rule: str = "keep_ratio"
) -> Size:
    """The network input size for an image of ``out_size`` at ``scale`` x ``ratio`` under
    ``rule`` (``TestSettings.rule``); ValueError (one line) when a side falls under
    ``MIN_VIEW`` pixels."""
    size = rule_size(tuple(out_size), rule, scale, ratio)
    if min(size) < MIN_VIEW:
        at = f"{scale[0]}x{scale[1]}" if rule != "shorter_side" else f"{scale[0]}"
        at = ("the test scale " if rule == "keep_ratio" else f"the test size {rule} ") + at
        at += f" x {ratio:g}" if ratio != 1.0 else ""
        raise ValueError(
            f"a {out_size[0]}x{out_size[1]} image resized to {at} is"
            f" {size[0]}x{size[1]} pixels, under the {MIN_VIEW}x{MIN_VIEW} the network needs:"
            " use a larger scale, or an image less elongated"
        )
    return size


def resize_logits(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of NCHW logits (align_corners=False); identity if already that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest resize of an [N, H, W] integer label map; identity if already that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(labels.shape[-2:]) == size:
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def is_label_map(out: torch.Tensor) -> bool:
    """True for a model output of class labels [N, H, W] rather than logits [N, C, H, W]."""
    return out.dim() == 3 and not out.is_floating_point()


def model_normalization(model: nn.Module) -> tuple[Stats, Stats]:
    """(mean, std) on the 0-255 scale the model was trained with: its ``meta``'s (every ERFNet
    and export carries a complete one; ImageNet's for a network built in code)."""
    meta = model_meta(model)
    return tuple(meta["mean"]), tuple(meta["std"])


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


def prefers_channels_last(model: nn.Module) -> bool:
    """True if the model's spatial conv weights are stored channels_last (False for a model
    without parameters, e.g. an exported graph)."""
    for p in getattr(model, "parameters", list)():
        if p.dim() == 4 and p.shape[-1] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def forward_logits(
    model: nn.Module, x: torch.Tensor, *, amp: bool = False, channels_last: bool = False
) -> torch.Tensor:
    """``model(x)`` as float32 logits at x's size; fp16 autocast on CUDA when ``amp``. A model
    that outputs labels [N, H, W] has them returned as they are."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp and x.device.type == "cuda"):
        out = model(x)
    if is_label_map(out):
        return out
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
            if is_label_map(logits):
                raise ValueError(LABELS_ONLY_WHOLE)
            if out is None:
                out = logits.new_zeros((x.shape[0], logits.shape[1], h, w))
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    assert out is not None
    return out.div_(count)


def _view_logits(
    model: nn.Module, x: torch.Tensor, settings: TestSettings, channels_last: bool
) -> torch.Tensor:
    if settings.mode == "whole":
        return forward_logits(model, x, amp=settings.amp, channels_last=channels_last)
    crop, stride = settings.slide_crop, settings.slide_stride
    return slide_logits(
        model, x, crop=crop, stride=stride, amp=settings.amp, channels_last=channels_last
    )


def _views(
    model: nn.Module, image: torch.Tensor, out_size: Size, settings: TestSettings, ms: bool
) -> Iterator[tuple[torch.Tensor, bool]]:
    """(logits at the view's size, flipped) of each view in mmseg's order: ``image`` resized to
    the test scale (``ms``: to each of ``settings.ratios`` of it, also flipped when
    ``settings.flip``), normalised with the model's statistics. No local here keeps a yielded
    map alive: the caller frees it."""
    mean, std = model_normalization(model)
    channels_last = prefers_channels_last(model)
    flips = (False, True) if ms and settings.flip else (False,)
    for r in settings.ratios if ms else (1.0,):
        x = network_input(image, view_size(out_size, settings.scale, r, settings.rule), mean, std)
        for flipped in flips:
            view = x.flip(-1) if flipped else x
            yield _view_logits(model, view, settings, channels_last), flipped


def _out_size(image: torch.Tensor, out_size: Sequence[int] | None) -> Size:
    _check_image(image)
    return tuple(out_size) if out_size is not None else tuple(image.shape[-2:])


@torch.inference_mode()
def infer_logits(
    model: nn.Module,
    image: torch.Tensor,
    out_size: Sequence[int] | None = None,
    settings: TestSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Single-scale logits [N, C, *out_size] for a 0-255 RGB image batch [N, 3, h, w] (or, for
    a model that outputs labels, those labels [N, *out_size] resized nearest).

    ``out_size`` is the original (label) size, default the image's own; the network input is that
    size rescaled to ``settings.scale`` keeping the ratio, normalised with the model's
    ``model_normalization``. ``settings.ms_flip`` is not looked at (see ``predict``).
    """
    out_size = _out_size(image, out_size)
    logits, _ = next(_views(model, image, out_size, settings, False))
    if is_label_map(logits):  # whole mode only: slide_logits refuses labels
        return resize_labels(logits, out_size)
    return resize_logits(logits, out_size)


@torch.inference_mode()
def infer_probs_ms_flip(
    model: nn.Module,
    image: torch.Tensor,
    out_size: Sequence[int] | None = None,
    settings: TestSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Mean softmax [N, C, *out_size] over ``settings.ratios`` x (no flip, flip) views (mmseg
    aug_test; no flip unless ``settings.flip``) of a 0-255 RGB image batch [N, 3, h, w].

    Every view is resized from ``image`` (pass the original image, as MultiScaleFlipAug resizes
    the original) and normalised with the model's statistics. Each view's logits are resized to
    the original size, softmaxed and un-flipped, then added in place to one accumulator, so peak
    memory is a few full-size maps whatever the view count.
    """
    out_size = _out_size(image, out_size)
    acc: torch.Tensor | None = None
    for logits, flipped in _views(model, image, out_size, settings, True):
        if is_label_map(logits):
            raise ValueError(LABELS_ONLY_WHOLE)
        logits = resize_logits(logits, out_size)
        if flipped:
            logits = logits.flip(-1)
        probs = torch.softmax(logits, dim=1)
        del logits
        acc = probs if acc is None else acc.add_(probs)
        del probs
    assert acc is not None
    return acc.div_(len(settings.ratios) * (2 if settings.flip else 1))


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` (and each submodule) in eval mode inside, each module's own mode restored on
    exit; eval mode reads BatchNorm's running statistics and never updates them."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def model_device(model: Any) -> torch.device | None:
    """The device of the model's parameters (None for a model without any, e.g. an export)."""
    for p in getattr(model, "parameters", list)():
        return p.device
    return None


def _checked_out_size(out_size: Sequence[int] | None) -> Size | None:
    if out_size is None:
        return None
    size = tuple(out_size)
    try:
        ints = tuple(operator.index(v) for v in size)  # ints, numpy ints, 0-d int tensors
    except TypeError:
        ints = ()
    if len(ints) != 2 or min(ints) < 1:
        raise ValueError(f"out_size {size}: two positive integers (H, W) expected")
    return ints[0], ints[1]


def _predict_batch(
    model: nn.Module,
    image: torch.Tensor,
    out_size: Size | None,
    settings: TestSettings,
    strip_bytes: int,
) -> torch.Tensor:
    """Class map [N, *out_size] of one checked 0-255 batch; full-size float maps above
    ``strip_bytes`` are made in strips (``labels_in_strips``)."""
    _check_image(image)
    size = out_size or (int(image.shape[-2]), int(image.shape[-1]))
    outputs = getattr(model, "num_classes", None) or 256  # unknown: at most 255 classes
    # Full-width float maps alive at once per strip: the resized rows and a temporary; ms+flip
    # adds the softmax sum and one view's softmax.
    maps = 4 if settings.ms_flip else 2
    rows = strip_rows(maps * image.shape[0], outputs, size[1], strip_bytes)
    full_map = 4 * image.shape[0] * outputs * size[0] * size[1]
    if full_map <= strip_bytes:  # one full-size map fits: mmseg's computation as written
        if settings.ms_flip:
            return infer_probs_ms_flip(model, image, size, settings).argmax(1)
        out = infer_logits(model, image, size, settings)
        return out if is_label_map(out) else out.argmax(1)
    views = list(_views(model, image, size, settings, settings.ms_flip))
    if is_label_map(views[0][0]):  # an exported graph ending in an argmax
        if settings.ms_flip:
            raise ValueError(LABELS_ONLY_WHOLE)
        return resize_labels(views[0][0], size)
    return labels_in_strips(views, size, rows)


@torch.inference_mode()
def predict(
    model: nn.Module,
    image: Any,
    out_size: Sequence[int] | None = None,
    settings: TestSettings | None = None,
    *,
    strip_bytes: int = STRIP_BYTES,
) -> torch.Tensor | list[torch.Tensor]:
    """Class maps (int64) for what a notebook holds, as ``settings`` say.

    ``image``: a PIL image, an H x W x 3 uint8 numpy array, a path, a ``[3, H, W]`` or
    ``[N, 3, H, W]`` tensor (uint8 0-255, or float on the same 0-255 scale), or a list of
    these of any sizes (see ``erfnet.evaluation.inputs.as_image_batch``: 0-1 floats, NaN,
    16-bit values and empty images are refused in one ValueError line). Returns ``[H, W]`` for
    one image, ``[N, H, W]`` for an NCHW batch, a list of ``[H, W]`` for a list, at ``out_size``
    (default each image's size; not with a list).

    ``settings`` default: mmseg's whole-image single-scale test at the model's test size, the
    one its checkpoint records (``meta["test_size"]``: train.py's validation scale, the
    converters' source recipe; a checkpoint without it: Cityscapes' keep-ratio 1024x2048).
    Each view is normalised with ``model.meta``'s mean / std. The model runs in eval mode
    (BatchNorm's running statistics, none updated) and every module's mode is restored after.
    Float maps at the image size over ``strip_bytes`` are made in horizontal strips.
    """
    if is_image_list(image) and out_size is not None:
        raise ValueError("out_size with a list of images: each is predicted at its own size")
    size = _checked_out_size(out_size)
    settings = settings if settings is not None else settings_for(model)
    batches = as_image_batch(image, model_device(model))
    with eval_mode(model):
        preds = [_predict_batch(model, b, size, settings, strip_bytes) for b in batches]
    if is_image_list(image):
        return [p[0] for p in preds]
    return preds[0][0] if is_single_image(image) else preds[0]
