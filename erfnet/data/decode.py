"""Decoding image and label files: the one image reader (``load_image``) and the PNG reader the
label loaders share. Every problem is a ``DatasetError`` naming the file.

PNGs go through libpng (torchvision), or pyspng when it is installed and the file is a plain
8-bit RGB image or grey label (the same values, faster); other formats through PIL. Images come
out upright (EXIF orientation applied) as uint8 RGB; a 16-bit image keeps its high byte.

Image size: PIL's limits stay PIL's (nothing here changes ``PIL.Image.MAX_IMAGE_PIXELS`` or a
warning filter). The project's bound, ``pixel_limit()``, is PIL's ``MAX_IMAGE_PIXELS`` as it is
when an image is read (89,478,485 pixels by default, e.g. 9,459 x 9,459; a process that raises
PIL's limit raises this one with it), capped at ``MAX_IMAGE_PIXELS`` = 2**31 / 3 (its uint8 RGB
copy stays under 2 GiB, the largest buffer every decoder and int32-indexed kernel takes). The
size comes from the header (PNG's IHDR and JPEG's frame header are read here, before PIL sees
the file; other formats from PIL's lazy open) and a larger image is refused with one
DatasetError line giving its size, before any pixel is decoded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from erfnet.errors import UserError

if TYPE_CHECKING:  # torchvision's io loads torch._dynamo (~2 s): imported where it decodes
    from torchvision.io import ImageReadMode


class DatasetError(UserError):
    """Files on disk that cannot be used (unreadable, undecodable, not in the expected layout);
    the message names the path."""


def check_label_values(
    values: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    num: int,
    what: str,
    ignore_index: int | None = None,
    hint: str = "",
) -> None:
    """The one bad-label-value check: ``DatasetError`` naming the label file and up to 10 of its
    values that are not ``what`` (0..num-1, or ``ignore_index``), with ``hint`` appended."""
    bad_mask = (values >= num) | (values < 0)
    if ignore_index is not None:
        bad_mask &= values != ignore_index
    if not bool(bad_mask.any()):
        return
    bad = np.unique(np.asarray(values[bad_mask]))[:10].tolist()
    expected = f"0..{num - 1}" + ("" if ignore_index is None else f" or {ignore_index}")
    raise DatasetError(
        f"label '{path}' has values {bad} that are not {what} (expected {expected}{hint})"
    )


# The image files a folder of inputs is searched for (scripts/predict.py, a video's frames).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
# The cap of pixel_limit() whatever PIL's limit says (None included).
MAX_IMAGE_PIXELS = 2**31 // 3
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they hold the size.
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_SEGMENTS = 4096  # markers read before giving up (PIL's open then reads the header)


def pixel_limit() -> int:
    """The most pixels an image may have here: PIL's ``Image.MAX_IMAGE_PIXELS`` now (its
    decompression-bomb bound, read at each call), at most ``MAX_IMAGE_PIXELS``."""
    pil = Image.MAX_IMAGE_PIXELS
    return MAX_IMAGE_PIXELS if pil is None else min(int(pil), MAX_IMAGE_PIXELS)


def check_pixels(path: os.PathLike, width: int, height: int) -> None:
    """``DatasetError`` for an image over ``pixel_limit()`` (from its header)."""
    if width * height > pixel_limit():
        raise _too_big(path, f"is {width}x{height} (WxH) = {width * height:,} pixels")


def _too_big(path: os.PathLike, size: str) -> DatasetError:
    return DatasetError(
        f"'{path}' {size}, more than the {pixel_limit():,} an image may have here"
        " (PIL.Image.MAX_IMAGE_PIXELS, its bomb limit); downscale or tile it"
    )


def _jpeg_size(f: Any) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, ``f`` just past its SOI marker; None where
    the markers are not what a JPEG holds."""
    for _ in range(_JPEG_SEGMENTS):
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of file / scan before a frame
            return None
        if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # markers without a length
            continue
        length = int.from_bytes(f.read(2), "big")
        if marker[0] in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                return None
            return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)
    return None


def header_size(path: os.PathLike) -> tuple[int, int] | None:
    """(width, height) of a PNG or JPEG read from its header alone; None for other formats (and
    files too damaged to say), whose size PIL's lazy open gives."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            if head[:2] == b"\xff\xd8":
                f.seek(2)
                return _jpeg_size(f)
    except OSError:
        return None  # PIL's open reports it
    return None


def open_image(path: os.PathLike) -> Image.Image:
    """``PIL.Image.open`` (header only) with the size bound of this module, checked from the
    header before PIL opens a PNG or JPEG; the caller closes it. PIL's errors pass through,
    except its decompression-bomb refusal (a DatasetError)."""
    size = header_size(path)
    if size is not None:
        check_pixels(path, *size)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # over twice PIL's limit: PIL gives the count
        found = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise _too_big(path, f"has {count}") from None
    try:
        check_pixels(path, *im.size)
    except DatasetError:
        im.close()
        raise
    return im


def _torch_io_message(e: Exception) -> str:
    """torchvision.io's message without its "function, file.cpp:line," prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^[^,]*, \S+:\d+, ", "", text)


_PYSPNG: list[Any] = []  # [module or None] once looked up


def _spng_decode(data: torch.Tensor, mode: ImageReadMode) -> torch.Tensor | None:
    """pyspng's decode (optional extra: ``pip install pyspng``; libspng, faster than libpng,
    above all on labels: docs/throughput.md) of a plain 8-bit, non-interlaced RGB image or grey
    label, the values libpng gives; None when pyspng is absent or the PNG is anything else."""
    if not _PYSPNG:
        try:
            import pyspng  # optional: torchvision's libpng decodes every PNG without it
        except ImportError:
            pyspng = None
        _PYSPNG.append(pyspng)
    from torchvision.io import ImageReadMode

    head = data[:29].tolist() if data.numel() >= 29 else []
    # IHDR: bit depth at byte 24, colour type at 25 (2 RGB, 0 grey), interlace at 28.
    want = 2 if mode == ImageReadMode.RGB else 0
    if _PYSPNG[0] is None or head[12:16] != list(b"IHDR") or head[24:26] != [8, want] or head[28]:
        return None
    array = torch.from_numpy(_PYSPNG[0].load(data.numpy().tobytes()))
    return array.permute(2, 0, 1) if array.dim() == 3 else array[None]  # a view, as libpng's


def read_png(path: Path, mode: ImageReadMode, exif: bool = False) -> torch.Tensor:
    # torchvision 0.29 deprecates its image codecs for TorchCodec (a DeprecationWarning hidden by
    # the default filters); still the fastest PNG path here, unless pyspng is installed.
    from torchvision.io import decode_png, read_file

    try:
        data = read_file(str(path))
    except (RuntimeError, OSError) as e:
        raise DatasetError(f"cannot read '{path}': {_torch_io_message(e)}") from None
    head = data[:24].tolist() if data.numel() >= 24 else []
    if head[12:16] == list(b"IHDR"):  # refuse a huge image before allocating for it
        size = [int.from_bytes(bytes(head[i : i + 4]), "big") for i in (16, 20)]
        check_pixels(path, *size)
    try:
        # pyspng does not apply the EXIF orientation: only where none is asked (labels).
        fast = None if exif else _spng_decode(data, mode)
        if fast is not None:
            return fast
        return decode_png(data, mode=mode, apply_exif_orientation=exif)
    except RuntimeError as e:
        raise DatasetError(
            f"cannot decode '{path}' as PNG (corrupt or truncated?): {_torch_io_message(e)}"
        ) from None


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as uint8 RGB [3, H, W], upright (its EXIF orientation applied); a 16-bit
    image keeps its high byte (``value >> 8``, as PIL and libpng's strip_16 read it)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from torchvision.io import ImageReadMode

        return to_uint8(read_png(path, ImageReadMode.RGB, exif=True))
    try:
        with open_image(path) as im:
            rgb = pil_rgb8(im)
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable files
        raise DatasetError(f"cannot read image '{path}': {e}") from None
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 as it is; uint16 (a 16-bit PNG) -> its high byte."""
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def pil_rgb8(img: Image.Image) -> np.ndarray:
    """A PIL image as HxWx3 uint8 RGB, upright, with ``load_image``'s 16-bit rule (high byte);
    for formats beyond PNG. PIL itself would clip 16-bit grey (mode I;16 / I) to white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))


def check_same_size(
    image: torch.Tensor, label: torch.Tensor, image_path: os.PathLike, label_path: os.PathLike
) -> None:
    """A label [H, W] must match its image [3, H, W]; else a DatasetError naming both files."""
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise DatasetError(size_mismatch(label_path, label.shape, image_path, image.shape[1:]))


def size_mismatch(
    label_path: os.PathLike,
    label_size: Sequence[int],
    image_path: os.PathLike,
    image_size: Sequence[int],
) -> str:
    """The message for a label whose (H, W) differs from its image's."""
    return (
        f"label '{label_path}' is {label_size[0]}x{label_size[1]} (HxW) but its image "
        f"'{image_path}' is {image_size[0]}x{image_size[1]}; they must be the same size"
    )
