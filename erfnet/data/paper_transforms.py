"""erfnet_pytorch's data pipeline (``--recipe erfnet_pytorch``, ``eval.py --protocol
erfnet_pytorch``), on the project's tensors with PIL's own resizes.

Its code works on PIL images: ``Resize(512)`` makes the shorter side 512 with
``Image.resize(BILINEAR)`` on the uint8 image (antialiased when shrinking, rounded to uint8) and
``Image.resize(NEAREST)`` on the label (which samples pixel centres, torch's ``nearest-exact``);
the resizes here call PIL, so they are PIL's by construction. Training then flips with p 0.5 and
translates by (tx, ty), each an integer uniform in -2..2, as PIL's ``ImageOps.expand`` + ``crop``
do it (``translate``), and the image becomes 0-1 floats without mean/std. Random draws come from
torch's global RNG, as every project transform's (``SeededDataset`` seeds it per sample).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from erfnet.config import IGNORE_INDEX, PAPER_RECIPE

# The keep-ratio test scale (H, W) under which an image whose shorter side is S stays as it is
# (mmcv's rule with a long side that never binds): how the evaluator, which resizes to a scale,
# takes the images ``ShorterSideEvalTransform`` resized already.
UNBOUNDED_SIDE = 1 << 30


def shorter_side_scale(size: int) -> tuple[int, int]:
    """The test scale that leaves an image of shorter side ``size`` at its size."""
    return int(size), UNBOUNDED_SIDE


def shorter_side_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(h, w) of an ``size`` image whose shorter side becomes ``shorter``, as torchvision's
    ``Resize(int)`` of erfnet_pytorch's era computes it: the long side is truncated."""
    h, w = size
    if h <= w:
        return shorter, int(shorter * w / h)
    return int(shorter * h / w), shorter


def pil_resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 RGB [3, H, W] image resized to ``size`` (H, W) by PIL's BILINEAR; uint8."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()


def pil_resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 [H, W] label resized to ``size`` (H, W) by PIL's NEAREST; same dtype."""
    if tuple(label.shape) == tuple(size):
        return label
    pil = Image.fromarray(label.to(torch.uint8).numpy())
    out = np.asarray(pil.resize((size[1], size[0]), Image.NEAREST))
    return torch.from_numpy(out.copy()).to(label.dtype)


def translate(
    image: torch.Tensor, label: torch.Tensor, tx: int, ty: int, label_fill: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """erfnet_pytorch's translation of an image [C, H, W] and its label [H, W]: each expanded by
    (tx, ty) on the left / top (fill 0 for the image, ``label_fill`` for the label) and cropped
    back to its size from the top-left corner. A negative shift drops the first |t| columns /
    rows instead, and the crop pads the right / bottom with 0 in both (PIL's crop fill)."""
    h, w = label.shape
    out_image = torch.zeros_like(image)
    out_label = torch.zeros_like(label)
    # The part of the crop inside the expanded image holds the expand fill; beyond it (the
    # right / bottom after a negative shift) the crop's 0.
    out_label[: h + min(ty, 0), : w + min(tx, 0)] = label_fill
    (dy0, sy0, ny), (dx0, sx0, nx) = _window(ty, h), _window(tx, w)
    out_image[:, dy0 : dy0 + ny, dx0 : dx0 + nx] = image[:, sy0 : sy0 + ny, sx0 : sx0 + nx]
    out_label[dy0 : dy0 + ny, dx0 : dx0 + nx] = label[sy0 : sy0 + ny, sx0 : sx0 + nx]
    return out_image, out_label


def _window(t: int, n: int) -> tuple[int, int, int]:
    """(destination start, source start, length) of a shift by ``t`` along an axis of ``n``."""
    if t >= 0:
        return t, 0, max(n - t, 0)
    return 0, -t, max(n + t, 0)


class PaperTrainTransform:
    """erfnet_pytorch's training transform: resize to a shorter side of ``shorter_side`` (PIL),
    flip with ``flip_prob``, translate by integers uniform in -max_shift..max_shift, image to
    0-1 floats. The label keeps the dataset's ignore index (the pads of a positive shift get
    ``IGNORE_INDEX``); the stage's label transform on the device maps it to "void"."""

    def __init__(
        self,
        shorter_side: int = PAPER_RECIPE.shorter_side,
        flip_prob: float = PAPER_RECIPE.flip_prob,
        max_shift: int = PAPER_RECIPE.max_shift,
    ) -> None:
        self.shorter_side = int(shorter_side)
        self.flip_prob = float(flip_prob)
        self.max_shift = int(max_shift)

    def draw(self) -> dict[str, int | bool]:
        """The random choices, in erfnet_pytorch's order: flip, then tx, then ty."""
        flip = bool(torch.rand(()).item() < self.flip_prob)
        m = self.max_shift
        tx = int(torch.randint(-m, m + 1, ()).item())
        ty = int(torch.randint(-m, m + 1, ()).item())
        return {"flip": flip, "tx": tx, "ty": ty}

    def apply(
        self, image: torch.Tensor, label: torch.Tensor, p: dict[str, int | bool]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transform with the choices of ``draw``: float32 0-1 image, int64 label."""
        size = shorter_side_size((image.shape[1], image.shape[2]), self.shorter_side)
        image, label = pil_resize_image(image, size), pil_resize_label(label, size)
        if p["flip"]:
            image, label = image.flip(-1), label.flip(-1)
        image, label = translate(image, label, int(p["tx"]), int(p["ty"]))
        return image.to(torch.float32).div_(255.0), label.long()

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if label is None:
            raise ValueError("PaperTrainTransform needs a label")
        return self.apply(image, label, self.draw())

    def __repr__(self) -> str:
        return (
            f"PaperTrainTransform(shorter_side={self.shorter_side}, flip_prob={self.flip_prob},"
            f" max_shift={self.max_shift})"
        )


class ShorterSideEvalTransform:
    """erfnet_pytorch's evaluation resize: the uint8 image to a shorter side of ``size`` (PIL
    BILINEAR), the label likewise (PIL NEAREST) and then, with ``label_stride`` s > 1, to a
    shorter side of ``size // s`` (its encoder stage's validation at 1/8). The image stays uint8
    0-255: the evaluator normalises it with the model's mean / std."""

    def __init__(self, size: int = PAPER_RECIPE.shorter_side, label_stride: int = 1) -> None:
        self.size = int(size)
        self.label_stride = int(label_stride)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = shorter_side_size((image.shape[1], image.shape[2]), self.size)
        image = pil_resize_image(image, size)
        if label is None:
            return image, None
        label = pil_resize_label(label, size)
        if self.label_stride > 1:
            small = shorter_side_size(size, self.size // self.label_stride)
            label = pil_resize_label(label, small)
        return image, label.long()

    def __repr__(self) -> str:
        return f"ShorterSideEvalTransform(size={self.size}, label_stride={self.label_stride})"
