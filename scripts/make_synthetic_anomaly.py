"""Write a small road-anomaly set in the validation pack's RoadAnomaly21 layout (no download).

    python scripts/make_synthetic_anomaly.py --root data/anomaly --images 20 --size 128 256

writes data/anomaly/RoadAnomaly21/images/*.png and labels_masks/*.png: the synthetic street
scenes of scripts/make_synthetic_cityscapes.py with 1-3 foreign objects (checkerboard ellipses
and boxes, a texture no class has) pasted on the road half. Masks: 1 anomaly, 0 known, 255 where
the scene's label is ignored. Score it with scripts/anomaly.py --data-root data/anomaly.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from erfnet.data.synthetic import make_synthetic_anomaly
from erfnet.errors import FlagError, UserError, run_cli
from erfnet.outputs import check_output_dir

SET_FOLDER = "RoadAnomaly21"


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", required=True, type=Path,
                   help=f"the pack folder; the set goes to ROOT/{SET_FOLDER} (must not exist)")
    p.add_argument("--images", type=int, default=20, help="how many images (default 20)")
    p.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"),
                   help="image height and width (default 128 256, the quick start's size)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p
# fmt: on


def main(args: argparse.Namespace) -> int:
    if args.images < 1:
        raise FlagError(f"--images must be at least 1, got {args.images}")
    if min(args.size) < 16:
        raise FlagError(f"--size H W must be at least 16 16, got {args.size[0]} {args.size[1]}")
    target = args.root / SET_FOLDER
    if target.exists():
        raise UserError(f"{target} exists; choose another --root (nothing is overwritten)")
    check_output_dir(args.root, "--root")  # an OutputError: one line, exit 1
    t0 = time.perf_counter()
    try:
        make_synthetic_anomaly(target, args.images, tuple(args.size), args.seed)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e}") from None
    h, w = args.size
    print(
        f"wrote {args.images} anomaly images of {h}x{w} (HxW) to {target} in"
        f" {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    raise SystemExit(run_cli(parser, lambda: main(args)))
