"""Colouring class maps: the one palette table, the one blend, and PNG writing.

Palettes come from a checkpoint (``meta["palette"]``) or the data (a dataset's ``palette``), one
RGB triple per class. ``class_colors`` holds the one rule for a palette shorter than its classes:
the missing classes get Cityscapes' colour for their index where it has one, else a colour
generated from the index (PASCAL VOC's bit pattern), and a warning line names them, so no class
is painted black silently. Pixels of any value that is not a class (the ignore index) are black.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from erfnet.data.transforms import resize_image
from erfnet.evaluation.inference import TestSettings, predict
from erfnet.labels import Palette, class_colors
from erfnet.model import unwrap_model
from erfnet.outputs import atomic_write


def palette_lut(palette: Palette, num_classes: int | None = None) -> np.ndarray:
    """The one 256x3 uint8 class -> colour table: the palette's colours (completed to
    ``num_classes`` by ``class_colors``' rule when it is shorter), then black."""
    n = min(max(len(palette), num_classes or 0), 256)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:n] = class_colors(palette, n)
    return lut


def colorize(pred: np.ndarray, palette: Palette, num_classes: int | None = None) -> np.ndarray:
    """An HxW class map (any integer dtype) as HxWx3 uint8 colours (``palette_lut``)."""
    pred = np.asarray(pred)
    lut = palette_lut(palette, num_classes)
    if pred.dtype != np.uint8:  # values outside 0..255 are not classes: black
        pred = np.where((pred >= 0) & (pred < 256), pred, 255).astype(np.uint8)
    return lut[pred]


def rgb_array(image: torch.Tensor) -> np.ndarray:
    """A 0-255 RGB [3, H, W] tensor (uint8 or float) as an HxWx3 uint8 array."""
    rgb = image.detach().to("cpu", torch.float32).round().clamp_(0, 255).to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()


def blend(rgb: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The one blend: ``round((1 - alpha) * rgb + alpha * color)`` as uint8 (HxWx3 both)."""
    if alpha >= 1.0:
        return color
    out = rgb.astype(np.float32)
    out *= 1.0 - alpha
    out += alpha * color.astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` as a PNG by the one atomic writer (``erfnet.outputs.atomic_write``),
    creating the folder; an OSError is re-raised as one line naming the path and the reason."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), fsync=False)
    except OSError as e:
        raise OSError(f"cannot write '{path}': {e.strerror or e}") from None
    return path


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
    color = colorize(pred, palette)
    save_png(color, folder / f"{name}_color.png")
    if image is not None:
        save_png(blend(image, color, 0.5), folder / f"{name}_blend.png")
    return folder / f"{name}_color.png"


@dataclass
class ColorWriter:
    """``evaluate``'s ``on_prediction`` for colour renderings: ``<dir>/<city>/<name>_color.png``
    and ``_blend.png`` per image, in ``palette`` (one colour per predicted class)."""

    out_dir: Path
    palette: Palette

    def __post_init__(self) -> None:
        self.lut = palette_lut(self.palette, len(self.palette))

    def __call__(self, preds: torch.Tensor, batch: dict) -> None:
        labels = preds.to("cpu", torch.uint8).numpy()
        for i in range(labels.shape[0]):
            rgb = rgb_array(resize_image(batch["image"][i], labels.shape[-2:]))
            save_color(
                labels[i], rgb, self.out_dir, batch["city"][i], batch["name"][i], palette=self.lut
            )


@torch.no_grad()
def prediction_strips(
    model: nn.Module,
    dataset: Dataset,
    *,
    num: int,
    palette: Palette,
    settings: TestSettings,
    device: torch.device,
) -> list[np.ndarray]:
    """The first ``num`` images of ``dataset`` as [image | ground truth | prediction] strips,
    HxWx3 uint8 at the label's size; the model is in eval mode meanwhile."""
    net = unwrap_model(model)
    strips = []
    for i in range(min(num, len(dataset))):  # type: ignore[arg-type]
        sample = dataset[i]
        label = sample["label"].numpy()
        # predict runs the model in eval mode and restores its modes
        pred = predict(net, sample["image"][None].to(device), label.shape, settings)[0]
        rgb = rgb_array(sample["image"])
        if rgb.shape[:2] != label.shape:
            rgb = np.asarray(Image.fromarray(rgb).resize(label.shape[::-1]))
        colors = [colorize(label, palette), colorize(pred.cpu().numpy(), palette)]
        strips.append(np.concatenate([rgb, *colors], axis=1))
    return strips
