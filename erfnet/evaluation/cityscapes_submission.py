"""The Cityscapes test server's submission: one label-id PNG per image, in per-city folders.

``SubmissionWriter(out_dir, classes)`` is ``evaluate``'s ``on_prediction`` for it: the 19 train
ids of each prediction are mapped to Cityscapes' label ids (the ignore value to 0, "unlabeled")
and written at the original size as ``<out>/<city>/<name>_leftImg8bit.png``, which the official
evaluator (cityscapesScripts ``evalPixelLevelSemanticLabeling``) reads. Only a model of
Cityscapes' own classes can be submitted: ``check_cityscapes_classes`` says so in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from erfnet.evaluation.visualize import save_png
from erfnet.labels import CLASS_NAMES, TRAIN_ID_TO_ID


def check_cityscapes_classes(classes: Sequence[str]) -> None:
    """ValueError unless ``classes`` are Cityscapes' 19 evaluated classes, in train-id order."""
    if tuple(classes) != tuple(CLASS_NAMES):
        raise ValueError(
            "the Cityscapes test server's label-id PNGs need Cityscapes' 19 classes, but this"
            f" dataset has {len(classes)} classes: {list(classes)[:3]} ...; write colour"
            " renderings (--save-color) instead"
        )


@dataclass
class SubmissionWriter:
    """``evaluate``'s ``on_prediction``: every batch's predictions as test-server PNGs.

    ``classes`` are the dataset's: anything but Cityscapes' is refused when the writer is made,
    before any image is predicted.
    """

    out_dir: Path
    classes: Sequence[str]

    def __post_init__(self) -> None:
        check_cityscapes_classes(self.classes)

    def __call__(self, preds: torch.Tensor, batch: dict) -> None:
        labels = preds.to("cpu", torch.uint8).numpy()
        for i in range(labels.shape[0]):  # train ids -> label ids (255 -> 0 "unlabeled")
            path = Path(self.out_dir) / batch["city"][i] / f"{batch['name'][i]}_leftImg8bit.png"
            save_png(TRAIN_ID_TO_ID[labels[i]], path)
