"""Per-class loss weights over a training split: the JSON file `train.py --class-weights` reads.

    python scripts/class_weights.py data/cityscapes --out class_weights.json
    python scripts/class_weights.py ROOT --data folder --classes camvid.json --method median

Two methods, over the labelled pixels of the split (the ignore value never counts):

- ``erfnet`` (default): ERFNet's (and ENet's) ``w = 1 / ln(c + p)``, ``p`` the class's share of
  all labelled pixels, ``c`` = 1.10 (``--c``); a class that never occurs gets ``1 / ln(c)``.
- ``median``: median-frequency balancing (Eigen & Fergus; SegNet): ``freq = pixels of the class /
  labelled pixels of the images in which it occurs``, ``w = median(freq) / freq``, the median over
  the classes that occur; a class that never occurs gets 0 (it has no pixel to weight).

Output: ``{"names", "weights", "method", "split", "images", "pixel_counts", ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from erfnet.config import IGNORE_INDEX
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.data.decode import check_label_values
from erfnet.data.folder import FolderDataset
from erfnet.data.from_args import DATA_KINDS, data_inputs_from_args, dataset_from_args
from erfnet.errors import UserError, cli_main
from erfnet.outputs import atomic_write_text, check_outputs, output_file

METHODS = ("erfnet", "median")
ERFNET_C = 1.10


def erfnet_c(text: str) -> float:
    """``--c``: a finite number above 1 (``1 / ln(c + p)`` is then positive and finite)."""
    try:
        c = float(text)
    except ValueError:
        c = math.nan
    if not (math.isfinite(c) and c > 1.0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 1, e.g. 1.10; got '{text}'")
    return c


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_root", metavar="root",
                   help="dataset root (Cityscapes, or the folder dataset's root)")
    p.add_argument("--data", choices=DATA_KINDS, default="cityscapes",
                   help="dataset kind (default: cityscapes)")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="--data folder: its JSON classes file")
    p.add_argument("--split", default="train", help="split to count (default: train)")
    p.add_argument("--method", choices=METHODS, default="erfnet", help="erfnet: 1 / ln(c + p);"
                   " median: median-frequency balancing (default: erfnet)")
    p.add_argument("--c", type=erfnet_c, default=ERFNET_C,
                   help=f"the erfnet method's c (default: {ERFNET_C})")
    p.add_argument("--out", metavar="FILE", default="class_weights.json",
                   help="output JSON (default: class_weights.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p
# fmt: on


def count_pixels(
    dataset: CityscapesDataset | FolderDataset, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(pixels per class, labelled pixels of the images in which each class occurs), int64 [C]."""
    num = len(dataset.classes)
    counts, present_pixels = np.zeros(num, dtype=np.int64), np.zeros(num, dtype=np.int64)
    for i in tqdm(range(len(dataset)), desc="labels", unit="img", disable=not progress):
        label = dataset.load_label(i)
        hist = np.bincount(label.numpy().ravel(), minlength=256)
        hist[IGNORE_INDEX] = 0
        check_label_values(np.flatnonzero(hist), dataset.samples[i].label, num, "classes")
        hist = hist[:num]
        counts += hist
        present_pixels[hist > 0] += int(hist.sum())
    return counts, present_pixels


def erfnet_weights(counts: Sequence[int], c: float = ERFNET_C) -> list[float]:
    """ERFNet's ``1 / ln(c + p)``, ``p`` each class's share of the labelled pixels."""
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("no labelled pixels")
    return [1.0 / math.log(c + n / total) for n in counts]


def median_frequency_weights(counts: Sequence[int], present_pixels: Sequence[int]) -> list[float]:
    """``median(freq) / freq`` with ``freq = pixels / labelled pixels of the images with the
    class``; 0 for a class that never occurs."""
    freq = [n / p if p > 0 and n > 0 else 0.0 for n, p in zip(counts, present_pixels, strict=True)]
    seen = [f for f in freq if f > 0]
    if not seen:
        raise ValueError("no labelled pixels")
    median = statistics.median(seen)
    return [median / f if f > 0 else 0.0 for f in freq]


def main(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    # before the count: no input (the classes file, a label) is ever replaced
    check_outputs(output_file("--out", out), data_inputs_from_args(args))
    (dataset,) = dataset_from_args(args, [args.split], labels=True)
    counts, present = count_pixels(dataset, progress=args.progress)
    if counts.sum() == 0:
        raise UserError(f"split '{args.split}' under '{args.data_root}' has no labelled pixel")
    if args.method == "erfnet":
        weights = erfnet_weights(counts.tolist(), args.c)
    else:
        weights = median_frequency_weights(counts.tolist(), present.tolist())
    data = {
        "names": list(dataset.classes),
        "weights": weights,
        "method": args.method,
        **({"c": args.c} if args.method == "erfnet" else {}),
        "split": args.split,
        "images": len(dataset),
        "pixel_counts": counts.tolist(),
    }
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    width = max(len(n) for n in dataset.classes)
    for name, w, n in zip(dataset.classes, weights, counts.tolist(), strict=True):
        print(f"{name:<{width}}  {w:8.4f}  ({n} px)")
    print(
        f"{args.method} weights of {len(dataset)} images written to {out};"
        f" train with --class-weights {out}"
    )


if __name__ == "__main__":
    sys.exit(main())
