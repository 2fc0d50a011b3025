"""Colouring class maps: a palette's lookup table, colour maps, blends over the image.

Palettes come from the data (a dataset's ``palette``) or from a checkpoint (``meta["palette"]``),
one RGB triple per class; pixels of any other value (the ignore index) are black.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

Palette = Sequence[Sequence[int]] | np.ndarray


def palette_lut(palette: Palette) -> np.ndarray:
    """256x3 uint8 class -> colour table: the palette's colours, then black."""
    colors = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = colors
    return lut


def colorize(pred: np.ndarray, palette: Palette) -> np.ndarray:
    """An HxW class map (any integer dtype) as HxWx3 uint8 colours."""
    pred = np.asarray(pred)
    lut = palette_lut(palette)
    if pred.dtype != np.uint8:  # values outside 0..255 are not classes: black
        pred = np.where((pred >= 0) & (pred < 256), pred, 255).astype(np.uint8)
    return lut[pred]


def rgb_array(image: torch.Tensor) -> np.ndarray:
    """A 0-255 RGB [3, H, W] tensor (uint8 or float) as an HxWx3 uint8 array."""
    rgb = image.detach().to("cpu", torch.float32).round().clamp_(0, 255).to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()


def blend(rgb: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``alpha`` of the colours over ``1 - alpha`` of the image (HxWx3 uint8 both)."""
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * color.astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def save_color(
    pred: np.ndarray,
    image: np.ndarray | None,
    out_dir: str | Path,
    city: str,
    name: str,
    *,
    palette: Palette,
) -> Path:
    """Colours as ``<out>/<city>/<name>_color.png`` and, given the RGB image, a half-and-half
    ``<name>_blend.png``."""
    folder = Path(out_dir) / city
    folder.mkdir(parents=True, exist_ok=True)
    color = colorize(pred, palette)
    Image.fromarray(color).save(folder / f"{name}_color.png")
    if image is not None:
        Image.fromarray(blend(image, color, 0.5)).save(folder / f"{name}_blend.png")
    return folder / f"{name}_color.png"
