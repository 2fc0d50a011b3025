"""Write a synthetic Cityscapes in the official layout (for smoke runs, tests and benchmarks).

    python scripts/make_synthetic_cityscapes.py --root data/synthetic --train 16 --val 4 \
        --size 256 512 --seed 0

Sizes are height then width, like every size in the project (--size 256 512 is 256 rows by 512
columns; the real images are 1024 2048).

Images are street-like scenes whose classes have their own colour and stripe texture; labels are
real Cityscapes label ids (ignored ids included). The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from erfnet.data.synthetic import make_synthetic_cityscapes
from erfnet.errors import FlagError, UserError, cli_main
from erfnet.outputs import check_output_dir


def image_side(text: str) -> int:
    """One side of ``--size H W``: a whole number of pixels, at least 8."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 8:
        raise argparse.ArgumentTypeError(
            f"expected a height and a width in pixels (each >= 8), like --size 1024 2048;"
            f" got '{text}'"
        )
    return n


def non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return n


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", required=True, type=Path, help="output dataset root (created)")
    p.add_argument("--train", type=non_negative, default=8, help="train images (default 8)")
    p.add_argument("--val", type=non_negative, default=4, help="val images (default 4)")
    p.add_argument("--test", type=non_negative, default=0, help="test images (default 0)")
    p.add_argument("--size", type=image_side, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                   help="image height and width in pixels (default 1024 2048, the real size)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-extras", action="store_true",
                   help="write only images and _labelIds.png (skip _color, _instanceIds,"
                   " _polygons.json)")
    return p
# fmt: on


def main(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> None:
    if args.train + args.val + args.test == 0:
        raise FlagError("nothing to write: --train, --val and --test are all 0")
    if args.root.exists() and not args.root.is_dir():
        raise UserError(f"--root '{args.root}' exists and is not a folder")
    if args.root.is_dir() and any(args.root.iterdir()):
        # The files carry real Cityscapes names: writing into a used folder would overwrite a
        # real dataset's files or mix two synthetic ones (and leave stale _labelTrainIds.png).
        raise UserError(
            f"--root '{args.root}' is not empty; the synthetic files use real Cityscapes"
            " names and would overwrite or mix with what is there. Use a new or empty folder."
        )
    check_output_dir(args.root, "--root")  # created here: a typo fails now, one line
    t0 = time.perf_counter()
    size, extras = tuple(args.size), not args.no_extras
    root = make_synthetic_cityscapes(
        args.root, args.train, args.val, args.test, size, args.seed, extras
    )
    h, w = args.size
    print(
        f"wrote {args.train} train / {args.val} val / {args.test} test images of {h}x{w} (HxW)"
        f" to {root} in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
