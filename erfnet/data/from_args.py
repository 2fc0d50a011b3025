"""The datasets that the ``--data`` flags name, built in one place for every entry point.

``--data cityscapes`` reads ``--data-root`` (else $CITYSCAPES_DATASET, else data/cityscapes);
``--data synthetic`` reads a synthetic Cityscapes (``--data-root``, else a cache folder; train.py
makes it on first use); ``--data folder`` reads your own folders at ``--data-root``, described by
``--classes FILE``. The caller chooses the splits and gives each one's transform.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from erfnet.data.cityscapes import CityscapesDataset, resolve_data_root
from erfnet.data.decode import DatasetError
from erfnet.data.folder import FolderDataset, FolderSpec, load_spec
from erfnet.data.synthetic import synthetic_cache_root
from erfnet.errors import FlagError

DATA_KINDS = ("cityscapes", "synthetic", "folder")


def check_data_flags(args: Any) -> None:
    """Raise ``FlagError`` unless ``args.data`` goes with ``data_root``, ``classes`` and
    ``data_cache`` (attributes that ``args`` lacks count as not given)."""
    data = args.data
    classes = getattr(args, "classes", None)
    if data not in DATA_KINDS:
        raise FlagError(f"--data must be one of {', '.join(DATA_KINDS)}, got {data!r}")
    if data == "folder":
        root = getattr(args, "data_root", None)
        given = (("--data-root DIR", root), ("--classes FILE", classes))
        missing = [flag for flag, value in given if not value]
        if missing:
            raise FlagError(f"--data folder needs {' and '.join(missing)}")
    elif classes is not None:
        raise FlagError(
            f"--classes describes a folder dataset; add --data folder (got --data {data})"
        )
    if getattr(args, "data_cache", None) is not None and data == "folder":
        raise FlagError(
            "--data-cache holds a Cityscapes train split (scripts/prepare_cityscapes.py --cache);"
            " it does not apply to --data folder"
        )


def data_root_from_args(args: Any) -> Path:
    """Where the files of ``args.data`` are (the defaults as the module docstring says)."""
    root = getattr(args, "data_root", None)
    if args.data == "synthetic":
        return Path(root) if root else synthetic_cache_root()
    if args.data == "folder":
        return Path(root)
    return resolve_data_root(root)


def data_inputs(
    root: Path | None,
    classes: str | os.PathLike | FolderSpec | None = None,
    *,
    root_flag: str = "--data-root",
    classes_flag: str = "--classes",
) -> list[tuple[str, Path]]:
    """What a dataset reads, as (label, path) inputs for the output rule: the classes file and
    the folders that hold the data (every split folder a classes file names, which may lie
    outside the root). The root itself is not one: a report beside the data replaces nothing."""
    if root is None:
        return []
    root = Path(root)
    if classes is None:
        return [(f"{root_flag} folder", root / sub) for sub in ("leftImg8bit", "gtFine")]
    try:
        spec = classes if isinstance(classes, FolderSpec) else load_spec(classes)
    except DatasetError:  # unreadable: the dataset says so in its own words, later
        return [(classes_flag, Path(classes))]
    found = [(classes_flag, spec.path)]
    if not spec.splits:
        return found + [(f"{root_flag} folder", root / sub) for sub in ("images", "labels")]
    for split, folders in spec.splits.items():
        for kind in ("images", "labels"):
            label = f"split '{split}' {kind} folder of {classes_flag} {spec.path}:"
            found.append((label, root / folders[kind]))
    return found


def data_inputs_from_args(args: Any) -> list[tuple[str, Path]]:
    """``data_inputs`` of ``--data`` / ``--data-root`` / ``--classes``."""
    return data_inputs(data_root_from_args(args), getattr(args, "classes", None))


def dataset_from_args(
    args: Any,
    splits: Sequence[str] = ("train", "val"),
    transforms: Mapping[str, Any] | None = None,
    *,
    labels: bool | None = None,
) -> list[Dataset]:
    """One dataset per split, as ``args`` describe them (``classes``: a file or a loaded
    ``FolderSpec``), with ``transforms[split]`` (absent: the image as on disk); ``labels`` True
    makes a Cityscapes split without labels an error (None: labels for every split but test)."""
    check_data_flags(args)
    transforms = transforms or {}
    root = data_root_from_args(args)
    if args.data == "folder":  # labels arrive with 255 = ignore, as Cityscapes' do
        spec = args.classes if isinstance(args.classes, FolderSpec) else load_spec(args.classes)
        return [FolderDataset(root, spec, split, transforms.get(split)) for split in splits]
    return [CityscapesDataset(root, split, transforms.get(split), labels) for split in splits]
