"""Check a dataset's files before training: a fast header pass over every image and label.

Training reads a file only when a batch needs it, so without this pass a bad val image would
stop a run at its first validation, hours in. ``check_datasets`` opens every file with PIL and
checks that it is a complete image (a PNG: every chunk's checksum and the inflated size of its
image data, no unfiltering; any other format the loader reads - JPEG, BMP, TIFF, WebP - has no
such checksums and is fully decoded, which finds a truncated or damaged file), that it is within
the loader's size bound, that the label has the image's size (after EXIF orientation) and that
the label is one 8-bit channel.
All problems are reported at once, in one ``DatasetError`` with their count.

It works on any dataset with ``samples[i].image`` / ``samples[i].label`` (Path or None), like
``CityscapesDataset`` and ``FolderDataset``; datasets without ``samples`` are skipped.
Label *values* are checked when a label is decoded (``load_label``), not here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from erfnet.data.decode import DatasetError, open_image, size_mismatch

# Modes of a label PNG: one 8-bit channel (grey ids, or palette indices).
LABEL_MODES = frozenset({"L", "P"})
# EXIF orientations that swap width and height (transposed / rotated by 90 or 270 degrees).
_SWAPS_SIZE = frozenset({5, 6, 7, 8})
_SHOWN = 20  # problems listed in the message; the count covers all of them
PROGRESS_FROM = 500  # files; below this the pass takes well under a second


def image_header(path: Path, upright: bool = True) -> tuple[tuple[int, int], str]:
    """((height, width), PIL mode) of an image file, the size as displayed (after the EXIF
    orientation) when ``upright``, else as stored (labels are never rotated); ``DatasetError``
    for a file that cannot be read, is not a complete image (PNG checksums; other formats are
    decoded) or is over the loader's size bound."""
    try:
        with open_image(path) as im:
            (width, height), mode, exif = im.size, im.mode, im.info.get("exif")
            if im.format == "PNG":
                im.verify()  # every chunk's CRC up to IEND: finds truncated or damaged files
                check_png_data(path)  # valid chunks can still hold too little pixel data
            else:
                im.load()  # no checksums to verify: decode it all (PIL raises when truncated)
        orientation = 1
        if exif:
            tags = Image.Exif()
            tags.load(exif)
            orientation = tags.get(0x0112, 1)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"'{path}' does not exist") from None
    except UnidentifiedImageError:
        raise DatasetError(f"'{path}' is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for damaged files
        raise DatasetError(f"cannot decode '{path}' (corrupt or truncated?): {e}") from None
    if upright and orientation in _SWAPS_SIZE:
        width, height = height, width
    return (height, width), mode


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Samples per pixel of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's passes: (x start, y start, x step, y step).
# fmt: off
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
# fmt: on
_INFLATE_STEP = 1 << 20  # bytes inflated at a time: memory stays small for any image size


def png_data_size(width: int, height: int, bit_depth: int, color_type: int, interlace: int) -> int:
    """Bytes of filtered scanlines (one filter byte per row) a complete PNG's IDAT inflates to."""
    bits = _PNG_CHANNELS.get(color_type, 4) * bit_depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            total += h * (1 + (w * bits + 7) // 8)
    return total


def check_png_data(path: Path) -> None:
    """``DatasetError`` when a PNG's image data inflates to fewer bytes than its size needs:
    chunk checksums cannot see it, PIL's ``verify`` does not inflate, and torchvision's libpng
    aborts the whole process on such a file ("Not enough image data")."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return  # not a PNG: its decoder reports it
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    need = png_data_size(width, height, bit_depth, color_type, interlace)
    inflate, got, pos = zlib.decompressobj(), 0, 8
    try:
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == b"IDAT":
                chunk = data[pos + 8 : pos + 8 + length]
                while chunk and got < need:
                    got += len(inflate.decompress(chunk, _INFLATE_STEP))
                    chunk = inflate.unconsumed_tail
            pos += 12 + length
        got += len(inflate.flush())
    except zlib.error as e:
        raise DatasetError(f"cannot decode '{path}' (corrupt image data): {e}") from None
    if got < need:
        raise DatasetError(
            f"cannot decode '{path}' (truncated?): its image data holds {got} of the {need}"
            f" bytes a {width}x{height} PNG needs"
        )


def check_sample(
    image: Path, label: Path | None, label_modes: Collection[str] = LABEL_MODES
) -> list[str]:
    """The problems of one (image, label) pair, as messages naming the file; ``label_modes``:
    the PIL modes the dataset reads labels from (a dataset's own ``label_modes``, if it has one)."""
    problems = []
    try:
        image_size, _ = image_header(image)
    except DatasetError as e:
        problems.append(str(e))
        image_size = None
    if label is None:
        return problems
    try:
        label_size, label_mode = image_header(label, upright=False)
        if label_mode not in label_modes:
            problems.append(
                f"label '{label}' must be a single-channel PNG of class values (PIL modes"
                f" {', '.join(sorted(label_modes))}), got PIL mode {label_mode}"
            )
        elif image_size is not None and label_size != image_size:
            problems.append(size_mismatch(label, label_size, image, image_size))
    except DatasetError as e:
        problems.append(str(e))
    return problems


def check_datasets(datasets: Mapping[str, Any], progress: bool = True) -> dict[str, int | None]:
    """Check every sample of each named dataset; {name: files checked, or None if skipped}.
    Raises one ``DatasetError`` listing the first problems and their count."""
    checked: dict[str, int | None] = {}
    pairs: list[tuple[str, Path, Path | None, Collection[str]]] = []
    for name, ds in datasets.items():
        samples = getattr(ds, "samples", None)
        if samples is None:
            checked[name] = None
            continue
        modes = getattr(ds, "label_modes", LABEL_MODES)
        pairs += [
            (name, Path(s.image), None if s.label is None else Path(s.label), modes)
            for s in samples
        ]
        checked[name] = sum(1 + (s.label is not None) for s in samples)
    problems: list[str] = []
    # Threads overlap the reads (PIL's checksums release the GIL): a cold disk is the bottleneck.
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(lambda pair: check_sample(*pair[1:]), pairs)
        bar = tqdm(
            zip(pairs, results, strict=True),
            total=len(pairs),
            desc="checking data",
            unit="img",
            disable=not progress or len(pairs) < PROGRESS_FROM,
        )
        try:
            for (name, *_), found in bar:
                problems += [f"{name}: {p}" for p in found]
        except BaseException:  # a stop request: skip the files not started (not wait for them)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if problems:
        shown = "\n  ".join(problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        total = sum(n or 0 for n in checked.values())
        raise DatasetError(
            f"the data check found {len(problems)} problem(s) in {total} files (fix or remove"
            f" them; --skip-data-check skips this check):\n  {shown}{more}"
        )
    return checked
