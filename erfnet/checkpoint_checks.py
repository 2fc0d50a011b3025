"""What a file must pass around ``torch.load``: the zip inflation bound (before a byte is
inflated), exports named as exports (never "an unsafe pickle"), and the meta values that readers
use (``meta_problem``). Plain checks returning or raising one line; ``erfnet.checkpoint`` and
``erfnet.convert`` call them."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

from erfnet.config import IGNORE_INDEX
from erfnet.errors import UserError
from erfnet.test_size import check_test_size

# Class ids live in uint8 label maps where IGNORE_INDEX (255) means "not labelled": 0..254.
MAX_CLASSES = IGNORE_INDEX

# Suffixes of exported models (ONNX, OpenVINO IR and its weights, torch.export, TorchScript,
# TensorRT, TFLite, Core ML): graphs for a runtime, never a checkpoint torch.load can read.
EXPORT_SUFFIXES = frozenset(
    {".onnx", ".xml", ".pt2", ".torchscript", ".ptl", ".engine", ".plan", ".trt", ".tflite"}
    | {".mlmodel", ".mlpackage", ".ort"}
)
# A zip's records may inflate to at most this many times the file's size (plus the slack):
# torch.save stores every record uncompressed, so a real checkpoint inflates to ~1x; one
# re-zipped with deflate shrinks float weights by well under 2x. 32x refuses a deflate bomb
# (up to ~1000x) before a byte is inflated; the slack covers tiny files, whose few records
# weigh little anyway.
MAX_INFLATION = 32
INFLATION_SLACK = 4 << 20


def check_inflation(path: Path, error: type[Exception] = UserError) -> None:
    """``error`` (one line) when the zip records of ``path`` would inflate to more than
    ``MAX_INFLATION`` x its size + ``INFLATION_SLACK``, read from the zip's central directory
    before ``torch.load`` inflates anything; a file that is not a zip passes (torch reports it)."""
    try:
        size = path.stat().st_size
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # unreadable or a damaged directory: torch.load's own message says which
    if inflated > MAX_INFLATION * size + INFLATION_SLACK:
        raise error(
            f"refusing to read {path}: its {size:,} bytes would inflate to {inflated:,}"
            f" ({inflated / max(size, 1):.0f}x; a checkpoint written by torch.save is stored"
            f" uncompressed, ~1x, and at most {MAX_INFLATION}x is read)"
        )


def export_kind(path: Path) -> str | None:
    """What export ``path`` is ('an ONNX model (.onnx)', ...), from its suffix or its first
    bytes; None for anything that may be a checkpoint."""
    suffix = path.suffix.lower()
    if suffix in EXPORT_SUFFIXES:
        return f"an exported model ({suffix})"
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return None
    if head.startswith((b"<?xml", b"<net")):
        return "an exported model (XML, OpenVINO IR?)"
    if head.startswith(b"PK") and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        if any(n.endswith(("archive_format", "/models/model.json")) for n in names):
            return "an exported program (torch.export .pt2)"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "a TorchScript model (torch.jit.save)"
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int_in(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def meta_problem(meta: dict[str, Any], num_classes: int) -> str | None:
    """What is wrong with the keys of ``meta`` that readers use (None when nothing is): each
    present key in the form ``complete_meta`` would write it."""
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is None:
            continue
        if not isinstance(v, list | tuple) or len(v) != 3 or not all(map(_is_number, v)):
            return f"meta {key} {v!r:.80}: three finite numbers (R, G, B, 0-255 scale) expected"
        if key == "std" and min(v) <= 0:
            return f"meta std {list(v)}: every value must be > 0 (images are divided by it)"
    names = meta.get("class_names")
    if names is not None and names != []:
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            return f"meta class_names {names!r:.80}: a list of strings expected"
        if len(names) != num_classes:
            return f"meta class_names has {len(names)} names for a model of {num_classes} classes"
    palette = meta.get("palette")
    if palette is not None:
        if not isinstance(palette, list | tuple) or len(palette) > MAX_CLASSES + 1:
            return f"meta palette {palette!r:.80}: a list of [R, G, B] triples expected"
        for i, rgb in enumerate(palette):
            if not isinstance(rgb, list | tuple) or len(rgb) != 3:
                return f"meta palette[{i}] {rgb!r:.40}: an [R, G, B] triple expected"
            if not all(_is_int_in(c, 0, 255) for c in rgb):
                return f"meta palette[{i}] {list(rgb)!r:.40}: integers 0-255 expected"
    if "ignore_index" in meta and not _is_int_in(meta["ignore_index"], 0, 255):
        return f"meta ignore_index {meta['ignore_index']!r:.40}: an integer 0-255 expected"
    if "test_size" in meta:
        try:
            check_test_size(meta["test_size"])
        except ValueError as e:
            return f"meta {e}"
    return None
