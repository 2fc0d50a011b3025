"""Segment images with a trained ERFNet: a colour map and a blend over the input per image.

    python scripts/predict.py street.png --checkpoint work_dirs/run/best.pth --out pred/
    python scripts/predict.py photos/ --checkpoint ckpt.pth --out pred/ --ms-flip --device cuda
    python scripts/predict.py photos/ --model erfnet.onnx --out pred/    # an export, on the CPU

For each image ``<name>.<ext>`` (a folder is searched recursively; sub-folders are kept) this
writes ``<out>/<name>_color.png`` (the checkpoint's class colours, ``meta["palette"]``) and
``<out>/<name>_blend.png`` (the colours over the image). No dataset is needed. Inference is
mmseg's test protocol: the image is resized on the 0-255 scale keeping its ratio to ``--scale``
(default the recipe's 1024x2048) and normalised with the checkpoint's mean / std, the logits are
resized back to the image's size; ``--ms-flip`` averages the softmax over the recipe's scales
and flips, each view resized from the original image.
The model is ``erfnet.load_model(..., fast=True)`` (BatchNorm folded, channels_last): the same
predictions as the plain model, faster; or with ``--model`` an exported graph (``.onnx`` through
onnxruntime, OpenVINO ``.xml``, the optional extras), on the CPU.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from erfnet.checkpoint import CheckpointError, load_model
from erfnet.data.check import check_png_data
from erfnet.data.decode import DatasetError, load_image
from erfnet.distributed import resolve_device
from erfnet.evaluation.inference import DEFAULT_SETTINGS, MIN_VIEW, TestSettings, predict
from erfnet.evaluation.visualize import blend, colorize, save_png
from erfnet.runtime import (
    OutputError,
    apply_cpu_plan,
    check_output_dir,
    one_line,
    tune_cpu_allocator,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def find_images(path: Path) -> list[tuple[Path, Path]]:
    """(image file, output stem relative to --out) for a file or every image under a folder.

    Files that differ only by extension (``x.png``, ``x.jpg``) keep it in their stem
    (``x.png_color.png``, ``x.jpg_color.png``), so that no output overwrites another.
    """
    if path.is_file():
        return [(path, Path(path.stem))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        # Skip our own outputs if --out is inside the input folder.
        files = [p for p in files if not p.stem.endswith(("_color", "_blend"))]
        stems = [p.relative_to(path).with_suffix("") for p in files]
        clash = Counter(str(s).lower() for s in stems)  # lower: case-insensitive file systems
        stems = [
            p.relative_to(path) if clash[str(s).lower()] > 1 else s
            for p, s in zip(files, stems, strict=True)
        ]
        if len({str(s).lower() for s in stems}) != len(stems):
            raise SystemExit(f"error: {path}: image names clash even with their extensions")
        return list(zip(files, stems, strict=True))
    raise SystemExit(f"error: {path}: no such file or folder")


def read_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB, upright (EXIF), 16-bit scaled to 8 (``load_image``); one line for a
    file that is not an image, or one too large to decode."""
    try:
        check_png_data(path)  # libpng would abort the process on PNG data too short for its size
        return load_image(path).permute(1, 2, 0).numpy()
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    except Image.DecompressionBombError as e:  # PIL's pixel limit, where the decoder relays it
        raise SystemExit(f"error: image '{path}' is too large to decode: {e}") from None


# fmt: off
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", help="an image file or a folder of images (searched recursively)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="our checkpoint (.pth)")
    what.add_argument("--model", help="an exported model (.onnx, OpenVINO .xml, .pt2), on the CPU")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test (slower)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--scale", nargs=2, type=int, default=list(DEFAULT_SETTINGS.scale), metavar=("H", "W"),
        help="test scale; the image is resized keeping its ratio to fit it "
        f"(default {DEFAULT_SETTINGS.scale[0]} {DEFAULT_SETTINGS.scale[1]})",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="colour weight of the blend (0.5)")
    p.add_argument(
        "--no-fast", action="store_true",
        help="use the plain model instead of the fused inference path (same predictions)",
    )
    p.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads (default: the free cores less one, as train.py plans them)",
    )
    args = p.parse_args(argv)
    if min(args.scale) < MIN_VIEW:
        p.error(
            f"--scale must be at least {MIN_VIEW} {MIN_VIEW}, got {args.scale[0]} {args.scale[1]}"
        )
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args
# fmt: on


def load_predictor(args: argparse.Namespace, device: torch.device, threads: int) -> Any:
    """The checkpoint's model (fast path unless --no-fast), or with --model an exported graph
    (deploy is an opt-in layer: imported here only). Weights holding NaN are refused."""
    if args.model is not None:
        from erfnet.deploy.exported import ExportError, load_exported

        try:
            return load_exported(args.model, threads)
        except ExportError as e:
            raise SystemExit(f"error: --model {e}") from None
    try:
        return load_model(args.checkpoint, device, fast=not args.no_fast)
    except CheckpointError as e:
        raise SystemExit(f"error: --checkpoint: {e}") from None


def check_out(args: argparse.Namespace) -> Path:
    """--out, refused in one line before any work: not writable, a file, or the input itself."""
    try:
        return check_output_dir(args.out, "--out", [args.input])
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None


def predict_image(
    model: Any, path: Path, device: torch.device, settings: TestSettings, palette: list
) -> tuple[np.ndarray, np.ndarray]:
    """(the image HxWx3, its colour map HxWx3) for one file; one line for what cannot work."""
    rgb = read_rgb(path)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device)  # predict() normalises it
    try:
        pred = predict(model, image, rgb.shape[:2], settings)
    except ValueError as e:  # too small a view, an export's fixed size or argmax output
        raise SystemExit(f"error: {path}: {e}") from None
    except (RuntimeError, MemoryError) as e:  # out of memory, above all for a huge image
        h, w = rgb.shape[:2]
        raise SystemExit(f"error: {path} ({w}x{h} WxH): {one_line(e)}") from None
    return rgb, colorize(pred[0].to("cpu", torch.uint8).numpy(), palette, len(palette))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    images = find_images(Path(args.input))
    if not images:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) under {args.input}")
    out_dir = check_out(args)
    if args.model is not None and args.device not in ("cpu", "auto"):
        raise SystemExit(f"error: --model runs on the CPU, not on --device {args.device}")
    try:
        device = resolve_device("cpu" if args.model else args.device)
    except ValueError as e:  # a --device this machine does not have
        raise SystemExit(f"error: {e}") from None
    _, threads = apply_cpu_plan(device.type, 0, args.threads)
    model = load_predictor(args, device, threads)
    # predict() normalises each resized view with the checkpoint's meta mean / std.
    settings = TestSettings(scale=tuple(args.scale), ms_flip=args.ms_flip)
    palette = model.meta["palette"]  # one colour per class: the checkpoint's meta is complete
    written: list[Path] = []
    for path, stem in tqdm(images, desc="predict", unit="img", dynamic_ncols=True):
        rgb, color = predict_image(model, path, device, settings, palette)
        target = out_dir / stem
        for suffix, array in (("_color", color), ("_blend", blend(rgb, color, args.alpha))):
            try:
                written.append(save_png(array, target.with_name(target.name + suffix + ".png")))
            except OSError as e:  # already one line naming the file
                raise SystemExit(f"error: {e}") from None
    print(f"wrote {len(written)} files for {len(images)} image(s) to {out_dir}")
    return written


if __name__ == "__main__":
    tune_cpu_allocator()  # process-wide: this process gains from reusing its freed memory
    main()
