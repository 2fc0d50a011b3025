"""The Cityscapes label table (cityscapesScripts' ``labels.py``), the single home of these facts.

Everything else (the loader's id -> trainId lookup, the submission writer's trainId -> id, the
colour palette, class names) is derived here, and so is a model's complete meta
(``complete_meta``: what every ERFNet carries from construction and every checkpoint holds).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from erfnet.config import DEFAULT_TEST_SIZE, IGNORE_INDEX, MEAN_RGB, STD_RGB


class Label(NamedTuple):
    name: str
    id: int
    train_id: int
    category: str
    color: tuple[int, int, int]
    ignore_in_eval: bool


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, "void", (0, 0, 0), True),
    Label("ego vehicle", 1, 255, "void", (0, 0, 0), True),
    Label("rectification border", 2, 255, "void", (0, 0, 0), True),
    Label("out of roi", 3, 255, "void", (0, 0, 0), True),
    Label("static", 4, 255, "void", (0, 0, 0), True),
    Label("dynamic", 5, 255, "void", (111, 74, 0), True),
    Label("ground", 6, 255, "void", (81, 0, 81), True),
    Label("road", 7, 0, "flat", (128, 64, 128), False),
    Label("sidewalk", 8, 1, "flat", (244, 35, 232), False),
    Label("parking", 9, 255, "flat", (250, 170, 160), True),
    Label("rail track", 10, 255, "flat", (230, 150, 140), True),
    Label("building", 11, 2, "construction", (70, 70, 70), False),
    Label("wall", 12, 3, "construction", (102, 102, 156), False),
    Label("fence", 13, 4, "construction", (190, 153, 153), False),
    Label("guard rail", 14, 255, "construction", (180, 165, 180), True),
    Label("bridge", 15, 255, "construction", (150, 100, 100), True),
    Label("tunnel", 16, 255, "construction", (150, 120, 90), True),
    Label("pole", 17, 5, "object", (153, 153, 153), False),
    Label("polegroup", 18, 255, "object", (153, 153, 153), True),
    Label("traffic light", 19, 6, "object", (250, 170, 30), False),
    Label("traffic sign", 20, 7, "object", (220, 220, 0), False),
    Label("vegetation", 21, 8, "nature", (107, 142, 35), False),
    Label("terrain", 22, 9, "nature", (152, 251, 152), False),
    Label("sky", 23, 10, "sky", (70, 130, 180), False),
    Label("person", 24, 11, "human", (220, 20, 60), False),
    Label("rider", 25, 12, "human", (255, 0, 0), False),
    Label("car", 26, 13, "vehicle", (0, 0, 142), False),
    Label("truck", 27, 14, "vehicle", (0, 0, 70), False),
    Label("bus", 28, 15, "vehicle", (0, 60, 100), False),
    Label("caravan", 29, 255, "vehicle", (0, 0, 90), True),
    Label("trailer", 30, 255, "vehicle", (0, 0, 110), True),
    Label("train", 31, 16, "vehicle", (0, 80, 100), False),
    Label("motorcycle", 32, 17, "vehicle", (0, 0, 230), False),
    Label("bicycle", 33, 18, "vehicle", (119, 11, 32), False),
    Label("license plate", -1, -1, "vehicle", (0, 0, 142), True),
)

# The 19 evaluated classes, in trainId order.
TRAIN_LABELS: tuple[Label, ...] = tuple(
    sorted((lb for lb in LABELS if 0 <= lb.train_id < IGNORE_INDEX), key=lambda lb: lb.train_id)
)
CLASS_NAMES: tuple[str, ...] = tuple(lb.name for lb in TRAIN_LABELS)
PALETTE: tuple[tuple[int, int, int], ...] = tuple(lb.color for lb in TRAIN_LABELS)

# 256-entry lookup tables for one vectorised indexing op on uint8 label images.
# Values outside the table (34..255 as label ids) map to IGNORE_INDEX; loaders that must reject
# them check against VALID_LABEL_IDS.
ID_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lb in LABELS:
    if _lb.id >= 0 and 0 <= _lb.train_id < IGNORE_INDEX:
        ID_TO_TRAIN_ID[_lb.id] = _lb.train_id

TRAIN_ID_TO_ID: np.ndarray = np.zeros(256, dtype=np.uint8)  # 255 (ignore) -> 0 "unlabeled"
for _lb in TRAIN_LABELS:
    TRAIN_ID_TO_ID[_lb.train_id] = _lb.id

VALID_LABEL_IDS: frozenset[int] = frozenset(lb.id for lb in LABELS if lb.id >= 0)

# Colour lookup for trainIds: 19 class colours, everything else (ignore) black.
TRAIN_ID_TO_COLOR: np.ndarray = np.zeros((256, 3), dtype=np.uint8)
TRAIN_ID_TO_COLOR[: len(PALETTE)] = np.array(PALETTE, dtype=np.uint8)

del _lb


# The one palette-completion rule (checkpoint meta, renderings, exports alike).
Palette = Sequence[Sequence[int]] | np.ndarray


def generated_color(index: int) -> tuple[int, int, int]:
    """A fixed colour per class index: PASCAL VOC's colormap (the index's bits spread over the
    high bits of R, G and B), distinct for every index up to 255."""
    rgb = [0, 0, 0]
    for shift in range(8):
        for channel in range(3):
            rgb[channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return rgb[0], rgb[1], rgb[2]


def class_colors(
    palette: Palette | None, num_classes: int, what: str = "the palette"
) -> np.ndarray:
    """``num_classes`` x 3 uint8: ``palette``'s colours, and for the classes beyond it the one
    fallback rule (Cityscapes' colour for that index, else ``generated_color``), with a warning
    line on stderr naming ``what`` and the classes when a non-empty palette was too short."""
    given = np.asarray(palette if palette is not None else [], dtype=np.uint8).reshape(-1, 3)
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    colors[: min(len(given), num_classes)] = given[:num_classes]
    for i in range(len(given), num_classes):
        colors[i] = PALETTE[i] if i < len(PALETTE) else generated_color(i)
    if 0 < len(given) < num_classes:
        print(
            f"warning: {what} has {len(given)} colours for {num_classes} classes; classes"
            f" {len(given)}-{num_classes - 1} get default colours",
            file=sys.stderr,
        )
    return colors


def complete_meta(
    meta: dict[str, Any] | None, num_classes: int, head: str | None = None
) -> dict[str, Any]:
    """The meta with every key a reader uses: the one place that fills what a file lacks.

    ``mean`` / ``std``: ImageNet's (what every built-in pipeline trains with); ``ignore_index``:
    255; ``test_size``: Cityscapes' keep-ratio 1024x2048 (``DEFAULT_TEST_SIZE``, what files
    written before the key existed were validated at); ``head``: the model's (when given);
    ``class_names``: ``class_<i>`` for a model saved without them (a checkpoint never claims a
    dataset's classes it was not given); ``palette``: one colour per class, completed by
    ``class_colors``' rule.
    """
    full = dict(meta or {})
    full.setdefault("test_size", {**DEFAULT_TEST_SIZE, "scale": list(DEFAULT_TEST_SIZE["scale"])})
    full.setdefault("mean", list(MEAN_RGB))
    full.setdefault("std", list(STD_RGB))
    full.setdefault("ignore_index", IGNORE_INDEX)
    if head is not None:
        full.setdefault("head", head)
    names = list(full.get("class_names") or [])
    full["class_names"] = names + [f"class_{i}" for i in range(len(names), num_classes)]
    palette = full.get("palette") or []
    if len(palette) < num_classes:
        colors = class_colors(palette, num_classes, "the checkpoint's palette")
        full["palette"] = [[int(v) for v in c] for c in colors]
    return full
