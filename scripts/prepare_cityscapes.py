"""Write ``_gtFine_labelTrainIds.png`` next to every ``_gtFine_labelIds.png`` of a Cityscapes root.

    python scripts/prepare_cityscapes.py --root data/cityscapes --workers 8
    python scripts/prepare_cityscapes.py --root data/cityscapes --cache /fast/cityscapes_u8

The values are those of cityscapesScripts' createTrainIdLabelImgs (the 19 evaluated classes as
0..18, everything else 255). Idempotent: files newer than their _labelIds.png are skipped unless
--force. The loader reads _labelTrainIds.png when present and maps _labelIds.png otherwise, so this
step only saves the mapping at training time.

--cache DIR then also writes a decoded cache of --cache-splits (default train): the images and
trainId labels as uncompressed uint8 arrays that `train.py --data-cache DIR` memory-maps instead
of decoding PNGs (Cityscapes train: 18.7 GB of images + 6.2 GB of labels; see docs/throughput.md).
A cache whose source files changed, or that was left partial, is refused with a clear error.
"""

from __future__ import annotations

import argparse
import os
import time

from erfnet.data.cityscapes import ENV_VAR, SPLITS, prepare_train_ids, resolve_data_root
from erfnet.data.decode import DatasetError
from erfnet.data.fast.cache import write_cache
from erfnet.errors import FlagError, UserError, cli_main
from erfnet.outputs import check_outputs, output_dir, same_file


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", default=None,
                   help=f"Cityscapes root (default: ${ENV_VAR}, else data/cityscapes)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel processes (default: min(8, CPUs))")
    p.add_argument("--force", action="store_true", help="rewrite files that are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="also write a decoded uint8 cache of --cache-splits here")
    p.add_argument("--cache-splits", nargs="+", choices=SPLITS[:2], default=["train"],
                   help="splits to cache (default: train)")
    return p
# fmt: on


def main(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise FlagError(f"--workers must be >= 1, got {args.workers}")
    root = resolve_data_root(args.root)
    if args.cache:  # before the trainId pass, which takes minutes on the real dataset
        # What the trainId pass and the cache read: a cache beside them in the root is fine.
        inputs = [("--root folder", root / "leftImg8bit"), ("--root folder", root / "gtFine")]
        if same_file(args.cache, root):
            raise UserError(f"--cache {args.cache} is the dataset root; choose a folder")
        check_outputs(output_dir("--cache", args.cache), inputs)
    t0 = time.perf_counter()
    res = prepare_train_ids(root, workers=args.workers, force=args.force, progress=not args.quiet)
    print(
        f"{root}: wrote {res['written']}, up to date {res['skipped']}, failed {len(res['errors'])} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    if res["errors"]:
        lines = "\n".join(f"  {msg}" for _, msg in res["errors"][:10])
        more = len(res["errors"]) - 10
        raise SystemExit(  # several lines on purpose: one per file, up to 10
            f"error: {len(res['errors'])} label file(s) could not be converted:\n{lines}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    for split in args.cache_splits if args.cache else ():
        t0 = time.perf_counter()
        try:
            out = write_cache(root, args.cache, split, args.workers, progress=not args.quiet)
        except (DatasetError, OSError) as e:  # the flag named before the file's own line
            raise UserError(f"--cache {args.cache}: {e}") from None
        print(
            f"{out['folder']}: {out['images']} images, {out['bytes'] / 1e9:.2f} GB "
            f"({time.perf_counter() - t0:.1f}s)"
        )


if __name__ == "__main__":
    main()
