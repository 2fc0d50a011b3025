"""A synthetic Cityscapes in the official layout, for tests, smoke runs and benchmarks.

Each image is a street-like scene (sky at the top, buildings, road and sidewalks at the bottom,
boxes of objects) drawn as a ``_labelIds.png`` with the real Cityscapes label ids, ignored ids
included. The RGB image paints every label id with its own colour *and* its own stripe texture
plus noise, so a small model can learn the classes in a few hundred iterations. Everything is
deterministic given the seed; image ``i`` of a split does not depend on how many images are made.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from erfnet.labels import LABELS
from erfnet.outputs import atomic_write, tmp_path

# Real city names of each split (the official release), used round robin.
# fmt: off
CITIES: dict[str, tuple[str, ...]] = {
    "train": ("aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt",
              "hamburg", "hanover", "jena", "krefeld", "monchengladbach", "strasbourg",
              "stuttgart", "tubingen", "ulm", "weimar", "zurich"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich"),
}
# fmt: on
_SPLIT_INDEX = {split: i for i, split in enumerate(CITIES)}

_NUM_IDS = 34
_LABEL_BY_ID = {lb.id: lb for lb in LABELS if lb.id >= 0}
_INSTANCE_IDS = frozenset({24, 25, 26, 27, 28, 29, 30, 31, 32, 33})  # human + vehicle classes

# Object classes drawn as boxes (label id, relative height range, relative width range). Boxes
# are larger than real objects so that every class covers enough pixels to be learnt quickly.
_OBJECTS: tuple[tuple[int, tuple[float, float], tuple[float, float]], ...] = (
    (12, (0.2, 0.4), (0.15, 0.3)),  # wall
    (13, (0.15, 0.25), (0.2, 0.4)),  # fence
    (17, (0.35, 0.6), (0.04, 0.07)),  # pole
    (19, (0.15, 0.25), (0.06, 0.1)),  # traffic light
    (20, (0.12, 0.2), (0.08, 0.14)),  # traffic sign
    (21, (0.2, 0.4), (0.15, 0.3)),  # vegetation
    (22, (0.12, 0.2), (0.15, 0.35)),  # terrain
    (24, (0.25, 0.4), (0.06, 0.12)),  # person
    (25, (0.25, 0.4), (0.08, 0.14)),  # rider
    (26, (0.18, 0.3), (0.15, 0.3)),  # car
    (27, (0.22, 0.35), (0.18, 0.3)),  # truck
    (28, (0.25, 0.4), (0.2, 0.35)),  # bus
    (31, (0.2, 0.35), (0.25, 0.45)),  # train
    (32, (0.15, 0.25), (0.08, 0.14)),  # motorcycle
    (33, (0.15, 0.25), (0.08, 0.14)),  # bicycle
)
# Ignored ids drawn now and then so that loaders and losses meet them.
_IGNORED_BOXES = (0, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)


def _class_appearance() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label id: RGB colour, stripe period (px), stripe angle (rad), stripe amplitude. Each of
    the 19 evaluated classes has its own (period, angle) stripe pattern, because the recipe's hue
    jitter (+-36 degrees) is larger than the spacing of 19 hues; colour and brightness are a second
    cue. Ignored ids get dull colours and faint textures."""
    colors = np.zeros((_NUM_IDS, 3), np.float32)
    period, angle, amp = np.zeros((3, _NUM_IDS), np.float32)
    periods = (3.0, 5.0, 8.0, 13.0)
    angles = np.deg2rad([0.0, 36.0, 72.0, 108.0, 144.0])
    for i in range(_NUM_IDS):
        lb = _LABEL_BY_ID[i]
        if lb.train_id < 255:
            t = lb.train_id  # 4 periods x 5 angles: a unique pattern for each of the 19
            h, s = (t * 7 % 19) / 19.0, (0.85 if t % 2 == 0 else 0.55)
            v = 0.9 if t % 3 != 1 else 0.55
            period[i], angle[i], amp[i] = periods[t % 4], angles[t // 4], 32.0
        else:
            h, s, v = (i * 0.37) % 1.0, 0.15, 0.25 + 0.5 * ((i * 13 % 7) / 7.0)
            period[i], angle[i], amp[i] = 4.0, 0.0, 6.0
        colors[i] = np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255.0
    return colors, period, angle, amp


_COLORS, _PERIOD, _ANGLE, _AMP = _class_appearance()


def _box(
    rng: np.random.Generator, h: int, w: int, hr: tuple[float, float], wr: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A random box (y0, y1, x0, x1) of relative size hr x wr, at least 2 px each way."""
    bh = max(2, int(round(h * rng.uniform(*hr))))
    bw = max(2, int(round(w * rng.uniform(*wr))))
    y0 = int(rng.integers(0, max(1, h - bh + 1)))
    x0 = int(rng.integers(0, max(1, w - bw + 1)))
    return y0, min(h, y0 + bh), x0, min(w, x0 + bw)


def synthesize_sample(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One scene: RGB uint8 [H,W,3], labelIds uint8 [H,W], instanceIds uint16 [H,W], polygons."""
    h, w = height, width
    lab = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.uint16)
    polys: list[dict] = []

    def fill(label_id: int, y0: int, y1: int, x0: int, x1: int) -> None:
        lab[y0:y1, x0:x1] = label_id
        inst[y0:y1, x0:x1] = label_id * 1000 + len(polys) if label_id in _INSTANCE_IDS else label_id
        box = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        polys.append({"label": _LABEL_BY_ID[label_id].name, "polygon": box})

    sky_end, horizon = int(h * rng.uniform(0.1, 0.25)), int(h * rng.uniform(0.4, 0.55))
    fill(23, 0, sky_end, 0, w)  # sky
    fill(11, sky_end, horizon, 0, w)  # building
    fill(7, horizon, h, 0, w)  # road
    # Sidewalks: trapezoids widening towards the bottom on both sides.
    rows = np.arange(horizon, h)
    frac = (rows - horizon + 1) / max(1, h - horizon)
    left = (frac * w * rng.uniform(0.1, 0.3)).astype(np.int64)
    right = w - (frac * w * rng.uniform(0.1, 0.3)).astype(np.int64)
    cols = np.arange(w)
    side = (cols[None, :] < left[:, None]) | (cols[None, :] >= right[:, None])
    lab[horizon:][side] = 8
    inst[horizon:][side] = 8
    for poly in (
        [[0, horizon], [int(left[-1]), h], [0, h]],
        [[w, horizon], [int(right[-1]), h], [w, h]],
    ):
        polys.append({"label": "sidewalk", "polygon": poly})

    # Objects, most standing on the road half; every image gets a fresh random subset.
    n_obj = int(rng.integers(7, 12))
    for k in rng.choice(len(_OBJECTS), size=n_obj, replace=False):
        label_id, hr, wr = _OBJECTS[int(k)]
        y0, y1, x0, x1 = _box(rng, h, w, hr, wr)
        if label_id not in (19, 20):  # lights and signs may float; the rest stand near the road
            shift = min(h - y1, max(0, horizon - (y0 + y1) // 2 + int(rng.integers(0, h // 4 + 1))))
            y0, y1 = y0 + shift, y1 + shift
        fill(label_id, y0, y1, x0, x1)
    for label_id in rng.choice(_IGNORED_BOXES, size=int(rng.integers(1, 4)), replace=False):
        fill(int(label_id), *_box(rng, h, w, (0.05, 0.15), (0.05, 0.15)))
    if rng.random() < 0.5:  # ego vehicle along the bottom, as in the real recordings
        fill(1, h - max(1, h // 16), h, 0, w)
    if rng.random() < 0.5:  # rectification border at the left edge
        fill(2, 0, h, 0, max(1, w // 64))

    # Paint: class colour + class stripe texture + noise + a gentle illumination gradient.
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    ang, per, amp = _ANGLE[lab], _PERIOD[lab], _AMP[lab]
    phase = (xx * np.cos(ang) + yy * np.sin(ang)) * (2.0 * np.pi) / per
    texture = amp * np.sin(phase)
    light = 1.0 + 0.15 * (xx / max(1, w - 1) - 0.5) * rng.uniform(-1.0, 1.0)
    img = _COLORS[lab] * (light * rng.uniform(0.85, 1.15))[..., None] + texture[..., None]
    img += rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return img, lab, inst, polys


def _color_image(lab: np.ndarray) -> np.ndarray:
    """The official ``_gtFine_color.png`` (RGBA) for a labelIds image."""
    lut = np.zeros((256, 4), np.uint8)
    for lb in LABELS:
        if lb.id >= 0:
            lut[lb.id] = (*lb.color, 255)
    return lut[lab]


def _save_png(array: np.ndarray, path: Path, compress_level: int) -> None:
    # No fsync: a dataset a rerun makes again; the rename alone keeps a file whole or absent.
    save = partial(Image.fromarray(array).save, format="PNG", compress_level=compress_level)
    atomic_write(path, save, fsync=False)


def make_synthetic_cityscapes(
    root: str | os.PathLike,
    train: int = 4,
    val: int = 2,
    test: int = 0,
    size: tuple[int, int] = (64, 128),
    seed: int = 0,
    extras: bool = True,
    compress_level: int = 1,
) -> Path:
    """Write a synthetic Cityscapes of ``size`` (H, W) images under ``root`` in the official
    layout (``_leftImg8bit.png``, ``_gtFine_labelIds.png``; with ``extras`` also the
    ``_gtFine_color.png``, ``_gtFine_instanceIds.png`` and ``_gtFine_polygons.json``) and return
    ``root``. The test split's labels are all 0 ("unlabeled"), like the public release."""
    height, width = int(size[0]), int(size[1])
    if height < 8 or width < 8:
        raise ValueError(f"synthetic image size must be at least 8x8 (HxW), got {height}x{width}")
    counts = {"train": train, "val": val, "test": test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"number of {split} images must be >= 0, got {n}")
    root = Path(root)
    for split, n in counts.items():
        cities = CITIES[split]
        for i in range(n):
            city = cities[i % len(cities)]
            name = f"{city}_{i // len(cities):06d}_000019"
            img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            for folder in (img_dir, gt_dir):
                folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, _SPLIT_INDEX[split], i])
            img, lab, inst, polys = synthesize_sample(rng, height, width)
            if split == "test":
                lab, inst, polys = np.zeros_like(lab), np.zeros_like(inst), []
            _save_png(img, img_dir / f"{name}_leftImg8bit.png", compress_level)
            _save_png(lab, gt_dir / f"{name}_gtFine_labelIds.png", compress_level)
            if extras:
                _save_png(_color_image(lab), gt_dir / f"{name}_gtFine_color.png", compress_level)
                _save_png(inst, gt_dir / f"{name}_gtFine_instanceIds.png", compress_level)
                poly = {"imgHeight": height, "imgWidth": width, "objects": polys}
                (gt_dir / f"{name}_gtFine_polygons.json").write_text(json.dumps(poly))
    return root


# The dataset ``train.py --data synthetic`` makes on demand: images per split, size (H, W), seed.
SYNTHETIC_DATA: dict = {"train": 64, "val": 16, "size": (128, 256), "seed": 0}


def synthetic_cache_root() -> Path:
    """Where ``--data synthetic`` keeps its dataset without ``--data-root``: a cache folder."""
    p = SYNTHETIC_DATA
    h, w = p["size"]
    tag = f"synthetic-{p['train']}-{p['val']}-{w}x{h}-s{p['seed']}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "erfnet" / tag


def ensure_synthetic_cityscapes(root: str | os.PathLike) -> Path:
    """Create the ``SYNTHETIC_DATA`` dataset at ``root`` unless something is there already:
    in a temporary sibling folder then renamed, so a killed or concurrent run never leaves a
    half-made dataset. Raises OSError when ``root`` cannot be made."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        return root
    p = SYNTHETIC_DATA
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(root)  # a folder, named as the one atomic writer names its files
    make_synthetic_cityscapes(
        tmp, train=p["train"], val=p["val"], test=0, size=p["size"], seed=p["seed"], extras=False
    )
    try:
        if root.exists():
            root.rmdir()  # an empty folder, e.g. made by the user for --data-root
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        if not (root.exists() and any(root.iterdir())):
            raise
    return root


# --- A road-anomaly set: synthetic scenes with foreign objects (RoadAnomaly21 layout) ----------

ANOMALY_STREAM = 3  # rng stream of the anomaly set (0, 1, 2 are the Cityscapes splits)


def _foreign_object(rng: np.random.Generator, bh: int, bw: int) -> tuple[np.ndarray, np.ndarray]:
    """An object of no Cityscapes class: an ellipse or box (mask [bh, bw]) painted with a
    checkerboard of two saturated colours, a texture no class of the scenes has."""
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
    if rng.random() < 0.5:
        cy, cx = (bh - 1) / 2.0, (bw - 1) / 2.0
        inside = ((yy - cy) / (bh / 2.0)) ** 2 + ((xx - cx) / (bw / 2.0)) ** 2 <= 1.0
    else:
        inside = np.ones((bh, bw), bool)
    cell = int(rng.integers(2, 5))
    check = ((yy // cell + xx // cell) % 2).astype(bool)
    hues = rng.uniform(0.0, 1.0, 2)
    c0, c1 = (np.array(colorsys.hsv_to_rgb(h, 1.0, 1.0), np.float32) * 255.0 for h in hues)
    paint = np.where(check[..., None], c0, c1)
    return inside, paint


def synthesize_anomaly_sample(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene with 1-3 foreign objects on the road: RGB uint8 [H, W, 3] and the pack's mask
    uint8 [H, W] (1 anomaly, 0 known, 255 where the scene's label id is ignored)."""
    img, lab, _, _ = synthesize_sample(rng, height, width)
    train_ids = np.array([_LABEL_BY_ID[i].train_id for i in range(_NUM_IDS)], np.int64)
    mask = np.where(train_ids[lab] == 255, 255, 0).astype(np.uint8)
    out = img.astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        bh = max(4, int(height * rng.uniform(0.12, 0.25)))
        bw = max(4, int(width * rng.uniform(0.08, 0.16)))
        y0 = int(rng.integers(height // 2, max(height // 2 + 1, height - bh)))
        x0 = int(rng.integers(0, max(1, width - bw)))
        inside, paint = _foreign_object(rng, bh, bw)
        region = out[y0 : y0 + bh, x0 : x0 + bw]
        region[inside] = paint[inside] + rng.normal(0.0, 6.0, size=(int(inside.sum()), 3))
        mask[y0 : y0 + bh, x0 : x0 + bw][inside] = 1
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask


def make_synthetic_anomaly(
    root: str | os.PathLike, count: int = 10, size: tuple[int, int] = (128, 256), seed: int = 0
) -> Path:
    """Write ``count`` anomaly scenes in the RoadAnomaly21 layout of the validation pack:
    ``root/images/synthetic_<i>.png`` and ``root/labels_masks/synthetic_<i>.png``; returns root.
    Name the folder ``RoadAnomaly21`` for the layout to be found by its name."""
    height, width = int(size[0]), int(size[1])
    if height < 16 or width < 16:
        raise ValueError(f"anomaly image size must be at least 16x16 (HxW), got {height}x{width}")
    if count < 1:
        raise ValueError(f"the number of anomaly images must be >= 1, got {count}")
    root = Path(root)
    for folder in ("images", "labels_masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed, ANOMALY_STREAM, i])
        img, mask = synthesize_anomaly_sample(rng, height, width)
        _save_png(img, root / "images" / f"synthetic_{i:04d}.png", 1)
        _save_png(mask, root / "labels_masks" / f"synthetic_{i:04d}.png", 1)
    return root
