"""What a notebook holds, as the image batches inference takes: the one input conversion.

``as_image_batch(x)`` turns any of these into a list of RGB batches ``[N, 3, H, W]`` on the 0-255
scale (uint8, or float32 for float input):

- a PIL image (any mode; its EXIF orientation applied, 16-bit keeps its high byte, as the
  project's image reader does), an ``H x W x 3`` (or ``x 4``: alpha dropped) numpy array,
- a path (``str`` / ``Path``: read by ``erfnet.data.decode.load_image``, its size checked from
  the header first),
- a ``[3, H, W]`` or ``[N, 3, H, W]`` tensor,
- a list or tuple of those (each one image, of any size): one batch per image.

Values: uint8 is 0-255. Float keeps the same 0-255 meaning; a float image whose maximum is <= 1
(``to_tensor``'s 0-1 scale) is refused, as are non-finite, negative or > 255 values (16-bit
data), and integers outside 0-255. Every refusal is one ``ValueError`` line saying what was
expected. ``erfnet.predict`` and anything else that takes a user's images call this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from erfnet.data.decode import check_pixels, load_image, pil_rgb8

ImageLike = Any  # PIL image, numpy array, str / Path, torch tensor
FLOAT_HINT = "pass uint8, or multiply a 0-1 float image by 255"


def is_image_list(x: Any) -> bool:
    """True for a list / tuple of images (inference then returns a list, one per image)."""
    return isinstance(x, list | tuple)


def is_single_image(x: Any) -> bool:
    """True for one image without a batch dimension (PIL, array, path, ``[3, H, W]``): its
    prediction is ``[H, W]`` rather than ``[N, H, W]``."""
    return not (isinstance(x, torch.Tensor) and x.dim() == 4) and not is_image_list(x)


def _from_pil(image: Image.Image) -> torch.Tensor:
    check_pixels(Path("<PIL image>"), *image.size)
    rgb = pil_rgb8(image)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def _from_array(array: np.ndarray) -> torch.Tensor:
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(
            f"a numpy image must be H x W x 3 (RGB; x 4 with alpha), got shape {array.shape}"
        )
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ValueError(f"a numpy image must hold numbers (uint8 0-255), got {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)


def _as_tensor(x: Any) -> torch.Tensor:
    """One input (not a list) as a tensor [3, H, W] or [N, 3, H, W], values not yet checked."""
    if isinstance(x, Image.Image):
        return _from_pil(x)
    if isinstance(x, str | os.PathLike):
        return load_image(x)
    if isinstance(x, np.ndarray):
        return _from_array(x)
    if isinstance(x, torch.Tensor):
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            hint = " (an H x W x 3 tensor: x.permute(2, 0, 1))" if x.shape[-1:] == (3,) else ""
            raise ValueError(
                f"a tensor image must be [3, H, W] or [N, 3, H, W] (RGB), got {tuple(x.shape)}"
                + hint
            )
        return x
    raise ValueError(
        f"cannot take a {type(x).__name__} as an image: pass a PIL image, an H x W x 3 uint8"
        " numpy array, a path, a [3, H, W] / [N, 3, H, W] tensor, or a list of these"
    )


def check_values(image: torch.Tensor) -> torch.Tensor:
    """``image`` (RGB, any shape) as uint8 or float32 on the 0-255 scale, or one ValueError
    line: non-finite, negative or > 255 values, a float image whose maximum is <= 1, an
    integer image outside 0-255, a bool or complex image."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.bool or image.is_complex():
        raise ValueError(f"an image must hold RGB numbers on the 0-255 scale, got {image.dtype}")
    if image.numel() == 0:
        return image.to(torch.float32 if image.is_floating_point() else torch.uint8)
    values = image if image.is_floating_point() else image.to(torch.int64)  # uint16 has no amin
    low, high = float(values.amin()), float(values.amax())
    if image.is_floating_point():
        if not bool(torch.isfinite(image).all()):
            raise ValueError("the image holds NaN or infinite values: every pixel must be finite")
        if low < 0 or high > 255:
            raise ValueError(
                f"float image values {low:g}..{high:g}: the 0-255 scale is expected (not an"
                " already normalised image, nor 16-bit data)"
            )
        if high <= 1:
            raise ValueError(
                f"float image values {low:g}..{high:g} (maximum <= 1) look like the 0-1 scale;"
                f" images are on the 0-255 scale: {FLOAT_HINT}"
            )
        return image.to(torch.float32)
    if low < 0 or high > 255:
        raise ValueError(
            f"{image.dtype} image values {low:g}..{high:g}: 0-255 expected (16-bit data: pass"
            " its high byte, x >> 8, as uint8)"
        )
    return image.to(torch.uint8)


def as_image_batch(x: ImageLike, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Images of any form this module lists as RGB batches ``[N, 3, H, W]`` on the 0-255 scale
    (uint8 or float32), on ``device`` when given: one batch for a single input, one ``[1, 3, H,
    W]`` batch per image of a list. ValueError (one line) for anything else."""
    items: Sequence[Any] = list(x) if is_image_list(x) else [x]
    if not items:
        raise ValueError("an empty list of images")
    batches = []
    for i, item in enumerate(items):
        if is_image_list(item):
            raise ValueError(f"image {i} of the list is itself a list: pass a flat list")
        tensor = _as_tensor(item)
        if is_image_list(x) and tensor.dim() == 4 and tensor.shape[0] != 1:
            raise ValueError(
                f"image {i} of the list is a batch of {tensor.shape[0]}: a list holds one image"
                " per entry"
            )
        batch = tensor if tensor.dim() == 4 else tensor[None]
        if 0 in batch.shape[-2:]:
            raise ValueError(f"a {batch.shape[-2]}x{batch.shape[-1]} (HxW) image has no pixels")
        batches.append(check_values(batch.to(device) if device is not None else batch))
    return batches
