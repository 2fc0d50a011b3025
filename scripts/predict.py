"""Segment images with a trained ERFNet: a colour map and a blend over the input per image.

    python scripts/predict.py street.png --checkpoint work_dirs/run/best.pth --out pred/
    python scripts/predict.py photos/ --checkpoint ckpt.pth --out pred/ --ms-flip --device cuda
    python scripts/predict.py photos/ --model erfnet.onnx --out pred/    # an export, on the CPU

For each image ``<name>.<ext>`` (a folder is searched recursively; sub-folders are kept) this
writes ``<out>/<name>_color.png`` (the checkpoint's class colours, ``meta["palette"]``) and
``<out>/<name>_blend.png`` (the colours over the image). No dataset is needed. Inference is
mmseg's test protocol: the image is resized on the 0-255 scale keeping its ratio to ``--scale``
(default the test size the checkpoint records, ``meta["test_size"]``: what train.py validated at,
or the source recipe's for converted weights; Cityscapes' 1024x2048 for older files) and
normalised with the checkpoint's mean / std, the logits are resized back to the image's size (in
strips above 256 MiB of logits, so memory stays bounded; the same labels); ``--ms-flip``
averages the softmax over the recipe's scales and flips, each view resized from the original
image.
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

from erfnet import runtime
from erfnet.data.check import check_png_data
from erfnet.data.decode import IMAGE_SUFFIXES, load_image
from erfnet.deploy.exported import load_network
from erfnet.distributed import resolve_device
from erfnet.errors import FlagError, UserError, cli_main, one_line
from erfnet.evaluation import inference
from erfnet.evaluation.visualize import blend, colorize, save_png
from erfnet.outputs import check_outputs, output_dir


def find_images(path: Path) -> list[tuple[Path, Path]]:
    """(image file, output stem relative to --out) for a file or every image under a folder. Files
    that differ only by extension (``x.png``, ``x.jpg``) keep it in their stem (``x.png_color.png``,
    ``x.jpg_color.png``), so that no output overwrites another."""
    if path.is_file():
        return [(path, Path(path.stem))]
    if path.is_dir():
        # Every image, "holiday_color.png" too: --out never lies inside the input (check_out),
        # so none of these is a file this script wrote.
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        stems = [p.relative_to(path).with_suffix("") for p in files]
        clash = Counter(str(s).lower() for s in stems)  # lower: case-insensitive file systems
        stems = [
            p.relative_to(path) if clash[str(s).lower()] > 1 else s
            for p, s in zip(files, stems, strict=True)
        ]
        if len({str(s).lower() for s in stems}) != len(stems):
            raise UserError(f"{path}: image names clash even with their extensions")
        return list(zip(files, stems, strict=True))
    raise UserError(f"{path}: no such file or folder")


def read_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB, upright (EXIF), 16-bit scaled to 8 (``load_image``); one line for a
    file that is not an image, or one too large to decode."""
    try:
        check_png_data(path)  # libpng would abort the process on PNG data too short for its size
        return load_image(path).permute(1, 2, 0).numpy()
    except Image.DecompressionBombError as e:  # PIL's pixel limit, where the decoder relays it
        raise UserError(f"image '{path}' is too large to decode: {e}") from None


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", help="an image file or a folder of images (searched recursively)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="our checkpoint (.pth)")
    what.add_argument("--model", help="an exported model (.onnx, OpenVINO .xml, .pt2), on the CPU")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test (slower)")
    p.add_argument("--scale", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="test scale; the image is resized keeping its ratio to fit it (default:"
                   " the test size the checkpoint records, meta['test_size']; without one"
                   f" {inference.DEFAULT_SETTINGS.scale[0]} {inference.DEFAULT_SETTINGS.scale[1]})")
    p.add_argument("--alpha", type=float, default=0.5, help="colour weight of the blend (0.5)")
    p.add_argument("--no-fast", action="store_true", help="use the plain model instead of the"
                   " fused inference path (same predictions)")
    runtime.add_runtime_flags(p)
    return p
# fmt: on


def check_args(args: argparse.Namespace) -> None:
    least = inference.MIN_VIEW
    if args.scale is not None and min(args.scale) < least:
        raise FlagError(
            f"--scale must be at least {least} {least}, got {args.scale[0]} {args.scale[1]}"
        )
    if not 0.0 <= args.alpha <= 1.0:
        raise FlagError(f"--alpha must be in [0, 1], got {args.alpha}")
    runtime.check_runtime_flags(args, exported=args.model is not None)


def check_out(args: argparse.Namespace) -> Path:
    """--out, refused in one line before any work by the one output rule: not writable, a
    file, the input or inside it (where a later run would take our PNGs for photos)."""
    inputs = [("", args.input), ("--checkpoint", args.checkpoint), ("--model", args.model)]
    check_outputs(output_dir("--out", args.out), inputs)
    return Path(args.out)


def predict_image(
    model: Any, path: Path, device: torch.device, settings: inference.TestSettings, palette: list
) -> tuple[np.ndarray, np.ndarray]:
    """(the image HxWx3, its colour map HxWx3) for one file; one line for what cannot work."""
    rgb = read_rgb(path)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device)  # predict() normalises it
    try:
        pred = inference.predict(model, image, rgb.shape[:2], settings)
    except ValueError as e:  # too small a view, an export's fixed size or argmax output
        raise UserError(f"{path}: {e}") from None
    except (RuntimeError, MemoryError) as e:  # out of memory, above all for a huge image
        h, w = rgb.shape[:2]
        raise UserError(f"{path} ({w}x{h} WxH): {one_line(e)}") from None
    return rgb, colorize(pred[0].to("cpu", torch.uint8).numpy(), palette, len(palette))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> list[Path]:
    check_args(args)
    images = find_images(Path(args.input))
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {args.input}")
    out_dir = check_out(args)
    device = resolve_device("cpu" if args.model else args.device)
    _, threads = runtime.apply_cpu_plan(device.type, 0, args.threads)
    # The fast path unless --no-fast; weights holding NaN are refused.
    model = load_network(args.checkpoint, args.model, device, threads, fast=not args.no_fast)
    # predict() normalises each resized view with the checkpoint's meta mean / std.
    settings = (
        inference.TestSettings(scale=tuple(args.scale), ms_flip=args.ms_flip)
        if args.scale is not None
        else inference.settings_for(model, ms_flip=args.ms_flip)  # the size the checkpoint records
    )
    palette = model.meta["palette"]  # one colour per class: the checkpoint's meta is complete
    written: list[Path] = []
    for path, stem in tqdm(images, desc="predict", unit="img", dynamic_ncols=True):
        rgb, color = predict_image(model, path, device, settings, palette)
        target = out_dir / stem
        for suffix, array in (("_color", color), ("_blend", blend(rgb, color, args.alpha))):
            written.append(save_png(array, target.with_name(target.name + suffix + ".png")))
    print(f"wrote {len(written)} files for {len(images)} image(s) to {out_dir}")
    return written


if __name__ == "__main__":
    runtime.tune_cpu_allocator()  # process-wide: this process gains from reusing its freed memory
    main()
