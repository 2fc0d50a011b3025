"""The accuracy gate of every reduced-precision export, scored on held-out images.

Calibration and scoring images are disjoint: the train split of the dataset under ``--calib-data``
calibrates and its val split is scored; a dataset with only one of them is cut into two disjoint
halves (even and odd positions). Each scored image goes through the project's protocol (resized
to the network input size in 0-255 and rounded, normalised with the checkpoint's mean/std, logits
resized bilinearly to the label size, argmax; an export that ends in an argmax has its labels
resized nearest, and its fp32 reference is then the argmax at the input size too) for the fp32
PyTorch model and for the export, and ``ConfusionMatrix`` (erfnet.evaluation.metrics) scores
both against the labels. The gate refuses an export whose mIoU drops by more than
``max_miou_drop`` points or whose labels agree with fp32 on fewer than ``min_agreement`` percent
of the scored pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from erfnet.config import RECIPE
from erfnet.data.decode import DatasetError
from erfnet.data.folder import load_spec
from erfnet.data.from_args import dataset_from_args
from erfnet.data.transforms import rescale_size
from erfnet.deploy.exported import ExportError
from erfnet.evaluation.inference import network_input, resize_logits
from erfnet.evaluation.metrics import ConfusionMatrix

DEFAULT_MAX_MIOU_DROP = 0.5  # mIoU points
DEFAULT_MIN_AGREEMENT = 98.5  # percent of scored pixels whose label equals the fp32 label
# An fp32 export is exact up to float rounding: its thresholds (the .pth's mIoU to 0.05 points).
FP32_MAX_MIOU_DROP = 0.05
FP32_MIN_AGREEMENT = 99.99
Size = tuple[int, int]


class GateError(ExportError):
    """An export refused by the gate (the message names the figure it missed), or a gate that
    cannot run (no held-out images, other classes)."""


@dataclass(frozen=True)
class Picks:
    """Images of one dataset split, by index."""

    dataset: Any  # CityscapesDataset or FolderDataset
    indices: list[int]

    def files(self) -> list[str]:
        return [str(self.dataset.samples[i].image) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class HeldOut:
    """Disjoint calibration and scored images, and how they were chosen."""

    calibration: Picks
    scored: Picks
    how: str


def _open_split(root: Path, spec: Any, split: str) -> Any | None:
    """``split`` of the dataset at ``root`` (Cityscapes layout, or the folder dataset ``spec``
    describes) with labels, as the --data flags would open it; None where it cannot be read."""
    kind = "cityscapes" if spec is None else "folder"
    data = SimpleNamespace(data=kind, data_root=str(root), classes=spec)
    try:
        return dataset_from_args(data, [split], labels=True)[0]
    except DatasetError:
        return None


def _spread(length: int, count: int, offset: int = 0, step: int = 1) -> list[int]:
    """``count`` positions spread evenly over ``offset, offset + step, ... < length`` (0: all)."""
    pool = list(range(offset, length, step))
    if count <= 0 or count >= len(pool):
        return pool
    return [pool[int(i)] for i in np.linspace(0, len(pool) - 1, count).round()]


def held_out_images(
    root: str | Path, classes: str | Path | None, calib_images: int, score_images: int
) -> HeldOut:
    """Calibration images from train and scored images from val of the dataset at ``root``
    (Cityscapes layout, or the folder dataset ``classes`` describes), or the even / odd halves
    of its only split. ``calib_images`` / ``score_images``: how many, spread evenly (0 = all)."""
    root = Path(root)
    spec = load_spec(classes) if classes is not None else None
    names = sorted(spec.splits) if spec is not None and spec.splits else ["train", "val"]
    splits = {name: _open_split(root, spec, name) for name in names}
    found = {name: ds for name, ds in splits.items() if ds is not None and len(ds) > 0}
    if "train" in found and "val" in found:
        calib, scored = found["train"], found["val"]
        return HeldOut(
            Picks(calib, _spread(len(calib), calib_images)),
            Picks(scored, _spread(len(scored), score_images)),
            "calibrated on train, scored on val",
        )
    if len(found) != 1 or len(next(iter(found.values()))) < 2:
        raise GateError(
            f"--calib-data {root}: need a train and a val split, or one split of at least 2"
            f" labelled images to halve (found {sorted(found) or 'none'})"
        )
    name, ds = next(iter(found.items()))
    return HeldOut(
        Picks(ds, _spread(len(ds), calib_images, 0, 2)),
        Picks(ds, _spread(len(ds), score_images, 1, 2)),
        f"calibrated on the even and scored on the odd positions of split '{name}'",
    )


def check_classes(dataset: Any, meta: dict[str, Any], root: str | Path) -> None:
    """GateError unless ``dataset`` has the checkpoint's classes (a trailing "void" output, as
    erfnet_pytorch's, aside)."""
    mine = list(meta.get("class_names") or [])
    theirs = [str(c) for c in dataset.classes]
    void = meta.get("void_class")
    if mine == theirs or (void == len(theirs) and mine[:-1] == theirs):
        return
    raise GateError(
        f"--calib-data {root}: its {len(theirs)} classes ({', '.join(theirs[:3])}, ...) are not"
        f" the checkpoint's {len(mine)} ({', '.join(mine[:3])}, ...); calibrate and score on data"
        " labelled with the checkpoint's classes (a folder dataset: --calib-classes FILE)"
    )


def input_size(label_size: Sequence[int], fixed: Size | None) -> Size:
    """The network input size for an image: the export's fixed size, else the test protocol's
    (the image rescaled into ``RECIPE.scale`` keeping its ratio)."""
    if fixed is not None:
        return fixed
    return rescale_size((int(label_size[0]), int(label_size[1])), RECIPE.scale)


class NetworkInputs(Sequence):
    """The normalised float32 [1, 3, h, w] network inputs of some images, loaded on access (a
    calibration set at 1024x2048 would otherwise hold 25 MB per image)."""

    def __init__(
        self, picks: Picks, mean: Sequence[float], std: Sequence[float], fixed: Size | None
    ) -> None:
        self.picks, self.mean, self.std, self.fixed = picks, mean, std, fixed

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            picks = Picks(self.picks.dataset, self.picks.indices[i])
            return NetworkInputs(picks, self.mean, self.std, self.fixed)
        image, _ = self.picks.dataset.load(self.picks.indices[i])
        size = input_size(image.shape[-2:], self.fixed)
        return network_input(image[None].float(), size, self.mean, self.std).numpy()


def protocol_labels(
    out: torch.Tensor, label_size: Sequence[int], labels_out: bool = False
) -> torch.Tensor:
    """Class map [H, W] at the label size from a network output: logits are resized bilinearly
    and argmaxed (the test protocol); labels (``labels_out``, or an integer output) are resized
    nearest."""
    if not out.is_floating_point():
        labels = out[:, None].float()
    elif labels_out:
        labels = out.argmax(1, keepdim=True).float()
    else:
        return resize_logits(out.float(), label_size).argmax(1)[0]
    size = (int(label_size[0]), int(label_size[1]))
    return F.interpolate(labels, size=size, mode="nearest")[0, 0].long()


def class_maps(
    model: Callable[[torch.Tensor], torch.Tensor],
    picks: Picks,
    meta: dict[str, Any],
    fixed: Size | None,
    labels_out: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(class map, ground-truth labels) at the label size for each image of ``picks``, one at
    a time, through the project's protocol (``network_input``, then ``protocol_labels``)."""
    for i in picks.indices:
        image, label = picks.dataset.load(i)
        size = input_size(label.shape, fixed)
        x = network_input(image[None].float(), size, meta["mean"], meta["std"])
        # Not across the yield: a generator left suspended (zip stops at the shorter one) would
        # keep the caller in inference mode, autograd off for the rest of the process.
        with torch.inference_mode():
            labels = protocol_labels(model(x), label.shape, labels_out)
        yield labels, label


def compare_maps(
    reference: Iterable[tuple[torch.Tensor, torch.Tensor]],
    exported: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_scored: int,
    num_outputs: int,
) -> dict[str, Any]:
    """mIoU (percent) of both sets of class maps against their labels, the drop in points and
    the pixel agreement (percent) between them."""
    cms = {name: ConfusionMatrix(num_outputs) for name in ("fp32", "export")}
    equal = total = 0
    for (ref, label), (got, _) in zip(reference, exported, strict=True):
        cms["fp32"].update(ref, label)
        cms["export"].update(got, label)
        equal += int((ref == got).sum())
        total += ref.numel()
    fp32, export = (cms[name].compute(num_scored)["mIoU"] for name in ("fp32", "export"))
    return {
        "fp32_miou": fp32,
        "export_miou": export,
        "miou_drop": fp32 - export,
        "agreement": 100.0 * equal / total,
        "scored_pixels": total,
    }


def score_export(
    reference: nn.Module,
    exported: Callable[[torch.Tensor], torch.Tensor],
    picks: Picks,
    meta: dict[str, Any],
    fixed: Size | None,
    labels_out: bool,
) -> dict[str, Any]:
    """mIoU (percent) of the fp32 ``reference`` and of ``exported`` on ``picks``, the drop in
    points and the pixel agreement (percent) of their class maps at the label size (one image
    at a time: a 1024x2048 class map is 16 MB)."""
    ref = class_maps(reference, picks, meta, fixed, labels_out)
    got = class_maps(exported, picks, meta, fixed, labels_out)
    return compare_maps(ref, got, len(picks.dataset.classes), len(meta["class_names"]))


def check_gate(figures: dict[str, Any], max_miou_drop: float, min_agreement: float) -> None:
    """GateError naming the missed figure when the export fails either threshold."""
    missed = []
    if figures["agreement"] < min_agreement:
        missed.append(
            f"pixel agreement with fp32 {figures['agreement']:.2f}% < --min-agreement"
            f" {min_agreement:g}%"
        )
    if not figures["miou_drop"] <= max_miou_drop:  # a NaN mIoU fails too
        missed.append(
            f"mIoU drop {figures['miou_drop']:.2f} points (fp32 {figures['fp32_miou']:.2f} ->"
            f" {figures['export_miou']:.2f}) > --max-miou-drop {max_miou_drop:g}"
        )
    if missed:
        raise GateError(
            f"export refused by the accuracy gate on {figures['scored_images']} held-out"
            f" image(s): " + "; ".join(missed) + "; no file written"
        )


def check_self(figures: dict[str, Any], min_agreement: float) -> None:
    """GateError when an export's labels on the self-check's random input (no held-out images
    given) agree with fp32 on fewer than ``min_agreement`` percent of its pixels."""
    if figures["agreement"] < min_agreement:
        raise GateError(
            f"export refused by its self-check on {figures['input']}: pixel agreement with fp32"
            f" {figures['agreement']:.2f}% < --min-agreement {min_agreement:g}%; no file written"
        )
