"""Train ERFNet with mmsegmentation's Cityscapes recipe (or on synthetic data, in minutes).

    python train.py --data synthetic                              # quick start on the CPU
    python train.py --data cityscapes --data-root data/cityscapes # the full recipe
    torchrun --nproc_per_node=4 train.py --data cityscapes        # 4 GPUs x 4 images = 16

Exit status: 0 when training finished, 130 / 143 when stopped by SIGINT / SIGTERM (after saving
latest.pth; continue with --resume), 1 on an error, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import sys

from erfnet.checkpoint import CheckpointError
from erfnet.config import RECIPE
from erfnet.data.cityscapes import DatasetError
from erfnet.engine import (
    RECIPE_DEFAULTS,
    SYNTHETIC_PRESET,
    ConfigError,
    TrainConfig,
    TrainingError,
    train,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default, except where the help text already explains a computed one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None and action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer size, got {text!r}") from None
    return value


def _preset(key: str) -> str:
    """'(default: <recipe value>; synthetic: <quick-start value>)' for a help text."""

    def show(v: object) -> str:
        return " ".join(str(x) for x in v) if isinstance(v, tuple) else str(v)

    return f"(default: {show(RECIPE_DEFAULTS[key])}; synthetic: {show(SYNTHETIC_PRESET[key])})"


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        choices=("cityscapes", "synthetic"),
        default=d.data,
        help="dataset: Cityscapes (gtFine) or a synthetic Cityscapes made on demand",
    )
    g.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="Cityscapes root (default: $CITYSCAPES_DATASET, else data/cityscapes);"
        " for --data synthetic the folder to create/use (default: a cache folder,"
        " ~/.cache/erfnet/synthetic-...)",
    )
    g.add_argument(
        "--crop-size",
        nargs=2,
        type=_size,
        metavar=("H", "W"),
        default=None,
        help=f"random crop {_preset('crop_size')}",
    )
    g.add_argument(
        "--scale",
        nargs=2,
        type=_size,
        metavar=("H", "W"),
        default=None,
        help="base size of the random resize (ratio"
        f" {RECIPE.ratio_range[0]}-{RECIPE.ratio_range[1]}), also the validation resize"
        f" {_preset('scale')}",
    )
    g.add_argument(
        "--photometric",
        action=argparse.BooleanOptionalAction,
        default=d.photometric,
        help="mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)",
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=d.workers,
        help="DataLoader worker processes per training process (default: min(4, CPU cores))",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--iters",
        type=int,
        metavar="N",
        default=None,
        help=f"training iterations {_preset('iters')}",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=None,
        help="images per process and iteration; the recipe's total is"
        f" {RECIPE.batch_size_per_gpu} x {RECIPE.reference_gpus} GPUs"
        f" {_preset('batch_size')}",
    )
    g.add_argument("--lr", type=float, default=None, help=f"SGD base learning rate {_preset('lr')}")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="the poly schedule's final lr")
    g.add_argument("--poly-power", type=float, default=d.poly_power, help="poly schedule power")
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of weights, data order, augmentation and dropout",
    )
    g.add_argument(
        "--head",
        choices=("fcn", "deconv"),
        default=d.head,
        help="fcn: mmseg's FCNHead; deconv: the paper's transposed-conv output",
    )

    g = p.add_argument_group("speed")
    g.add_argument(
        "--device",
        default=d.device,
        help="auto (this process's GPU if any, else cpu), cpu, cuda, cuda:N",
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (default: on for CUDA with fp16 autocast + GradScaler,"
        " off on the CPU; --amp on the CPU means bf16 autocast)",
    )
    g.add_argument(
        "--amp-dtype",
        choices=("auto", "float16", "bfloat16"),
        default=d.amp_dtype,
        help="autocast dtype with --amp: auto = float16 on CUDA, bfloat16 on the CPU",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("outputs and checkpoints")
    g.add_argument(
        "--work-dir",
        metavar="DIR",
        default=None,
        help="outputs: latest.pth, best.pth, iter_<N>.pth, train.log, args.json,"
        " tensorboard/ (default: work_dirs/erfnet_<data>)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue a run: from PATH, or without PATH from the work dir's"
        " latest.pth (default: start a new run)",
    )
    g.add_argument(
        "--val-interval",
        type=int,
        metavar="N",
        default=None,
        help=f"validate (single scale) every N iterations and at the end {_preset('val_interval')}",
    )
    g.add_argument(
        "--ckpt-interval",
        type=int,
        metavar="N",
        default=None,
        help=f"write iter_<N>.pth every N iterations {_preset('ckpt_interval')}",
    )
    g.add_argument(
        "--keep-ckpts",
        type=int,
        metavar="K",
        default=d.keep_ckpts,
        help="keep only the newest K iter_<N>.pth files (0 keeps all)",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        metavar="N",
        default=d.log_interval,
        help="log the mean loss to train.log and TensorBoard every N iterations",
    )
    g.add_argument(
        "--num-vis",
        type=int,
        metavar="N",
        default=d.num_vis,
        help="val images whose predictions go to TensorBoard at each validation",
    )
    g.add_argument(
        "--max-nonfinite",
        type=int,
        metavar="N",
        default=d.max_nonfinite,
        help="stop after N consecutive iterations with a non-finite loss",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tqdm progress bars on rank 0 (the log reports progress either way)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    for key in ("crop_size", "scale"):
        if values[key] is not None:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except ConfigError as e:
        parser.error(str(e))
    except (CheckpointError, TrainingError) as e:
        raise SystemExit(f"error: {e}") from None
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: abort without saving
        print(
            "error: aborted by a second SIGINT/SIGTERM without saving; --resume continues from"
            " the last latest.pth",
            file=sys.stderr,
        )
        return 130
    if result.interrupted_by:
        return 128 + int(result.interrupted_by)
    return 0


if __name__ == "__main__":
    sys.exit(main())
