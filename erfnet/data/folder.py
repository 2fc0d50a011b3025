"""A dataset of one's own: image / label folders described by one JSON "classes file".

    {
      "names": ["road", "sidewalk", ...],            one per class (train id = position)
      "palette": [[128, 64, 128], [244, 35, 232], ...],  one RGB triple per class
      "ignore_index": 255,                         label value meaning "not labelled" (default 255)
      "label_map": {"0": 255, "7": 0, "8": 1},     optional: stored value -> train id
      "splits": {"train": {"images": "images/train", "labels": "labels/train"}, ...},
      "image_suffix": ".jpg",                      (default ".png")
      "label_suffix": ".png"                       (default ".png")
    }

``splits`` is optional (default ``images/<split>`` and ``labels/<split>`` under the root). An image
and its label pair up by their path relative to the split folder and their stem (the suffix
stripped); sub-folders are searched recursively (linked ones too, each folder once), suffixes
matched case-insensitively (``s1.PNG`` is a ``.png``). Label PNGs are read as the values stored
in them (a palette PNG's indices, never its colours; 16-bit PNGs too). With ``label_map`` every
stored value it does not name becomes ``ignore_index``; without it the stored values are the
train ids and any other value is an error naming the file.

Items carry labels with the project's ignore value 255 (``IGNORE_INDEX``) wherever the file holds
``ignore_index`` (or an unmapped value), so the loss, the crop, the metric and the checkpoint meta
work exactly as for Cityscapes. Every problem is a ``DatasetError`` naming the file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erfnet.config import IGNORE_INDEX, MEAN_RGB, STD_RGB
from erfnet.data.cityscapes import PairDataset, Sample, Transform
from erfnet.data.decode import DatasetError, check_label_values, open_image
from erfnet.data.transforms import EvalTransform
from erfnet.outputs import PathLike, printable

# Stored label values a label_map may name: 16-bit PNGs hold up to 65535.
MAX_STORED_VALUE = 65535
# Train ids and the ignore value live in uint8 label tensors.
MAX_TRAIN_ID = 255
# PIL modes whose pixels are the stored values ("P": the palette indices, not the colours).
_LABEL_MODES = ("L", "P", "1", "I;16", "I;16L", "I;16B", "I")


@dataclass(frozen=True)
class FolderSpec:
    """A checked classes file. ``label_map`` is None when the stored values are the train ids."""

    path: Path
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    label_map: dict[int, int] | None = None
    splits: dict[str, dict[str, str]] = field(default_factory=dict)
    image_suffix: str = ".png"
    label_suffix: str = ".png"

    def split_dirs(self, split: str) -> tuple[str, str]:
        """(images, labels) folders of ``split``, relative to the root."""
        if self.splits:
            if split not in self.splits:
                raise DatasetError(
                    f"classes file '{self.path}': no split '{split}' in its \"splits\""
                    f" (it has {sorted(self.splits)})"
                )
            return self.splits[split]["images"], self.splits[split]["labels"]
        return f"images/{split}", f"labels/{split}"

    @cached_property
    def lookup_table(self) -> np.ndarray | None:
        """Stored value -> train id (uint8, 255 = ignore) for values up to the largest key
        (built once per spec: every label of the dataset goes through it)."""
        if self.label_map is None:
            return None
        # At least every 8- and 16-bit value (64 KiB): such labels index it directly.
        lut = np.full(max(max(self.label_map) + 1, 1 << 16), IGNORE_INDEX, dtype=np.uint8)
        for stored, train_id in self.label_map.items():
            lut[stored] = IGNORE_INDEX if train_id == self.ignore_index else train_id
        return lut


SPEC_KEYS = tuple(f.name for f in fields(FolderSpec) if f.name != "path")  # the file's keys


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_spec(path: str | os.PathLike) -> FolderSpec:
    """Read and check a classes file; a ``DatasetError`` names the file and the bad key."""
    path = Path(path)
    where = f"classes file '{path}'"
    data = _read_spec_json(path, where)
    names, palette = _names_and_palette(data, where)
    num = len(names)
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if not (_is_int(ignore) and num <= ignore <= MAX_TRAIN_ID):
        raise DatasetError(
            f'{where}: "ignore_index" must be an integer in {num}..{MAX_TRAIN_ID} (not a class'
            f" id 0..{num - 1}), got {ignore!r}"
        )
    label_map, splits = _label_map(data, where, num, ignore), _splits(data, where)
    suffixes = {}
    for key in ("image_suffix", "label_suffix"):
        value = data.get(key, ".png")
        # The ending of the file name with its extension: ".png", "_mask.png"; "png" alone
        # would match "s0.png" as "s0." and "logo_png" too.
        if not (isinstance(value, str) and "." in value and not value.endswith(".")):
            hint = f' (with its dot: ".{value}")' if isinstance(value, str) and value else ""
            raise DatasetError(
                f'{where}: "{key}" must be a file ending with its extension such as ".png" or'
                f' "_mask.png", got {value!r}{hint}'
            )
        suffixes[key] = value.lower()  # matched case-insensitively: "s1.PNG" is a ".png"
    return FolderSpec(
        path=path,
        names=tuple(names),
        palette=tuple((c[0], c[1], c[2]) for c in palette),
        ignore_index=ignore,
        label_map=label_map,
        splits=splits,
        **suffixes,
    )


def _read_spec_json(path: Path, where: str) -> dict[str, Any]:
    """The classes file as a JSON object with only known keys."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(f"{where} is a folder; give the JSON file") from None
    except OSError as e:
        raise DatasetError(f"{where}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where} is not valid JSON ({e})") from None
    except RecursionError:  # "[[[[...]]]]" thousands deep: json's parser recurses
        raise DatasetError(f"{where}: JSON nested too deeply to be a classes file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object with keys {list(SPEC_KEYS)}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    return data


def _names_and_palette(data: dict[str, Any], where: str) -> tuple[list[str], list[list[int]]]:
    """ "names" (unique, at most MAX_TRAIN_ID) and one [R, G, B] "palette" colour per name."""
    names = data.get("names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise DatasetError(f'{where}: "names" must be a non-empty list of class names')
    unprintable = [printable(n) for n in names if printable(n) != n]
    if unprintable:  # a newline in a name would forge train.log lines; U+202E reverses them
        raise DatasetError(
            f'{where}: "names" holds control characters (newline, tab, bidi override ...):'
            f" {unprintable[:3]}; class names are plain text"
        )
    if len(names) > MAX_TRAIN_ID:  # first: the duplicate listing below is pointless past it
        raise DatasetError(f'{where}: {len(names)} "names"; at most {MAX_TRAIN_ID} classes')
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        shown = repeated[:10] + (["..."] if len(repeated) > 10 else [])
        raise DatasetError(f'{where}: "names" repeats {shown}')
    palette = data.get("palette")
    ok = isinstance(palette, list) and all(
        isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
        for c in palette
    )
    if not ok:
        raise DatasetError(f'{where}: "palette" must be a list of [R, G, B] triples of 0..255')
    if len(palette) != len(names):
        raise DatasetError(
            f'{where}: {len(names)} "names" but {len(palette)} "palette" colours; one per class'
        )
    return names, palette


def _label_map(data: dict[str, Any], where: str, num: int, ignore: int) -> dict[int, int] | None:
    """The optional "label_map" {stored value: train id or ignore_index}, keys as integers."""
    if "label_map" not in data:
        return None
    raw = data["label_map"]
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{where}: "label_map" must be an object {{"stored": train_id}}')
    label_map: dict[int, int] = {}
    spelled: dict[int, str] = {}
    for key, value in raw.items():
        if key.isascii() and key.isdigit() and int(key) in spelled:  # "1" and "01"
            raise DatasetError(
                f'{where}: "label_map" names the stored value {int(key)} twice'
                f' ("{spelled[int(key)]}" and "{key}"); keep one'
            )
        if not (key.isascii() and key.isdigit() and int(key) <= MAX_STORED_VALUE):
            raise DatasetError(
                f'{where}: "label_map" key {key!r} is not a stored label value'
                f" 0..{MAX_STORED_VALUE} (a decimal string)"
            )
        if not (_is_int(value) and (0 <= value < num or value == ignore)):
            raise DatasetError(
                f'{where}: "label_map" maps {key} to {value!r}; expected a train id'
                f' 0..{num - 1} or "ignore_index" {ignore}'
            )
        label_map[int(key)] = value
        spelled[int(key)] = key
    return label_map


def _splits(data: dict[str, Any], where: str) -> dict[str, dict[str, str]]:
    """The optional "splits" {split: {"images": DIR, "labels": DIR}}; empty when absent."""
    if "splits" not in data:
        return {}
    raw = data["splits"]
    ok = (
        isinstance(raw, dict)
        and raw
        and all(
            isinstance(v, dict)
            and set(v) == {"images", "labels"}
            and all(isinstance(p, str) and p for p in v.values())
            for v in raw.values()
        )
    )
    if not ok:
        raise DatasetError(
            f'{where}: "splits" must map each split to {{"images": DIR, "labels": DIR}}'
            " (folders relative to the data root)"
        )
    return {str(k): dict(v) for k, v in raw.items()}


def _scan(folder: Path, suffix: str, skip_suffix: str | None) -> dict[str, Path]:
    """relative/stem -> path for every ``*suffix`` file under ``folder`` (recursive; suffixes
    matched case-insensitively, ``suffix`` given in lower case). Linked sub-folders are
    followed; a folder reached a second time (a link back up: a loop) is not walked again."""
    out: dict[str, Path] = {}
    walked: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in walked:
            dirnames[:] = []  # the loop guard
            continue
        walked.add((stat.st_dev, stat.st_ino))
        dirnames.sort()
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            lower = name.lower()
            if not lower.endswith(suffix) or len(name) == len(suffix):
                continue
            if skip_suffix is not None and lower.endswith(skip_suffix):
                continue  # the other role's file in a shared folder
            out[(rel / name[: -len(suffix)]).as_posix()] = Path(dirpath) / name
    return out


def find_pairs(root: str | os.PathLike, spec: FolderSpec, split: str) -> list[Sample]:
    """Pair the images and labels of ``split``; a file without its partner is an error."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--data-root '{root}' is not a folder (classes file '{spec.path}')")
    img_rel, lab_rel = spec.split_dirs(split)
    img_dir, lab_dir = root / img_rel, root / lab_rel
    for kind, folder in (("image", img_dir), ("label", lab_dir)):
        if not folder.is_dir():
            raise DatasetError(
                f"{kind} folder '{folder}' of split '{split}' does not exist (set by"
                f" '{spec.path}'{'' if spec.splits else ' default images/<split>, labels/<split>'})"
            )
    same = img_dir.resolve() == lab_dir.resolve()
    img_suf, lab_suf = spec.image_suffix, spec.label_suffix

    def skip(mine: str, other: str) -> str | None:
        return other if same and len(other) > len(mine) and other.endswith(mine) else None

    images = _scan(img_dir, img_suf, skip(img_suf, lab_suf))
    labels = _scan(lab_dir, lab_suf, skip(lab_suf, img_suf))
    if not images:
        raise DatasetError(f"split '{split}' is empty: no '*{img_suf}' files under '{img_dir}'")
    for key in sorted(labels):
        if key not in images:
            raise DatasetError(
                f"label '{labels[key]}' has no image: expected '{img_dir / (key + img_suf)}'"
            )
    samples = []
    for key in sorted(images):
        if key not in labels:
            raise DatasetError(
                f"image '{images[key]}' has no label: expected '{lab_dir / (key + lab_suf)}'"
            )
        rel = Path(key)
        sub = "" if rel.parent == Path(".") else rel.parent.as_posix()
        samples.append(Sample(rel.name, sub, images[key], labels[key], "stored"))
    return samples


def read_label_values(path: str | os.PathLike) -> np.ndarray:
    """A label image's stored values [H, W] (a palette PNG's indices, never its colours)."""
    path = Path(path)
    try:
        with open_image(path) as im:
            im.load()
            mode = im.mode
            if mode not in _LABEL_MODES:
                raise DatasetError(
                    f"label '{path}' is a {mode} image; expected one channel of class values"
                    " (8-bit, 16-bit or a palette PNG): colour-coded labels must be converted"
                    " to class indices first"
                )
            values = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read label '{path}' ({e})") from None
    return values.astype(np.uint8) if values.dtype == bool else values


def to_train_ids(values: np.ndarray, spec: FolderSpec, path: str | os.PathLike) -> torch.Tensor:
    """Stored values -> uint8 train ids with 255 for ignored pixels, checked against ``spec``."""
    lut = spec.lookup_table
    if lut is not None:
        if values.dtype in (np.uint8, np.uint16):  # the per-sample path: one lookup, no copies
            return torch.from_numpy(lut[values])
        wide = values.astype(np.int64, copy=False)
        inside = (wide >= 0) & (wide < len(lut))
        if bool(inside.all()):
            out = lut[wide]
        else:  # values the map does not name are ignored
            out = np.full(values.shape, IGNORE_INDEX, dtype=np.uint8)
            out[inside] = lut[wide[inside]]
        return torch.from_numpy(np.ascontiguousarray(out))
    what = f"train ids of '{spec.path}'"
    hint = ' = ignore_index; add a "label_map" to map stored values'
    check_label_values(values, path, len(spec.names), what, spec.ignore_index, hint)
    out = values.astype(np.uint8)
    if spec.ignore_index != IGNORE_INDEX:
        out[values == spec.ignore_index] = IGNORE_INDEX
    return torch.from_numpy(np.ascontiguousarray(out))


class FolderDataset(PairDataset):
    """``split`` of a folder dataset under ``root``, described by ``spec`` (a classes file path
    or a ``FolderSpec``), with ``CityscapesDataset``'s interface (``city``: the sub-folder, ""
    when flat); ``mean`` / ``std``: the normalisation a checkpoint records."""

    ignore_index: int = IGNORE_INDEX
    label_modes: tuple[str, ...] = _LABEL_MODES  # the label PNG modes the data check accepts
    mean: tuple[float, float, float] = MEAN_RGB
    std: tuple[float, float, float] = STD_RGB

    def __init__(
        self,
        root: PathLike,
        spec: FolderSpec | PathLike,
        split: str,
        transform: Transform | None = None,
    ) -> None:
        self.spec = spec if isinstance(spec, FolderSpec) else load_spec(spec)
        self.root = Path(root)
        self.split = split
        self.classes: tuple[str, ...] = self.spec.names
        self.palette: tuple[tuple[int, int, int], ...] = self.spec.palette
        self.samples: list[Sample] = find_pairs(self.root, self.spec, split)
        self.has_labels = True
        self.transform = EvalTransform(None) if transform is None else transform

    def load_label(self, index: int) -> torch.Tensor:
        """The uint8 train ids [H, W] of sample ``index`` (255 = ignore), checked."""
        path = self.samples[index].label
        return to_train_ids(read_label_values(path), self.spec, path)

    def __repr__(self) -> str:
        return (
            f"FolderDataset(root='{self.root}', classes='{self.spec.path}', split='{self.split}',"
            f" n={len(self)}, transform={self.transform!r})"
        )
