"""The datasets that the ``--data`` flags name, built in one place for every entry point.

``--data cityscapes`` reads ``--data-root`` (else $CITYSCAPES_DATASET, else data/cityscapes);
``--data synthetic`` reads a synthetic Cityscapes (``--data-root``, else a cache folder; train.py
makes it on first use); ``--data folder`` reads your own folders at ``--data-root``, described by
``--classes FILE``. The caller chooses the splits and gives each one's transform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from erfnet.data.cityscapes import CityscapesDataset, resolve_data_root
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
        missing = [
            flag
            for flag, value in (("--data-root DIR", root), ("--classes FILE", classes))
            if not value
        ]
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


def dataset_from_args(
    args: Any,
    splits: Sequence[str] = ("train", "val"),
    transforms: Mapping[str, Any] | None = None,
    *,
    labels: bool | None = None,
) -> list[Dataset]:
    """One dataset per split of ``splits``, as ``args`` describe them (``data``, ``data_root``,
    ``classes``: a classes file or an already loaded ``FolderSpec``); ``transforms[split]`` is
    that split's transform (absent: the image as on disk, for the evaluator). ``labels`` True
    makes a Cityscapes split without labels an error (None: labels for every split but test).
    Raises ``FlagError`` or ``DatasetError``."""
    check_data_flags(args)
    transforms = transforms or {}
    root = data_root_from_args(args)
    if args.data == "folder":  # labels arrive with 255 = ignore, as Cityscapes' do
        spec = args.classes if isinstance(args.classes, FolderSpec) else load_spec(args.classes)
        return [FolderDataset(root, spec, split, transforms.get(split)) for split in splits]
    return [CityscapesDataset(root, split, transforms.get(split), labels) for split in splits]
