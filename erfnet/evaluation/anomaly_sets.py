"""The road-anomaly validation pack on disk: its layouts (``Benchmark``, found by folder name
or ``--benchmark``), each layout's mask rule (``mask_labels``), and the check of a set before
the pass (every image has a mask of its size; images without an anomaly pixel are counted and
skipped). Sources of each rule: docs/anomaly.md."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from erfnet.data.decode import IMAGE_SUFFIXES
from erfnet.errors import FlagError, UserError
from erfnet.evaluation.inference import MIN_VIEW

KNOWN, ANOMALY, IGNORED = 0, 1, 255
Size = tuple[int, int]


@dataclass(frozen=True)
class Benchmark:
    """One set of the validation pack: its ``--benchmark`` name, folder name, image type and
    mask rule (``mask_labels``): "pack" 1 anomaly, 0 known; "roadanomaly" 2 anomaly, 0 known;
    "lostandfound" 0 void, 1 free road (known), 2..200 obstacles (anomaly); the rest ignored."""

    name: str
    folder: str
    image_type: str
    rule: str


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("roadanomaly21", "RoadAnomaly21", "png", "pack"),
        Benchmark("roadobstacle21", "RoadObsticle21", "webp", "pack"),  # sic: the pack's name
        Benchmark("fs_lostfound", "FS_LostFound_full", "png", "pack"),
        Benchmark("fs_static", "fs_static", "jpg", "pack"),
        Benchmark("roadanomaly", "RoadAnomaly", "jpg", "roadanomaly"),
        Benchmark("lostandfound", "LostAndFound", "png", "lostandfound"),
    )
}
BY_FOLDER = {b.folder: b for b in BENCHMARKS.values()}


def mask_labels(raw: np.ndarray, rule: str) -> np.ndarray:
    """A mask's values -> uint8 0 known / 1 anomaly / 255 ignored, by the layout's ``rule``."""
    out = np.full(raw.shape, IGNORED, np.uint8)
    if rule == "pack":
        out[raw == 0], out[raw == 1] = KNOWN, ANOMALY
    elif rule == "roadanomaly":
        out[raw == 0], out[raw == 2] = KNOWN, ANOMALY
    elif rule == "lostandfound":
        out[raw == 1], out[(raw >= 2) & (raw <= 200)] = KNOWN, ANOMALY
    else:
        raise ValueError(f"unknown mask rule {rule!r}")
    return out


@dataclass
class ImageEntry:
    image: Path
    mask: Path
    anomaly: int = 0
    known: int = 0


@dataclass
class AnomalySet:
    """A set's images in order; after ``check_set``, those kept (with their pixel counts) and
    those skipped (no anomaly pixel)."""

    name: str
    benchmark: Benchmark
    root: Path
    images: list[Path]
    kept: list[ImageEntry] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    @property
    def anomaly_pixels(self) -> int:
        return sum(e.anomaly for e in self.kept)

    @property
    def known_pixels(self) -> int:
        return sum(e.known for e in self.kept)


def _set_at(root: Path, benchmark: str | None) -> AnomalySet:
    if benchmark is not None:
        bench = BENCHMARKS[benchmark]
    elif root.name in BY_FOLDER:
        bench = BY_FOLDER[root.name]
    else:
        raise UserError(
            f"--data-root {root}: unknown layout '{root.name}'; expected a set folder named one"
            f" of {', '.join(BY_FOLDER)} (or --benchmark {{{','.join(BENCHMARKS)}}})"
        )
    images = sorted(
        p
        for p in (root / "images").iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not images:
        raise UserError(f"{root / 'images'}: no image ({', '.join(IMAGE_SUFFIXES)}) in it")
    return AnomalySet(root.name, bench, root, images)


def find_sets(root: str | os.PathLike, benchmark: str | None = None) -> list[AnomalySet]:
    """The set at ``root`` (``root/images``), or every set folder under ``root`` (the pack's
    parent folder); the layout from each folder's name, or ``benchmark`` for one set."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-root {root}: no such folder")
    if (root / "images").is_dir():
        return [_set_at(root, benchmark)]
    folders = sorted(p for p in root.iterdir() if (p / "images").is_dir())
    if not folders:
        raise UserError(
            f"--data-root {root}: neither a set (images/ and labels_masks/) nor a folder of sets"
            f" ({', '.join(BY_FOLDER)})"
        )
    if benchmark is not None:
        raise FlagError(f"--benchmark names the layout of one set; {root} holds several")
    unknown = [p.name for p in folders if p.name not in BY_FOLDER]
    if unknown:
        raise UserError(
            f"--data-root {root}: unknown set folder(s) {', '.join(unknown)}; expected"
            f" {', '.join(BY_FOLDER)}"
        )
    return [_set_at(p, None) for p in folders]


def _open_image(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.size  # noqa: B018 - the header is read here, so a bad file fails now
        return img
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


def read_labels(path: Path, rule: str, size: Size | None) -> np.ndarray:
    """A mask file -> 0 / 1 / 255 labels [H, W] at ``size`` (PIL nearest: pixel centres)."""
    with _open_image(path, "mask") as img:
        try:
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.NEAREST)
            raw = np.asarray(img)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read mask {path}: {e}") from None
    if raw.ndim == 3:
        if not (raw == raw[..., :1]).all():
            raise UserError(f"mask {path} is a colour image; expected one value per pixel")
        raw = raw[..., 0]
    return mask_labels(raw, rule)


def check_set(aset: AnomalySet, size: Size | None, fixed: Size | None = None) -> AnomalySet:
    """Before the pass: every image readable with a mask of its size, every mask read (its
    kept / anomaly pixel counts at ``size``); images without an anomaly pixel skipped. ``fixed``:
    the only input size a fixed-size export takes. UserError (one line) naming the file."""
    aset.kept, aset.skipped = [], []
    for image in aset.images:
        mask = aset.root / "labels_masks" / f"{image.stem}.png"
        if not mask.is_file():
            raise UserError(f"{image}: no mask {mask}")
        with _open_image(image, "image") as img:
            w, h = img.size
        with _open_image(mask, "mask") as m:
            if m.size != (w, h):
                raise UserError(
                    f"mask {mask} is {m.size[1]}x{m.size[0]}, its image {image} {h}x{w} (HxW)"
                )
        net = size or (h, w)
        if min(net) < MIN_VIEW:
            raise UserError(f"{image}: {h}x{w} is under the network's {MIN_VIEW}x{MIN_VIEW}")
        if fixed is not None and tuple(net) != tuple(fixed):
            raise UserError(
                f"the model takes only {fixed[0]}x{fixed[1]} inputs (a fixed-size export);"
                f" {image} would be {net[0]}x{net[1]}"
            )
        labels = read_labels(mask, aset.benchmark.rule, size)
        anomaly = int(np.count_nonzero(labels == ANOMALY))
        if anomaly == 0:
            aset.skipped.append(image)
            continue
        known = int(np.count_nonzero(labels == KNOWN))
        aset.kept.append(ImageEntry(image, mask, anomaly, known))
    return aset
