"""A decoded cache of a Cityscapes split: images and trainId labels as uncompressed uint8 arrays
that the loader memory-maps instead of decoding PNGs (``prepare_cityscapes.py --cache DIR``,
``train.py --data-cache DIR``).

    DIR/<split>/images.u8      every image as uint8 [3, H, W] (C, H, W order), back to back
    DIR/<split>/labels.u8      every label as uint8 trainIds [H, W]
    DIR/<split>/manifest.json  per sample: source files (path relative to the root, size,
                               mtime), shape, offsets and a CRC-32 of the image's and of the
                               label's bytes; written last

A cache is refused with a ``CacheError`` naming what is wrong when its manifest is missing (the
writer did not finish) or malformed, a data file's size differs from the manifest's (truncated), or
a source file changed (size or mtime) since it was written. Each sample's bytes are checked against
their CRC-32 whenever it is read (a few ms per full-size pair: docs/data.md), so a file damaged in
place stops the run with one line naming the sample. Cityscapes train takes 18.7 GB of images and
6.2 GB of labels.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from erfnet.data.cityscapes import CityscapesDataset, DatasetError, Sample, Transform
from erfnet.outputs import PathLike, atomic_write

VERSION = 2  # 2: per-sample CRC-32s
MANIFEST, IMAGES, LABELS = "manifest.json", "images.u8", "labels.u8"
REBUILD = "rebuild it with: python scripts/prepare_cityscapes.py --root ROOT --cache DIR"


class CacheError(DatasetError):
    """A decoded cache that does not match its dataset, or is incomplete."""


def _source(root: Path, path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    st, rel = path.stat(), path.relative_to(root).as_posix()
    return {"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sources(dataset: CityscapesDataset, s: Sample) -> dict[str, Any]:
    root = dataset.root
    return {"name": s.name, "image": _source(root, s.image), "label": _source(root, s.label)}


class _Decode(Dataset):
    """(index, image, label) of a dataset, decoded in loader workers."""

    def __init__(self, dataset: CityscapesDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        # Errors travel back as text: the writer raises them as one clean CacheError.
        try:
            image, label = self.dataset.load(i)
        except DatasetError as e:
            return i, None, str(e)
        if label is None:
            return i, None, f"'{self.dataset.samples[i].image}' has no label to cache"
        return i, image, label


def write_cache(
    root: PathLike, out_dir: PathLike, split: str = "train", workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Decode every pair of ``split`` under ``root`` (as the PNG loader does: trainIds, checked)
    into ``out_dir/split``; returns ``{"images": n, "bytes": total}``. The manifest is removed
    first and written last, so an interrupted run leaves a cache that is refused."""
    dataset = CityscapesDataset(root, split)
    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    entries = [_sources(dataset, s) for s in dataset.samples]
    loader = DataLoader(_Decode(dataset), batch_size=None, num_workers=workers)
    img_off = lab_off = 0
    with (
        open(folder / IMAGES, "wb") as fi,
        open(folder / LABELS, "wb") as fl,
        tqdm(total=len(dataset), desc=f"cache {split}", unit="img", disable=not progress) as bar,
    ):
        for i, image, label in loader:  # in order: the files are written sequentially
            if image is None:
                raise CacheError(label)
            h, w = int(image.shape[1]), int(image.shape[2])
            image_bytes = image.contiguous().numpy().tobytes()
            label_bytes = label.contiguous().numpy().tobytes()
            entries[i].update(
                height=h,
                width=w,
                image_offset=img_off,
                label_offset=lab_off,
                image_crc32=zlib.crc32(image_bytes),
                label_crc32=zlib.crc32(label_bytes),
            )
            fi.write(image_bytes)
            fl.write(label_bytes)
            img_off, lab_off = img_off + 3 * h * w, lab_off + h * w
            bar.update(1)
    manifest = {
        "version": VERSION,
        "split": split,
        "root": str(dataset.root.resolve()),
        "image_bytes": img_off,
        "label_bytes": lab_off,
        "samples": entries,
    }
    # Last, so that a manifest exists only beside complete image and label files.
    atomic_write(folder / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
    return {"images": len(entries), "bytes": img_off + lab_off, "folder": str(folder)}


_ENTRY_INTS = ("height", "width", "image_offset", "label_offset", "image_crc32", "label_crc32")


def _read_manifest(folder: Path) -> list[dict[str, Any]]:
    """The manifest's samples after checking its layout: a JSON object of this version, samples
    with a name, a shape and CRCs that tile the data files back to back, whose sizes match."""
    path = folder / MANIFEST
    where = f"decoded cache '{path}'"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{where} is unreadable ({e}); {REBUILD}") from None
    except RecursionError:  # thousands of nested brackets: json's parser recurses
        raise CacheError(f"{where} is unreadable (JSON nested too deeply); {REBUILD}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("samples"), list):
        raise CacheError(f'{where} is not a manifest (a JSON object with "samples"); {REBUILD}')
    if manifest.get("version") != VERSION:
        raise CacheError(
            f"decoded cache '{folder}' has version {manifest.get('version')}, this "
            f"code reads {VERSION}; {REBUILD}"
        )
    img_end = lab_end = 0
    for n, e in enumerate(manifest["samples"]):
        ok = isinstance(e, dict) and isinstance(e.get("name"), str)
        ok = ok and all(isinstance(e.get(k), int) and e[k] >= 0 for k in _ENTRY_INTS)
        if not ok:
            raise CacheError(f"{where}: sample {n} lacks a name, shape, offsets or CRCs; {REBUILD}")
        if (e["image_offset"], e["label_offset"]) != (img_end, lab_end):
            raise CacheError(
                f"{where}: sample {n} ({e['name']}) does not start where the one before it ends;"
                f" {REBUILD}"
            )
        img_end += 3 * e["height"] * e["width"]
        lab_end += e["height"] * e["width"]
    for name, want in ((IMAGES, img_end), (LABELS, lab_end)):
        have = (folder / name).stat().st_size if (folder / name).is_file() else 0
        if have != want:
            raise CacheError(
                f"decoded cache '{folder / name}' is {have} bytes, its manifest's "
                f"{len(manifest['samples'])} samples need {want}: truncated or "
                f"partial; {REBUILD}"
            )
    return manifest["samples"]


def check_cache(folder: Path, dataset: CityscapesDataset) -> list[dict[str, Any]]:
    """The manifest's samples, in the dataset's order, after checking that the cache is complete
    and that no source file changed since it was written; ``CacheError`` otherwise."""
    path = folder / MANIFEST
    if not path.is_file():
        detail = "it does not exist" if not folder.is_dir() else "it has no manifest.json"
        raise CacheError(
            f"decoded cache '{folder}': {detail} (not a cache, or its writer was interrupted); "
            + REBUILD
        )
    samples = _read_manifest(folder)
    by_name = {e["name"]: e for e in samples}
    names = [s.name for s in dataset.samples]
    missing = [n for n in names if n not in by_name]
    extra = sorted(set(by_name) - set(names))
    if missing or extra:
        what = f"{missing[0]} is not in it" if missing else f"{extra[0]} is no longer in the data"
        raise CacheError(
            f"decoded cache '{folder}' is stale: it holds {len(samples)} images, "
            f"{dataset.root} has {len(names)} ({what}); {REBUILD}"
        )
    for s in dataset.samples:
        now, then = _sources(dataset, s), by_name[s.name]
        for key in ("image", "label"):
            if now[key] != then.get(key):
                src = now[key]["path"] if now[key] else key
                raise CacheError(
                    f"decoded cache '{folder}' is stale: '{src}' changed since it was "
                    f"written (size or modification time); {REBUILD}"
                )
    return [by_name[n] for n in names]


class CachedCityscapesDataset(CityscapesDataset):
    """``CityscapesDataset`` whose ``load`` reads the decoded cache in ``cache_dir`` (checked
    against the files under ``root`` on construction) instead of decoding PNGs. Items are the
    same tensors."""

    def __init__(
        self, root: PathLike, split: str, cache_dir: PathLike, transform: Transform | None = None
    ) -> None:
        super().__init__(root, split, transform=transform, labels=True)
        self.cache_folder = Path(cache_dir) / split
        self.entries = check_cache(self.cache_folder, self)
        self._maps: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes map the files themselves (a mapping must not be pickled as data).
        return {**self.__dict__, "_maps": None}

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._maps is None:
            # Copy-on-write: writable tensors without copying, the file is never modified.
            self._maps = (
                np.memmap(self.cache_folder / IMAGES, np.uint8, mode="c"),
                np.memmap(self.cache_folder / LABELS, np.uint8, mode="c"),
            )
        e, (images, labels) = self.entries[index], self._maps
        h, w, i, j = e["height"], e["width"], e["image_offset"], e["label_offset"]
        image, label = images[i : i + 3 * h * w], labels[j : j + h * w]
        # zlib releases the GIL; one pass over bytes the transform reads next anyway
        checks = ((IMAGES, image, e["image_crc32"]), (LABELS, label, e["label_crc32"]))
        for name, data, want in checks:
            if zlib.crc32(data) != want:
                raise CacheError(
                    f"decoded cache '{self.cache_folder / name}': the bytes of {e['name']} do not"
                    f" match their checksum (the file was damaged or overwritten); {REBUILD}"
                )
        return torch.from_numpy(image.reshape(3, h, w)), torch.from_numpy(label.reshape(h, w))

    def __repr__(self) -> str:
        return (
            f"CachedCityscapesDataset(root='{self.root}', split='{self.split}', n={len(self)}, "
            f"cache='{self.cache_folder}', transform={self.transform!r})"
        )
