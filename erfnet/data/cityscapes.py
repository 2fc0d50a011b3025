"""Cityscapes in its official layout: discovery, pairing, label loading, the 34 -> 19 mapping.

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                                  (and/or ..._gtFine_labelTrainIds.png from prepare_cityscapes.py)

Labels are read from ``_labelTrainIds.png`` when present, else ``_labelIds.png`` is mapped through
``erfnet.labels.ID_TO_TRAIN_ID`` with one indexing op. Every problem with the files on disk is a
``DatasetError`` naming the path and what was expected.

Only here (and in the test server's writer, ``erfnet.evaluation.cityscapes_submission``) is the
code Cityscapes-specific; the rest of the project takes the classes from a dataset or a checkpoint.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from erfnet.config import IGNORE_INDEX
from erfnet.data.decode import (  # noqa: F401  (re-exported: the loaders' public names)
    DatasetError,
    check_label_values,
    check_same_size,
    load_image,
    open_image,
    pil_rgb8,
    read_png,
    to_uint8,
)
from erfnet.data.transforms import EvalTransform
from erfnet.labels import CLASS_NAMES, ID_TO_TRAIN_ID, PALETTE, VALID_LABEL_IDS
from erfnet.outputs import atomic_write

ENV_VAR = "CITYSCAPES_DATASET"
DEFAULT_ROOT = "data/cityscapes"
IMAGE_DIR, LABEL_DIR = "leftImg8bit", "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
SPLITS = ("train", "val", "test")
UNLABELLED_SPLITS = frozenset({"test"})  # the public test labels are all "unlabeled"

LAYOUT = (
    "expected the official Cityscapes layout:\n"
    "  <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
    "  <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"
    " (or _gtFine_labelTrainIds.png)\n"
    f"(set --data-root or ${ENV_VAR} to <root>)"
)

# Lookup tables as tensors; label ids are 0..33 so one max() checks a labelIds image.
_ID_TO_TRAIN_ID = torch.from_numpy(ID_TO_TRAIN_ID.copy())
_MAX_LABEL_ID = max(VALID_LABEL_IDS)
assert set(range(_MAX_LABEL_ID + 1)) == set(VALID_LABEL_IDS)  # contiguous: max() is enough


@dataclass(frozen=True)
class Sample:
    """One image and its label file. ``label_kind`` is "trainIds", "labelIds" or None."""

    name: str
    city: str
    image: Path
    label: Path | None
    label_kind: str | None


def resolve_data_root(arg: str | os.PathLike | None) -> Path:
    """The dataset root: ``arg``, else ``$CITYSCAPES_DATASET``, else ``data/cityscapes``."""
    if arg is not None and str(arg) != "":
        return Path(arg).expanduser()
    env = os.environ.get(ENV_VAR, "")
    return Path(env).expanduser() if env else Path(DEFAULT_ROOT)


def check_root(root: Path) -> None:
    """Raise a ``DatasetError`` with a hint when ``root`` is not a Cityscapes root folder."""
    if not root.exists():
        raise DatasetError(f"Cityscapes root '{root}' does not exist; {LAYOUT}")
    if not root.is_dir():
        raise DatasetError(f"Cityscapes root '{root}' is not a folder; {LAYOUT}")
    # Pointed one or two levels too deep (at leftImg8bit/ or gtFine/, or at one of their splits)?
    for node, below in ((root, ""), (root.parent, f"{root.name}/")):
        if node.name in (IMAGE_DIR, LABEL_DIR) and not (root / IMAGE_DIR).is_dir():
            raise DatasetError(
                f"'{root}' looks like the {node.name}/{below} folder, not the dataset root; use"
                f" its parent '{node.parent}' instead; {LAYOUT}"
            )
    if not (root / IMAGE_DIR).is_dir():
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DatasetError(
            f"no '{IMAGE_DIR}' folder in Cityscapes root '{root}' (found: {found}); {LAYOUT}"
        )


def _scan(split_dir: Path, suffix: str) -> dict[str, tuple[str, Path]]:
    """name -> (city, path) for every ``<city>/<name><suffix>`` under ``split_dir``."""
    out: dict[str, tuple[str, Path]] = {}
    if not split_dir.is_dir():
        return out
    for city_entry in os.scandir(split_dir):
        if not city_entry.is_dir():
            continue
        for f in os.scandir(city_entry.path):
            if f.name.endswith(suffix) and f.is_file():
                out[f.name[: -len(suffix)]] = (city_entry.name, Path(f.path))
    return out


def find_samples(root: str | os.PathLike, split: str, labels: bool | None = None) -> list[Sample]:
    """Discover and pair the files of ``split``, sorted by (city, name). ``labels`` None means
    "labels for every split but test". With labels, an image without a label file (or a label file
    without an image) is an error naming both paths."""
    root = Path(root)
    check_root(root)
    if labels is None:
        labels = split not in UNLABELLED_SPLITS
    img_split = root / IMAGE_DIR / split
    if not img_split.is_dir():
        have = sorted(p.name for p in (root / IMAGE_DIR).iterdir() if p.is_dir())
        raise DatasetError(
            f"split folder '{img_split}' does not exist (splits found: {have}); {LAYOUT}"
        )
    images = _scan(img_split, IMAGE_SUFFIX)
    if not images:
        raise DatasetError(
            f"split '{split}' is empty: no '<city>/*{IMAGE_SUFFIX}' files under '{img_split}'; "
            f"{LAYOUT}"
        )
    lab_split = root / LABEL_DIR / split
    if labels:
        if not lab_split.is_dir():
            raise DatasetError(
                f"label folder '{lab_split}' does not exist but split '{split}' needs labels; "
                f"{LAYOUT}"
            )
        label_ids = _scan(lab_split, LABEL_IDS_SUFFIX)
        train_ids = _scan(lab_split, TRAIN_IDS_SUFFIX)
        for name in sorted(set(label_ids) | set(train_ids)):
            if name not in images:
                city, path = train_ids.get(name) or label_ids[name]
                expected = img_split / city / f"{name}{IMAGE_SUFFIX}"
                raise DatasetError(f"label '{path}' has no image: expected '{expected}'")
    samples = []
    for name, (city, img_path) in images.items():
        if not labels:
            samples.append(Sample(name, city, img_path, None, None))
        elif name in train_ids:
            samples.append(Sample(name, city, img_path, train_ids[name][1], "trainIds"))
        elif name in label_ids:
            samples.append(Sample(name, city, img_path, label_ids[name][1], "labelIds"))
        else:
            expected = lab_split / city / f"{name}{LABEL_IDS_SUFFIX}"
            raise DatasetError(
                f"image '{img_path}' has no label: expected '{expected}' "
                f"(or its {TRAIN_IDS_SUFFIX} version)"
            )
    samples.sort(key=lambda s: (s.city, s.name))
    return samples


def map_label_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """Cityscapes label ids (uint8, any shape) -> trainIds (uint8), 255 for ignored ids."""
    # index_select on a flat int32 view is much faster than fancy indexing with a long tensor.
    flat = label_ids.reshape(-1).to(torch.int32)
    return _ID_TO_TRAIN_ID.index_select(0, flat).view(label_ids.shape)


def load_label(path: str | os.PathLike, kind: str = "labelIds") -> torch.Tensor:
    """A label PNG as uint8 trainIds [H, W] (kind "labelIds" is mapped, "trainIds" is checked)."""
    from torchvision.io import ImageReadMode  # torchvision loads torch._dynamo: where used

    path = Path(path)
    lab = read_png(path, ImageReadMode.UNCHANGED)
    if lab.dtype != torch.uint8 or lab.shape[0] != 1:
        raise DatasetError(
            f"label '{path}' must be a single-channel 8-bit PNG, got {lab.shape[0]} channel(s) "
            f"of {lab.dtype}"
        )
    lab = lab[0]
    if kind == "labelIds":
        check_label_values(lab, path, _MAX_LABEL_ID + 1, "Cityscapes label ids")
        return map_label_ids(lab)
    if kind == "trainIds":  # Cityscapes' 19 evaluated classes
        check_label_values(lab, path, len(CLASS_NAMES), "trainIds", IGNORE_INDEX)
        return lab
    raise ValueError(f"unknown label kind {kind!r}; expected 'labelIds' or 'trainIds'")


Transform = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


class PairDataset(Dataset):
    """What Cityscapes and a folder dataset share: ``samples``, ``load`` and the items (a
    subclass gives ``load_label``)."""

    samples: list[Sample]
    transform: Transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw pair: uint8 RGB [3,H,W] and uint8 train ids [H,W] (or None), checked."""
        s = self.samples[index]
        image = load_image(s.image)
        if s.label is None:
            return image, None
        label = self.load_label(index)
        check_same_size(image, label, s.image, s.label)
        return image, label

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        image, label = self.load(index)
        ori_size = torch.tensor(image.shape[1:], dtype=torch.int64)
        image, label = self.transform(image, label)
        item: dict[str, Any] = {"image": image, "name": s.name, "city": s.city}
        if label is not None:
            item["label"] = label
        item["ori_size"] = ori_size
        return item


class CityscapesDataset(PairDataset):
    """Cityscapes ``split`` under ``root``. Items are dicts: ``image`` [3,H,W], ``label`` int64
    [H,W] trainIds with 255 = ignore (absent for the test split), ``name``, ``city`` and
    ``ori_size`` (the image's (H, W) on disk). ``transform`` is a joint callable (uint8 image,
    uint8 trainIds or None) -> (image, int64 label or None); None is ``EvalTransform(None)``.
    ``classes``, ``palette`` and ``ignore_index`` describe the labels."""

    classes: tuple[str, ...] = CLASS_NAMES
    palette: tuple[tuple[int, int, int], ...] = PALETTE
    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Transform | None = None,
        labels: bool | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.samples: list[Sample] = find_samples(self.root, split, labels)
        self.has_labels = self.samples[0].label is not None
        self.transform = EvalTransform(None) if transform is None else transform

    def load_label(self, index: int) -> torch.Tensor:
        """The uint8 trainIds [H, W] of sample ``index`` (255 = ignore), checked."""
        s = self.samples[index]
        return load_label(s.label, s.label_kind or "labelIds")

    def __repr__(self) -> str:
        return (
            f"CityscapesDataset(root='{self.root}', split='{self.split}', n={len(self)}, "
            f"transform={self.transform!r})"
        )


# ---------------------------------------------------------------- _labelTrainIds.png preparation


def find_label_id_files(root: str | os.PathLike) -> list[Path]:
    """Every ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` under ``root``, sorted."""
    root = Path(root)
    check_root(root)
    gt = root / LABEL_DIR
    if not gt.is_dir():
        raise DatasetError(f"no '{LABEL_DIR}' folder in Cityscapes root '{root}'; {LAYOUT}")
    files = sorted(gt.glob(f"*/*/*{LABEL_IDS_SUFFIX}"))
    if not files:
        raise DatasetError(f"no '*{LABEL_IDS_SUFFIX}' files under '{gt}/<split>/<city>/'; {LAYOUT}")
    return files


def train_ids_path(label_ids_path: str | os.PathLike) -> Path:
    """``..._gtFine_labelIds.png`` -> ``..._gtFine_labelTrainIds.png`` (same folder)."""
    p = Path(label_ids_path)
    if not p.name.endswith(LABEL_IDS_SUFFIX):
        raise ValueError(f"'{p}' is not a *{LABEL_IDS_SUFFIX} file")
    return p.with_name(p.name[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX)


def _needs_update(src: Path, dst: Path) -> bool:
    return not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime


def write_train_ids(label_ids_path: str | os.PathLike, force: bool = False) -> bool:
    """Write the ``_labelTrainIds.png`` of one ``_labelIds.png``; False if it was up to date. The
    values are the official table's (what cityscapesScripts' createTrainIdLabelImgs gives); the file
    is written to a temporary name and renamed, so an interrupted run leaves no partial PNG. Up to
    date means: it exists and is not older than its ``_labelIds.png``. Uses only numpy and PIL, so
    forked workers never run torch."""
    src = Path(label_ids_path)
    dst = train_ids_path(src)
    if not force and not _needs_update(src, dst):
        return False
    try:
        with open_image(src) as im:  # the size bound, from the header, before decoding
            im.load()
            if im.mode not in ("L", "P"):
                raise DatasetError(
                    f"label '{src}' must be a single-channel 8-bit PNG, got PIL mode {im.mode}"
                )
            ids = np.asarray(im)
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot decode '{src}' as PNG (corrupt or truncated?): {e}") from None
    check_label_values(ids, src, _MAX_LABEL_ID + 1, "Cityscapes label ids")
    image = Image.fromarray(ID_TO_TRAIN_ID[ids])
    atomic_write(dst, lambda f: image.save(f, format="PNG"), fsync=False)
    return True


def _write_train_ids_job(args: tuple[str, bool]) -> tuple[str, bool | None, str]:
    path, force = args
    try:
        return path, write_train_ids(path, force), ""
    except (DatasetError, OSError) as e:
        return path, None, str(e)


def prepare_train_ids(
    root: str | os.PathLike, workers: int = 1, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Write ``_labelTrainIds.png`` next to every ``_labelIds.png`` under ``root`` (all splits), in
    ``workers`` processes, skipping up-to-date files unless ``force``. Returns ``{"written": n,
    "skipped": n, "errors": [(path, message), ...]}``."""
    files = find_label_id_files(root)
    todo = [p for p in files if force or _needs_update(p, train_ids_path(p))]
    result: dict[str, Any] = {"written": 0, "skipped": len(files) - len(todo), "errors": []}
    jobs = [(str(p), True) for p in todo]
    with tqdm(total=len(jobs), desc="labelTrainIds", unit="img", disable=not progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            items = map(_write_train_ids_job, jobs)
            pool = None
        else:
            # fork: workers only run numpy/PIL, and spawn would re-import torch in each one.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = mp.get_context(method).Pool(min(workers, len(jobs)))
            items = pool.imap_unordered(_write_train_ids_job, jobs, chunksize=4)
        try:
            for path, wrote, err in items:
                if wrote is None:
                    result["errors"].append((path, err))
                else:
                    result["written"] += 1
                bar.update(1)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    result["errors"].sort()
    return result
