"""Joint image + label transforms of mmsegmentation's Cityscapes recipe, on torch tensors.

Inputs are uint8 RGB images [3, H, W] and uint8 trainId labels [H, W] (or None). The training
pipeline outputs a float32 normalised image and an int64 label; the evaluation one a uint8 image
(0-255, resized as mmseg resizes it) that ``erfnet.evaluation.inference`` resizes per view and
normalises with the checkpoint's mean/std. Randomness comes from torch's global RNG, so DataLoader
worker seeding and checkpoint resume cover it. ``normalize``, ``denormalize`` and ``resize_image``
here are the project's only image normalisation and resize.

TrainTransform follows mmseg (v0.x ``Resize``/``RandomCrop``/``RandomFlip``/
``PhotoMetricDistortion``/``Normalize``/``Pad``) step by step, including its rounding: mmcv's
``imrescale`` size rule, integer pixel values after each photometric step (mmseg works on uint8)
and OpenCV's 8-bit HSV (hue in units of 2 degrees, so ``hue_delta=18`` is +-36 degrees). For speed
the resized image is only computed inside the crop window; the values equal a full bilinear
resize followed by the crop (to float rounding), see ``resize_crop_bilinear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from erfnet.config import IGNORE_INDEX, MEAN_RGB, RECIPE, STD_RGB

Stats = Sequence[float] | torch.Tensor  # per-channel RGB mean or std on the 0-255 scale
# (ry0, ry1, wy, cx0, cx1, wx, rows_first) of a crop window's bilinear resize, see bilinear_taps
Taps = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool
]


def _per_channel(values: Stats, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1)


def normalize(image: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """0-255 RGB [3,H,W] or [N,3,H,W] (any dtype) -> float32 ``(x - mean) / std``, a new tensor.
    Multiplies by 1/std like mmcv's ``imnormalize``; one allocation, then in place."""
    inv_std = 1.0 / _per_channel(std, image)
    return image.to(torch.float32, copy=True).sub_(_per_channel(mean, image)).mul_(inv_std)


def denormalize(image: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """Inverse of ``normalize``: float32 on the 0-255 scale, unclipped."""
    return image.float() * _per_channel(std, image) + _per_channel(mean, image)


def rescale_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale`` keep-ratio rule: the (h, w) of ``size`` fitted into ``scale``."""
    h, w = size
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The one image resize: a 0-255 RGB [3,H,W] or [N,3,H,W] to ``size`` (H, W), bilinear like
    cv2 INTER_LINEAR, rounded and clipped to 0..255 as mmseg's uint8 image is; float32."""
    size = (int(size[0]), int(size[1]))
    image = image.to(torch.float32)
    if tuple(image.shape[-2:]) == size:
        return image
    batch = image if image.dim() == 4 else image[None]
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    out = out.round_().clamp_(0, 255)
    return out if image.dim() == 4 else out[0]


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a [H,W] label (same rule as cv2 INTER_NEAREST)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    # torchvision loads torch._dynamo (~2 s of every process start): imported where it is used
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    return TF.resize(label[None], list(size), InterpolationMode.NEAREST)[0]


def _nearest_index(out_len: int, in_len: int, start: int, stop: int) -> torch.Tensor:
    """Source indices of output pixels ``start:stop`` for PyTorch's (= OpenCV's) nearest resize."""
    if out_len == in_len:
        return torch.arange(start, stop)
    scale = torch.tensor(in_len / out_len, dtype=torch.float32)
    idx = (torch.arange(start, stop, dtype=torch.float32) * scale).floor_().long()
    return idx.clamp_(max=in_len - 1)


def _linear_index(
    out_len: int, in_len: int, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i0, i1, w1) of PyTorch's bilinear resize (align_corners=False) for outputs start:stop."""
    if out_len == in_len:
        i = torch.arange(start, stop)
        return i, i, torch.zeros(stop - start)
    scale = torch.tensor(in_len / out_len, dtype=torch.float32)
    src = ((torch.arange(start, stop, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.long().clamp_(max=in_len - 1)
    i1 = torch.where(i0 < in_len - 1, i0 + 1, i0)
    w1 = (src - i0).clamp_(0, 1)
    return i0, i1, w1


def _take_cols(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[..., cols]`` for a 2D/3D tensor; gather is several times faster than fancy indexing
    on the last dim."""
    shape = (*x.shape[:-1], cols.numel())
    return torch.gather(x, -1, cols.view(*([1] * (x.dim() - 1)), -1).expand(shape))


def bilinear_taps(
    in_size: tuple[int, int], size: tuple[int, int], box: tuple[int, int, int, int], flip: bool
) -> Taps:
    """Where ``resize_crop_bilinear`` reads: source rows (ry0, ry1, wy) and columns (cx0, cx1, wx)
    of every output pixel of ``box`` in an ``in_size`` image resized to ``size``, flipped if
    ``flip``, and whether it interpolates rows first. The device path uses the same taps."""
    y0, y1, x0, x1 = box
    ry0, ry1, wy = _linear_index(size[0], in_size[0], y0, y1)
    cx0, cx1, wx = _linear_index(size[1], in_size[1], x0, x1)
    if flip:
        cx0, cx1, wx = cx0.flip(0), cx1.flip(0), wx.flip(0)
    # The source window the box reads from; rows first is cheaper when the window is wide.
    win_h = int(ry1[-1]) + 1 - int(ry0[0])
    win_w = int(max(cx1[0], cx1[-1])) + 1 - int(min(cx0[0], cx0[-1]))
    rows_first = (y1 - y0) * win_w <= win_h * (x1 - x0)
    return ry0, ry1, wy, cx0, cx1, wx, rows_first


def resize_crop_bilinear(
    image: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int], flip: bool = False
) -> torch.Tensor:
    """``resize_image(image, size)[:, y0:y1, x0:x1]`` (then flipped left-right if ``flip``)
    computed only inside the box (far cheaper at a resize ratio of 2: docs/data.md)."""
    ry0, ry1, wy, cx0, cx1, wx, rows_first = bilinear_taps(
        (image.shape[1], image.shape[2]), size, box, flip
    )
    # Only the source window the box reads from (a view); gathers run on uint8, then float.
    ylo, yhi = int(ry0[0]), int(ry1[-1]) + 1
    xlo, xhi = int(min(cx0[0], cx0[-1])), int(max(cx1[0], cx1[-1])) + 1
    src = image[:, ylo:yhi, xlo:xhi]
    ry0, ry1, cx0, cx1 = ry0 - ylo, ry1 - ylo, cx0 - xlo, cx1 - xlo
    wy, wx = wy.view(1, -1, 1), wx.view(1, 1, -1)
    f32 = torch.float32
    if rows_first:
        rows = torch.lerp(src[:, ry0].to(f32), src[:, ry1].to(f32), wy)
        out = torch.lerp(_take_cols(rows, cx0), _take_cols(rows, cx1), wx)
    else:
        src = src.contiguous()
        cols = torch.lerp(_take_cols(src, cx0).to(f32), _take_cols(src, cx1).to(f32), wx)
        out = torch.lerp(cols[:, ry0], cols[:, ry1], wy)
    return out.round_().clamp_(0, 255)


def resize_crop_nearest(
    label: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int], flip: bool = False
) -> torch.Tensor:
    """``resize_label(label, size)[y0:y1, x0:x1]`` (flipped if ``flip``), only inside the box."""
    y0, y1, x0, x1 = box
    rows = _nearest_index(size[0], label.shape[0], y0, y1)
    cols = _nearest_index(size[1], label.shape[1], x0, x1)
    if flip:
        cols = cols.flip(0)
    return _take_cols(label[rows], cols)


# ---------------------------------------------------------------- photometric distortion


def _rgb_to_hsv8(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RGB 0-255 [..., 3, H, W] -> OpenCV 8-bit HSV as floats: H in 0..179 (2 degrees), S, V
    0..255, each [..., H, W]. Elementwise, so a batch gives each image's values exactly."""
    r, g, b = img.unbind(-3)
    v = img.amax(-3)
    diff = v - img.amin(-3)
    # Hue sector numerators; with diff == 0 every numerator is 0, so the clamp below is safe.
    num = torch.where(v == r, g - b, torch.where(v == g, b - r + 2.0 * diff, r - g + 4.0 * diff))
    h = num.div_(diff.clamp(min=1e-6)).mul_(30.0).round_().remainder_(180.0)  # 60 deg / 2
    s = diff.mul_(255.0).div_(v.clamp(min=1.0)).round_()
    return h, s, v


def _hsv8_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_rgb_to_hsv8``; rounded to integer 0..255 like OpenCV's 8-bit output."""
    h6 = h * (2.0 / 60.0)  # sector position in [0, 6)
    sv = s * (v / 255.0)
    out = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = (h6 + n).remainder_(6.0)
        out.append(v - sv * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=-3).round_().clamp_(0, 255)


def _coin() -> bool:
    return bool(torch.randint(2, ()).item())


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi).item())


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on a float [3,H,W] image with integer values 0..255.
    Brightness, then contrast first (mode 1) or last (mode 0) as decided by randint(2), then
    saturation and hue in OpenCV 8-bit HSV; each step with p=0.5; every step clips to 0..255 and
    truncates to integers like mmseg's ``astype(np.uint8)``. Hue shifts by randint(-hue_delta,
    hue_delta) (high exclusive, like numpy) in 2-degree units, modulo 180."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return x.mul(alpha).add_(beta).clamp_(0, 255).trunc_()

    def draw(self) -> dict[str, float | None]:
        """The random parameters, drawn in mmseg's order: brightness delta, mode, contrast
        (mode 1), saturation factor, hue delta, contrast (mode 0); None for a skipped step."""
        d = self.brightness_delta
        p: dict[str, float | None] = {"brightness": _uniform(-d, d) if _coin() else None}
        p["contrast"] = None
        p["mode"] = int(torch.randint(2, ()).item())
        if p["mode"] == 1 and _coin():
            p["contrast"] = _uniform(*self.contrast_range)
        p["saturation"] = _uniform(*self.saturation_range) if _coin() else None
        p["hue"] = None
        if _coin():
            p["hue"] = int(torch.randint(-self.hue_delta, self.hue_delta, ()).item())
        if p["mode"] == 0 and _coin():
            p["contrast"] = _uniform(*self.contrast_range)
        return p

    def apply(self, img: torch.Tensor, p: dict[str, float | None]) -> torch.Tensor:
        """The distortion with the parameters of ``draw``."""
        if p["brightness"] is not None:
            img = self._convert(img, beta=p["brightness"])
        if p["mode"] == 1 and p["contrast"] is not None:
            img = self._convert(img, alpha=p["contrast"])
        if p["saturation"] is not None:
            h, s, v = _rgb_to_hsv8(img)
            img = _hsv8_to_rgb(h, self._convert(s, alpha=p["saturation"]), v)
        if p["hue"] is not None:
            h, s, v = _rgb_to_hsv8(img)
            img = _hsv8_to_rgb((h + p["hue"]).remainder_(180.0), s, v)
        if p["mode"] == 0 and p["contrast"] is not None:
            img = self._convert(img, alpha=p["contrast"])
        return img

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.apply(img, self.draw())

    def __repr__(self) -> str:
        return (
            f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, "
            f"contrast_range={self.contrast_range}, saturation_range={self.saturation_range}, "
            f"hue_delta={self.hue_delta})"
        )


# ---------------------------------------------------------------- crop


def crop_ok(
    label_crop: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX
) -> bool:
    """mmseg's test: more than one non-ignored class, and the largest below ``cat_max_ratio``
    of the crop's non-ignored pixels."""
    counts = torch.bincount(label_crop.reshape(-1).long(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    if counts.numel() <= 1:
        return False
    return bool(counts.max().item() / counts.sum().item() < cat_max_ratio)


def random_crop_box(size: tuple[int, int], crop_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """mmseg ``get_crop_bbox``: (y0, y1, x0, x1), clipped to the image when it is smaller."""
    h, w = size
    oy = int(torch.randint(max(h - crop_size[0], 0) + 1, ()).item())
    ox = int(torch.randint(max(w - crop_size[1], 0) + 1, ()).item())
    return oy, min(oy + crop_size[0], h), ox, min(ox + crop_size[1], w)


def pad_to(
    image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pad bottom/right to ``size``: 0 for the (normalised) image, 255 for the label."""
    ph, pw = size[0] - image.shape[1], size[1] - image.shape[2]
    if ph <= 0 and pw <= 0:
        return image, label
    ph, pw = max(ph, 0), max(pw, 0)
    image = F.pad(image, (0, pw, 0, ph), value=0.0)
    if label is not None:
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, label


# ---------------------------------------------------------------- the two pipelines


class TrainTransform:
    """Random resize (keep ratio) -> cat_max_ratio crop -> flip -> photometric -> normalise ->
    pad, with mmseg's defaults from ``RECIPE``. Sizes are (H, W); ``mean`` / ``std`` are RGB on
    the 0-255 scale (default ImageNet's, the recipe's; a checkpoint records them in its meta)."""

    def __init__(
        self,
        crop_size: tuple[int, int] = RECIPE.crop_size,
        scale: tuple[int, int] = RECIPE.scale,
        ratio_range: tuple[float, float] = RECIPE.ratio_range,
        cat_max_ratio: float = RECIPE.cat_max_ratio,
        flip_prob: float = RECIPE.flip_prob,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
        max_crop_tries: int = 10,
        mean: Sequence[float] = MEAN_RGB,
        std: Sequence[float] = STD_RGB,
    ) -> None:
        if min(crop_size) <= 0 or min(scale) <= 0:
            raise ValueError(f"crop_size {crop_size} and scale {scale} must be positive (H, W)")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range {ratio_range} must satisfy 0 < min <= max")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.ignore_index = ignore_index
        self.max_crop_tries = max_crop_tries
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean {mean} and std {std} must be 3 RGB values, std > 0")

    def sample_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The resized (h, w): mmseg's ``random_sample_ratio`` then mmcv's rescale rule."""
        lo, hi = self.ratio_range
        ratio = float(torch.rand(()).item()) * (hi - lo) + lo
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return rescale_size(size, target)

    def sample_crop(self, label: torch.Tensor, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """mmseg's RandomCrop box: retry up to ``max_crop_tries`` times while the crop fails
        ``crop_ok``; after the last failure a fresh unchecked box is used, as mmseg does."""
        box = random_crop_box(size, self.crop_size)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_crop_tries):
                crop = resize_crop_nearest(label, size, box)
                if crop_ok(crop, self.cat_max_ratio, self.ignore_index):
                    break
                box = random_crop_box(size, self.crop_size)
        return box

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if label is None:
            raise ValueError("TrainTransform needs a label (the crop looks at it)")
        if image.shape[1:] != label.shape:
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ")
        p = self.draw(label)
        img = resize_crop_bilinear(image, p["size"], p["box"], p["flip"])
        lab = resize_crop_nearest(label, p["size"], p["box"], p["flip"])
        if self.photometric is not None:
            img = self.photometric.apply(img, p["photometric"])
        img, lab = pad_to(normalize(img, self.mean, self.std), lab, self.crop_size)
        return img, lab.long()

    def draw(self, label: torch.Tensor) -> dict:
        """The random choices for one [H, W] label (and its image), in this order: resized
        size, crop box (the cat_max_ratio test needs only the label), flip, photometric."""
        size = self.sample_size((label.shape[0], label.shape[1]))
        box = self.sample_crop(label, size)
        flip = bool(torch.rand(()).item() < self.flip_prob)
        photo = self.photometric.draw() if self.photometric is not None else None
        return {"size": size, "box": box, "flip": flip, "photometric": photo}

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale={self.scale}, "
            f"ratio_range={self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, "
            f"flip_prob={self.flip_prob}, photometric={self.photometric is not None}, "
            f"mean={self.mean}, std={self.std})"
        )


class EvalTransform:
    """Resize the image to ``scale`` (H, W) keeping its ratio (None: keep the size), in 0-255 and
    rounded, as mmseg resizes the uint8 image; not normalised: the evaluator normalises each
    view with the checkpoint's mean/std. Returns the uint8 image [3,h,w] and the label at its
    original resolution (int64) for evaluation."""

    def __init__(self, scale: tuple[int, int] | None = RECIPE.scale) -> None:
        self.scale = None if scale is None else (int(scale[0]), int(scale[1]))

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.scale is not None:
            size = rescale_size((image.shape[1], image.shape[2]), self.scale)
            if size != tuple(image.shape[1:]):
                image = resize_image(image, size).to(torch.uint8)  # exact: rounded, 0..255
        return image, None if label is None else label.long()

    def __repr__(self) -> str:
        return f"EvalTransform(scale={self.scale})"
