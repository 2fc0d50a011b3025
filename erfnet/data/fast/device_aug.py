"""Device-side augmentation (``train.py --gpu-aug``): the training batch of ``TrainTransform``,
computed on the GPU.

Loader workers only decode the pair and draw the random choices (``TrainTransform.draw``), as
``DeviceAugDataset`` items: the uint8 pair as decoded, the crop window's sampling taps
(``bilinear_taps``, the function the worker path uses) and the photometric parameters.
``DeviceAugment`` then gathers, interpolates, distorts, normalises and pads the whole batch on the
device.

For the same seed the batch equals the worker path's, value for value (tested on the CPU): the same
draws in the same order from the same per-sample seeds, and every operation is the worker path's
elementwise one on the same operands (the same taps, ``torch.lerp`` weights and order,
``PhotoMetricDistortion``'s own conversions), so resume stays exact with or without ``--gpu-aug``.
On CUDA the float kernels may round differently (FMA): a pixel can differ by one level at a rounding
tie.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from erfnet.config import IGNORE_INDEX
from erfnet.data import transforms
from erfnet.data.cityscapes import DatasetError

# Per-sample entries of a DeviceAugDataset item besides "image" and "label".
# fmt: off
PARAM_KEYS = ("ry0", "ry1", "wy", "cx0", "cx1", "wx", "rows_first", "lrows", "lcols", "valid",
              "brightness", "contrast_first", "saturation", "saturation_on", "hue", "hue_on",
              "contrast_last")
# fmt: on


def _padded(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` extended to length ``n`` with zeros (those outputs are padding, masked later)."""
    return F.pad(t, (0, n - t.numel())) if t.numel() < n else t


def draw_params(
    transform: transforms.TrainTransform, label: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One sample's random choices as fixed-size tensors (collatable): ``transform.draw`` on
    the [H, W] label, the bilinear / nearest taps of the crop window padded to ``crop_size``,
    and the photometric parameters (neutral values for skipped steps)."""
    ch, cw = transform.crop_size
    h, w = int(label.shape[0]), int(label.shape[1])
    p = transform.draw(label)
    size, box, flip = p["size"], p["box"], p["flip"]
    ry0, ry1, wy, cx0, cx1, wx, rows_first = transforms.bilinear_taps((h, w), size, box, flip)
    lrows = transforms._nearest_index(size[0], h, box[0], box[1])
    lcols = transforms._nearest_index(size[1], w, box[2], box[3])
    if flip:
        lcols = lcols.flip(0)
    rows = {"ry0": ry0, "ry1": ry1, "wy": wy, "lrows": lrows}
    cols = {"cx0": cx0, "cx1": cx1, "wx": wx, "lcols": lcols}
    out = {k: _padded(t, ch) for k, t in rows.items()}
    out.update({k: _padded(t, cw) for k, t in cols.items()})
    out["rows_first"] = torch.tensor(rows_first)
    out["valid"] = torch.tensor([box[1] - box[0], box[3] - box[2]])
    neutral = {"brightness": None, "mode": 0, "contrast": None, "saturation": None, "hue": None}
    pm = p["photometric"] or neutral
    contrast = pm["contrast"] if pm["contrast"] is not None else 1.0
    f32 = torch.float32
    out.update(
        brightness=torch.tensor(pm["brightness"] or 0.0, dtype=f32),
        contrast_first=torch.tensor(contrast if pm["mode"] == 1 else 1.0, dtype=f32),
        contrast_last=torch.tensor(contrast if pm["mode"] == 0 else 1.0, dtype=f32),
        saturation=torch.tensor(1.0 if pm["saturation"] is None else pm["saturation"], dtype=f32),
        saturation_on=torch.tensor(pm["saturation"] is not None),
        hue=torch.tensor(float(pm["hue"] or 0), dtype=f32),
        hue_on=torch.tensor(pm["hue"] is not None),
    )
    return out


class DeviceAugDataset(torch.utils.data.Dataset):
    """Items ``{"image": uint8 [3,H,W], "label": uint8 [H,W], <PARAM_KEYS>...}`` of a dataset
    with ``load(index)`` (the decoded pair) and a ``TrainTransform`` as its ``transform``."""

    def __init__(self, dataset: Any) -> None:
        transform = getattr(dataset, "transform", None)
        loads = callable(getattr(dataset, "load", None))
        if not isinstance(transform, transforms.TrainTransform) or not loads:
            raise DatasetError(
                f"--gpu-aug needs a dataset with load(index) and a TrainTransform; got "
                f"{type(dataset).__name__} with transform {type(transform).__name__}"
            )
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.dataset.load(index)
        if label is None:
            raise DatasetError(f"--gpu-aug: sample {index} has no label to train on")
        return {"image": image, "label": label, **draw_params(self.transform, label)}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the items (``default_collate``: in a worker, straight into shared memory); images
    and labels of different sizes are padded bottom / right first (the taps index the original
    pixels, so the padding is never read)."""
    h = max(int(s["image"].shape[1]) for s in samples)
    w = max(int(s["image"].shape[2]) for s in samples)

    def pad(t: torch.Tensor) -> torch.Tensor:
        dh, dw = h - t.shape[-2], w - t.shape[-1]
        return F.pad(t, (0, dw, 0, dh)) if dh or dw else t

    return default_collate(
        [{**s, "image": pad(s["image"]), "label": pad(s["label"])} for s in samples]
    )


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [n, c, H, W], rows [n, h] -> x[i, :, rows[i], :] as [n, c, h, W]."""
    n, c, _, w = x.shape
    return torch.gather(x, 2, rows.view(n, 1, -1, 1).expand(n, c, rows.shape[1], w))


def _gather_cols(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x [n, c, H, W], cols [n, w] -> x[i, :, :, cols[i]] as [n, c, H, w]."""
    n, c, h, _ = x.shape
    return torch.gather(x, 3, cols.view(n, 1, 1, -1).expand(n, c, h, cols.shape[1]))


def resize_crop_batch(
    image: torch.Tensor, a: dict[str, torch.Tensor], rows_first: bool
) -> torch.Tensor:
    """``resize_crop_bilinear`` of every image of a uint8 [n,3,H,W] batch with its taps, all in
    the order ``rows_first`` says; float32 rounded to integers."""
    f32 = torch.float32
    wy, wx = a["wy"][:, None, :, None], a["wx"][:, None, None, :]
    r0, r1, c0, c1 = a["ry0"], a["ry1"], a["cx0"], a["cx1"]
    if rows_first:
        rows = torch.lerp(_gather_rows(image, r0).to(f32), _gather_rows(image, r1).to(f32), wy)
        out = torch.lerp(_gather_cols(rows, c0), _gather_cols(rows, c1), wx)
    else:
        cols = torch.lerp(_gather_cols(image, c0).to(f32), _gather_cols(image, c1).to(f32), wx)
        out = torch.lerp(_gather_rows(cols, r0), _gather_rows(cols, r1), wy)
    return out.round_().clamp_(0, 255)


def photometric_batch(img: torch.Tensor, a: dict[str, torch.Tensor]) -> torch.Tensor:
    """``PhotoMetricDistortion.apply`` on a batch, with per-image parameters. Brightness and
    contrast are exact identities at their neutral values (x * 1 + 0 on integers); the HSV
    steps are selected per image, since their 8-bit round trip is not."""
    conv = transforms.PhotoMetricDistortion._convert

    def per_image(t: torch.Tensor, dims: int = 3) -> torch.Tensor:
        return t.view(-1, *([1] * dims))

    img = conv(img, beta=per_image(a["brightness"]))
    img = conv(img, alpha=per_image(a["contrast_first"]))
    if bool(a["saturation_on_cpu"].any()):
        h, s, v = transforms._rgb_to_hsv8(img)
        new = transforms._hsv8_to_rgb(h, conv(s, alpha=per_image(a["saturation"], 2)), v)
        img = torch.where(per_image(a["saturation_on"]), new, img)
    if bool(a["hue_on_cpu"].any()):
        h, s, v = transforms._rgb_to_hsv8(img)
        new = transforms._hsv8_to_rgb((h + per_image(a["hue"], 2)).remainder_(180.0), s, v)
        img = torch.where(per_image(a["hue_on"]), new, img)
    return conv(img, alpha=per_image(a["contrast_last"]))


def resolve_gpu_aug(flag: bool | None, device: torch.device, dataset: Any) -> DeviceAugment | None:
    """``--gpu-aug``: True on, False off, None (auto) on for CUDA when the dataset supports it
    (``load`` and a ``TrainTransform``); on asked for an unsupported dataset is a DatasetError."""
    if flag is False or (flag is None and device.type != "cuda"):
        return None
    try:
        DeviceAugDataset(dataset)
    except DatasetError:
        if flag:
            raise
        return None
    return DeviceAugment(dataset.transform)


class DeviceAugment:
    """Turns a collated ``DeviceAugDataset`` batch into the training batch on ``device``:
    (float32 [N,3,h,w] normalised images, int64 [N,h,w] labels), equal to the worker path's."""

    def __init__(self, transform: transforms.TrainTransform) -> None:
        self.transform = transform
        # mean / std as tensors on each device, made once: a tuple would be uploaded (and the
        # stream waited for) at every iteration.
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, batch: dict[str, torch.Tensor], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tf, device = self.transform, torch.device(device)
        (ch, cw), n = tf.crop_size, batch["image"].shape[0]
        a = {k: batch[k].to(device, non_blocking=True) for k in ("image", "label", *PARAM_KEYS)}
        # Decisions made on the host copies: no device synchronisation.
        a["saturation_on_cpu"], a["hue_on_cpu"] = batch["saturation_on"], batch["hue_on"]
        img = torch.empty(n, 3, ch, cw, dtype=torch.float32, device=device)
        for order in (True, False):
            idx = torch.nonzero(batch["rows_first"] == order).flatten()
            if idx.numel() == 0:
                continue
            if idx.numel() == n:
                img = resize_crop_batch(a["image"], a, order)
            else:
                idx = idx.to(device, non_blocking=True)
                sub = {k: a[k].index_select(0, idx) for k in ("ry0", "ry1", "wy", "cx0", "cx1")}
                sub["wx"] = a["wx"].index_select(0, idx)
                img[idx] = resize_crop_batch(a["image"].index_select(0, idx), sub, order)
        lab = _gather_cols(_gather_rows(a["label"][:, None], a["lrows"]), a["lcols"])[:, 0]
        if tf.photometric is not None:
            img = photometric_batch(img, a)
        if device not in self._stats:
            self._stats[device] = tuple(  # type: ignore[assignment]
                torch.tensor(v, dtype=torch.float32, device=device) for v in (tf.mean, tf.std)
            )
        img = transforms.normalize(img, *self._stats[device])
        valid = batch["valid"]
        if bool((valid[:, 0] < ch).any() or (valid[:, 1] < cw).any()):  # pad like pad_to
            rows = torch.arange(ch, device=device)[None] >= a["valid"][:, :1]  # [n, ch]
            cols = torch.arange(cw, device=device)[None] >= a["valid"][:, 1:]  # [n, cw]
            outside = rows[:, :, None] | cols[:, None, :]
            img.masked_fill_(outside[:, None], 0.0)
            lab = lab.masked_fill(outside, IGNORE_INDEX)
        return img, lab.long()

    def __repr__(self) -> str:
        return f"DeviceAugment({self.transform!r})"
