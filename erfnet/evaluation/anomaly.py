"""Road-anomaly evaluation: the validation pack's layouts and mask rules, per-pixel anomaly
scores from one forward pass, and the exact metrics over a whole set (docs/anomaly.md).

The protocol, as the published ERFNet figures are made (the course code's ``evalAnomaly.py``,
its mistakes left out):

- Every image is read with PIL and converted to RGB, resized to ``size`` (default 512x1024) by
  PIL's bilinear resize of the 8-bit image (what torchvision's ``Resize`` does to a PIL image;
  PIL widens the filter when it shrinks, i.e. it antialiases), then normalised with the
  checkpoint's own mean / std (``model.meta``: an erfnet_pytorch conversion gives 0-1 inputs, an
  mmseg one ImageNet's mean / std). ``size=None`` keeps the image's own size.
- Its mask is resized with PIL's nearest rule (pixel centres) to the same size, then mapped to
  0 known / 1 anomaly / 255 ignored by the layout's rule. Images without an anomaly pixel are
  skipped and counted.
- The scores come from the logits at the network's input size, over all of the model's outputs
  (``known_only`` drops the void output named by ``meta["void_class"]``).
- The metrics (``anomaly_metrics``) are exact over every kept pixel of the set.

Memory: the scores of the kept pixels are stored once, float32, anomaly and known pixels in two
arrays whose lengths the mask check gives before the pass; nothing else grows with the set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from erfnet.data.transforms import normalize
from erfnet.errors import UserError
from erfnet.evaluation.anomaly_metrics import (
    AnomalyMetrics,
    Levels,
    levels,
    metrics_from_levels,
    sort_in_place,
)
from erfnet.evaluation.anomaly_sets import ANOMALY, KNOWN, AnomalySet, ImageEntry, Size, read_labels
from erfnet.evaluation.anomaly_sets import BENCHMARKS as BENCHMARKS  # re-exported
from erfnet.evaluation.anomaly_sets import BY_FOLDER as BY_FOLDER  # re-exported
from erfnet.evaluation.anomaly_sets import check_set as check_set  # re-exported
from erfnet.evaluation.anomaly_sets import find_sets as find_sets  # re-exported
from erfnet.evaluation.inference import (
    forward_logits,
    is_label_map,
    model_device,
    model_normalization,
    prefers_channels_last,
)
from erfnet.evaluation.inputs import as_image_batch
from erfnet.evaluation.settings import model_meta
from erfnet.evaluation.visualize import rgb_array

DEFAULT_SIZE = (512, 1024)
SCORES = ("msp", "maxlogit", "maxentropy", "energy", "void")


def _to_rgb_uint8(x: Any) -> np.ndarray:
    """One image in any form ``erfnet.predict`` takes (``inputs.as_image_batch``: a path, a PIL
    image, an HWC uint8 array, a CHW / 1CHW tensor) -> HWC uint8 RGB, the form PIL's resize
    needs; float 0-255 values are rounded."""
    batches = as_image_batch(x)
    if len(batches) != 1 or batches[0].shape[0] != 1:
        raise ValueError("anomaly_scores takes one image, not a batch or a list")
    return rgb_array(batches[0][0])


def resize_rgb(rgb: np.ndarray, size: Size | None) -> np.ndarray:
    """PIL's bilinear resize of an HWC uint8 image to ``size`` (H, W); None keeps it."""
    if size is None or rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def network_input(rgb: np.ndarray, model: Any) -> torch.Tensor:
    """[1, 3, H, W] float32: the 0-255 image normalised with the model's own mean / std."""
    mean, std = model_normalization(model)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]  # a writable copy
    return normalize(x.to(model_device(model) or x.device), mean, std)


def void_class(model: Any) -> int | None:
    """The void output's index (``meta["void_class"]``), None for a model without one."""
    v = model_meta(model).get("void_class")
    return None if v is None else int(v)


def scores_from_logits(
    logits: torch.Tensor,
    names: Sequence[str],
    temperature: float = 1.0,
    void: int | None = None,
    known_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-pixel scores [N, H, W] (higher = more anomalous) of logits z [N, C, H, W]:
    msp 1 - max softmax(z/T); maxlogit -max z; maxentropy -sum p log p, p = softmax(z/T);
    energy -T logsumexp(z/T); void softmax(z/T)[void]. ``known_only`` drops output ``void``
    first (the void score itself needs it)."""
    if (known_only or "void" in names) and void is None:
        raise ValueError("known_only and the void score need the model's void output index")
    if known_only:
        if "void" in names:
            raise ValueError("the void score is the void output's probability: not with known_only")
        keep = [c for c in range(logits.shape[1]) if c != void]
        logits = logits[:, keep]
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    out: dict[str, torch.Tensor] = {}
    if "maxlogit" in names:
        out["maxlogit"] = -logits.float().amax(1)
    if "energy" in names:
        out["energy"] = -temperature * torch.logsumexp(z, 1)
    if {"msp", "maxentropy", "void"} & set(names):
        log_p = torch.log_softmax(z, 1)
        p = log_p.exp()
        if "msp" in names:
            out["msp"] = 1.0 - p.amax(1)
        if "maxentropy" in names:
            out["maxentropy"] = -(p * log_p).sum(1)
        if "void" in names:
            out["void"] = p[:, void]
    return {name: out[name] for name in names}


@torch.inference_mode()
def image_scores(
    model: Any,
    rgb: np.ndarray,
    names: Sequence[str],
    size: Size | None = DEFAULT_SIZE,
    temperature: float = 1.0,
    known_only: bool = False,
) -> dict[str, np.ndarray]:
    """One forward pass of an HWC uint8 image resized to ``size``: every score in ``names`` as
    a float32 [H, W] array at that size."""
    x = network_input(resize_rgb(rgb, size), model)
    logits = forward_logits(model, x, channels_last=prefers_channels_last(model))
    if is_label_map(logits):
        raise UserError("the model outputs class labels (an --argmax export): no logits to score")
    maps = scores_from_logits(logits, names, temperature, void_class(model), known_only)
    return {k: v[0].float().cpu().numpy() for k, v in maps.items()}


def check_model(model: Any, names: Sequence[str], known_only: bool) -> None:
    """The void score and ``known_only`` need ``meta["void_class"]``: UserError otherwise."""
    if void_class(model) is None:
        for asked, flag in (("void" in names, "--score void"), (known_only, "--known-only")):
            if asked:
                raise UserError(
                    f"{flag} needs a void output, and this model has none (no"
                    " meta['void_class']; erfnet_pytorch conversions have output 19)"
                )


def anomaly_scores(
    model: nn.Module,
    x: Any,
    score: str = "maxlogit",
    temperature: float = 1.0,
    size: Sequence[int] | None = DEFAULT_SIZE,
    known_only: bool = False,
) -> torch.Tensor:
    """The anomaly map (float32 [H, W] at ``size``, higher = more anomalous) of one image,
    computed exactly as ``scripts/anomaly.py`` computes it.

    ``x``: a path, a PIL image, an HxWx3 uint8 array, or a [3, H, W] / [1, 3, H, W] tensor
    (uint8, or float on the 0-255 scale). ``score``: one of ``SCORES``; ``size=None`` keeps the
    image's size; inputs are normalised with ``model.meta``'s mean / std.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    check_model(model, [score], known_only)
    size = None if size is None else (int(size[0]), int(size[1]))
    maps = image_scores(model, _to_rgb_uint8(x), [score], size, temperature, known_only)
    return torch.from_numpy(maps[score])


class ScoreStore:
    """One score's values at the kept pixels of a set: anomaly and known pixels in two float32
    arrays allocated once (their lengths come from ``check_set``)."""

    def __init__(self, anomaly: int, known: int) -> None:
        self.anomaly = np.empty(anomaly, np.float32)
        self.known = np.empty(known, np.float32)
        self.filled = [0, 0]

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        for i, (store, value) in enumerate(((self.anomaly, ANOMALY), (self.known, KNOWN))):
            values = scores[labels == value]
            store[self.filled[i] : self.filled[i] + values.size] = values
            self.filled[i] += values.size

    def levels(self) -> Levels:
        assert self.filled == [self.anomaly.size, self.known.size]
        return levels(self.anomaly, sort_in_place(self.known))


@dataclass
class SetResult:
    aset: AnomalySet
    metrics: dict[str, AnomalyMetrics]
    curves: dict[str, Levels]
    seconds_per_image: float


@dataclass(frozen=True)
class AnomalyProtocol:
    """How a set is scored: network size (None = native), scores, temperature, known_only."""

    size: Size | None = DEFAULT_SIZE
    scores: tuple[str, ...] = ("maxlogit",)
    temperature: float = 1.0
    known_only: bool = False

    def describe(self, model: Any) -> dict[str, Any]:
        """The protocol as the JSON records it (and the run prints it)."""
        meta = model_meta(model)
        return {
            "size": list(self.size) if self.size else "native",
            "image_resize": "PIL bilinear of the 8-bit RGB image (torchvision Resize on PIL)",
            "mask_resize": "PIL nearest (pixel centres)",
            "mean": [float(m) for m in meta["mean"]],
            "std": [float(s) for s in meta["std"]],
            "outputs": len(meta["class_names"]),
            "void_class": void_class(model),
            "scored_outputs": "known only (void dropped)" if self.known_only else "all",
            "temperature": self.temperature,
            "scores": list(self.scores),
            "fpr95": "np.interp(0.95, tpr, fpr) over the exact ROC (ood_metrics)",
            "metrics": "exact over all kept pixels (no binning); ties as scikit-learn",
        }


def score_set(
    model: Any,
    aset: AnomalySet,
    protocol: AnomalyProtocol,
    on_image: Callable[[ImageEntry, dict[str, np.ndarray]], None] | None = None,
    keep_curves: bool = False,
) -> SetResult:
    """Score every kept image of a checked set (``check_set``) once, then the metrics of each
    score over all kept pixels. ``on_image(entry, maps)`` sees each image's score maps;
    ``keep_curves`` keeps each score's ``Levels`` (36 B per distinct anomaly score) for plots."""
    stores = {s: ScoreStore(aset.anomaly_pixels, aset.known_pixels) for s in protocol.scores}
    seconds = 0.0
    for entry in aset.kept:
        t0 = time.perf_counter()
        rgb = _to_rgb_uint8(entry.image)
        maps = image_scores(
            model, rgb, protocol.scores, protocol.size, protocol.temperature, protocol.known_only
        )
        seconds += time.perf_counter() - t0
        labels = read_labels(entry.mask, aset.benchmark.rule, protocol.size)
        for name, values in maps.items():
            if not np.isfinite(values).all():
                raise UserError(f"{entry.image}: the {name} score has non-finite values")
            stores[name].add(values, labels)
        if on_image is not None:
            on_image(entry, maps)
    metrics, curves = {}, {}
    for name in protocol.scores:
        lv = stores.pop(name).levels()  # frees the score's stored pixels
        metrics[name] = metrics_from_levels(lv)
        if keep_curves:
            curves[name] = lv
    return SetResult(aset, metrics, curves, seconds / max(len(aset.kept), 1))
