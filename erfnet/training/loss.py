"""The training loss as mmsegmentation computes it, not as PyTorch's defaults do: pixel-wise
cross-entropy, its normalisation (``segmentation_loss``), class weights and online hard example
mining (OHEM); train.py builds it from its flags with ``make_criterion``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from erfnet.config import IGNORE_INDEX
from erfnet.errors import UserError

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The two normalisations of the summed per-pixel loss (mmseg's ``avg_non_ignore`` False / True).
AVERAGE_OVER = ("all", "labelled")


class LossConfigError(UserError):
    """A loss setting or file that cannot be used; the message names the flag or the file."""


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    average_over: str = "all",
    class_weight: torch.Tensor | None = None,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """mmseg's ``CrossEntropyLoss`` (softmax, no sigmoid): logits [N, C, H, W], labels [N, H, W].

    As ``mmseg/models/losses/cross_entropy_loss.py`` (v0.20 and 1.x): the per-pixel CE map (with
    ``class_weight[y]``, 0 at ignored pixels) times ``pixel_weight`` (OHEM's kept mask), then
    ``average_over="all"`` (mmseg's default, ``avg_non_ignore=False``, the one the recipe ran):
    ``sum / (N * H * W)``, ignored pixels counting as zeros in the denominator; ``"labelled"``
    (1.x's ``avg_non_ignore=True``): ``sum / (number of labelled pixels)``, *not* the sum of their
    class weights (PyTorch's weighted mean), and not the number OHEM kept.

    Why it matters: the share of ignored pixels changes from batch to batch, so the labelled-pixel
    mean is a different objective, not an lr rescale (on a batch with 29.9 % ignored pixels it and
    every gradient are 1 / 0.701 = 1.427x mmseg's).
    """
    if average_over not in AVERAGE_OVER:
        raise ValueError(f"average_over must be one of {AVERAGE_OVER}, got {average_over!r}")
    loss = F.cross_entropy(
        logits, labels, weight=class_weight, reduction="none", ignore_index=ignore_index
    )
    if pixel_weight is not None:
        loss = loss * pixel_weight
    if average_over == "all":
        return loss.mean()
    # mmseg: avg_factor = label.numel() - (label == ignore_index).sum(); no guard for 0 there
    # either (an all-ignored batch gives 0 / 0 = nan, which train_step skips as non-finite).
    return loss.sum() / (labels != ignore_index).sum()


@torch.no_grad()
def ohem_keep_mask(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    thresh: float,
    min_kept: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """mmseg's ``OHEMPixelSampler.sample`` with a ``thresh`` (``ohem_pixel_sampler.py`` v0.20,
    ``mmseg/structures/sampler`` 1.x), for ``segmentation_loss(pixel_weight=...)``: the float mask
    [N, H, W] of the labelled pixels whose true-class probability is below ``max(thresh, the
    (min_kept x N)-th lowest)``; ``min_kept`` is per image, N the images of this process's batch.
    """
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    prob = F.softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    valid_prob = prob[valid]
    threshold = torch.as_tensor(float(thresh), device=prob.device, dtype=prob.dtype)
    if valid_prob.numel() > 0:
        sorted_prob = valid_prob.sort().values
        kth = sorted_prob[min(min_kept * labels.shape[0], sorted_prob.numel() - 1)]
        threshold = torch.maximum(threshold, kth)
    return (valid & (prob < threshold)).to(logits.dtype)


@dataclass
class SegmentationCriterion:
    """mmseg's CrossEntropyLoss as configured by train.py's loss flags (see ``make_criterion``)."""

    ignore_index: int = IGNORE_INDEX
    average_over: str = "all"
    class_weights: tuple[float, ...] | None = None
    ohem: tuple[float, int] | None = None
    # the class weights as a tensor, one copy per (device, dtype) the logits come in
    _weight_tensors: dict = field(default_factory=dict, repr=False)

    def class_weight(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        key = (logits.device, logits.dtype)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.tensor(
                self.class_weights, dtype=key[1], device=key[0]
            )
        return self._weight_tensors[key]

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pixel_weight = None
        if self.ohem is not None:
            thresh, min_kept = self.ohem
            pixel_weight = ohem_keep_mask(
                logits, labels, thresh=thresh, min_kept=min_kept, ignore_index=self.ignore_index
            )
        return segmentation_loss(
            logits,
            labels,
            ignore_index=self.ignore_index,
            average_over=self.average_over,
            class_weight=self.class_weight(logits),
            pixel_weight=pixel_weight,
        )


def make_criterion(
    *,
    ignore_index: int = IGNORE_INDEX,
    avg_non_ignore: bool = False,
    class_weights: Sequence[float] | None = None,
    ohem: tuple[float, int] | None = None,
) -> Criterion:
    """``criterion(logits, labels)`` for train_step, from train.py's loss flags. ``ohem``'s kept
    mask multiplies the per-pixel loss; the denominator stays the one ``avg_non_ignore`` chooses,
    as in mmseg (``weight=seg_weight`` of its loss)."""
    return SegmentationCriterion(
        ignore_index=ignore_index,
        average_over="labelled" if avg_non_ignore else "all",
        class_weights=None if class_weights is None else tuple(float(w) for w in class_weights),
        ohem=ohem,
    )


def load_class_weights(path: str | Path, class_names: Sequence[str]) -> list[float]:
    """The per-class loss weights of a JSON file ``{"names": [...], "weights": [...]}``, checked
    against the dataset's classes; ``LossConfigError`` names the file."""
    where = f"--class-weights {path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LossConfigError(f"{where}: no such file") from None
    except OSError as e:
        raise LossConfigError(f"{where}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LossConfigError(f"{where}: not a JSON file ({e})") from None
    except RecursionError:  # thousands of nested brackets: json's parser recurses
        raise LossConfigError(f"{where}: JSON nested too deeply to be a weights file") from None
    if not isinstance(data, dict) or "weights" not in data:
        raise LossConfigError(
            f'{where}: expected a JSON object {{"names": [...], "weights": [w0, w1, ...],'
            ' "method": "..."}'
        )
    weights = data["weights"]
    valid_numbers = isinstance(weights, list) and all(
        isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights
    )
    if not valid_numbers:
        raise LossConfigError(f'{where}: "weights" must be a list of finite numbers >= 0')
    if len(weights) != len(class_names):
        raise LossConfigError(
            f"{where}: {len(weights)} weights, but the dataset has {len(class_names)} classes"
        )
    names = data.get("names")
    if names is not None and list(names) != list(class_names):
        raise LossConfigError(
            f'{where}: its "names" {list(names)} are not the dataset\'s classes'
            f" {list(class_names)} (in this order)"
        )
    if not any(w > 0 for w in weights):
        raise LossConfigError(f"{where}: all weights are 0")
    return [float(w) for w in weights]
