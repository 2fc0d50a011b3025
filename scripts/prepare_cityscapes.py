"""Write ``_gtFine_labelTrainIds.png`` next to every ``_gtFine_labelIds.png`` of a Cityscapes root.

    python scripts/prepare_cityscapes.py --root data/cityscapes --workers 8

The values are those of cityscapesScripts' createTrainIdLabelImgs (the 19 evaluated classes as
0..18, everything else 255). Idempotent: files newer than their _labelIds.png are skipped unless
--force. The loader reads _labelTrainIds.png when present and maps _labelIds.png otherwise, so this
step only saves the mapping at training time.
"""

from __future__ import annotations

import argparse
import os
import time

# Runnable from a checkout without `pip install -e .`.
from erfnet.data.cityscapes import ENV_VAR, DatasetError, prepare_train_ids, resolve_data_root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--root",
        default=None,
        help=f"Cityscapes root (default: ${ENV_VAR}, else data/cityscapes)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="parallel processes (default: min(8, CPUs))",
    )
    p.add_argument("--force", action="store_true", help="rewrite files that are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = resolve_data_root(args.root)
    t0 = time.perf_counter()
    try:
        res = prepare_train_ids(
            root, workers=args.workers, force=args.force, progress=not args.quiet
        )
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"{root}: wrote {res['written']}, up to date {res['skipped']}, failed {len(res['errors'])} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    if res["errors"]:
        lines = "\n".join(f"  {msg}" for _, msg in res["errors"][:10])
        more = len(res["errors"]) - 10
        raise SystemExit(
            f"error: {len(res['errors'])} label file(s) could not be converted:\n{lines}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )


if __name__ == "__main__":
    main()
