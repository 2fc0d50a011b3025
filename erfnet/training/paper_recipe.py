"""``train.py --recipe erfnet_pytorch``: the paper's two-stage training, as the parts of one stage.

erfnet_pytorch's ``train/main.py`` trains the encoder alone at 1/8 resolution (with its
``encoder.output_conv``), then the full network from that encoder; each stage has its own class
weights and a fresh Adam with an lr decayed once per epoch (docs/erfnet_pytorch.md). ``train.py``
runs each stage (``build_stage``) through mmseg's loop with the stage's settings
(``stage_args``); the encoder stage writes into ``<work dir>/encoder/``.
"""

from __future__ import annotations

import math
from argparse import Namespace
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erfnet import test_size
from erfnet.checkpoint import CheckpointError
from erfnet.config import IGNORE_INDEX, PAPER_RECIPE, PaperRecipe
from erfnet.data.paper_transforms import ShorterSideEvalTransform, shorter_side_scale
from erfnet.errors import FlagError
from erfnet.model import EncoderStage, ERFNet
from erfnet.training.finetune import start_weights
from erfnet.training.loop import Parts
from erfnet.training.loss import load_class_weights
from erfnet.training.process import WorkDirError
from erfnet.training.resume import resolve_resume
from erfnet.training.step import ClosedFormLR

STAGES = ("encoder", "decoder")
STAGE_CHOICES = ("both", *STAGES)
ENCODER_DIR = "encoder"  # the encoder stage's sub-folder of the work dir

# mmseg's flags that mean nothing under this recipe (their dests).
REFUSED_FLAGS = (
    "iters",
    "crop_size",
    "photometric",
    "ohem",
    "avg_non_ignore",
    "sync_bn",
    "poly_power",
    "min_lr",
    "momentum",
    "val_interval",
    "ckpt_interval",
    "accum_steps",
    "gpu_aug",
    "data_cache",
)
# --data synthetic under this recipe: the 128x256 images at half size, 30 short epochs per stage
# (11 iterations of 6 images) and a higher lr, so that the quick start learns in minutes.
SYNTHETIC_DEFAULTS: dict[str, Any] = {"epochs": 30, "lr": 2e-3, "scale": (64, 128)}


def recipe_defaults(data: str, recipe: PaperRecipe = PAPER_RECIPE) -> dict[str, Any]:
    """train.py's defaults under this recipe (``--data synthetic``: ``SYNTHETIC_DEFAULTS``)."""
    defaults = {
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "batch_size": recipe.batch_size,
        "epochs": recipe.epochs,
        "scale": (recipe.shorter_side, 2 * recipe.shorter_side),
        "head": "deconv",
        "stage": "both",
        "photometric": False,  # none in this recipe (args.json says so)
    }
    if data == "synthetic":
        defaults.update(SYNTHETIC_DEFAULTS)
    return defaults


def check_flags(args: Namespace, given: Sequence[str]) -> None:
    """``FlagError`` for a flag of mmseg's recipe given under this one, and for combinations
    this recipe cannot run; ``given``: the dests of the flags typed on the command line."""
    name = PAPER_RECIPE.name
    refused = ["--" + d.replace("_", "-") for d in REFUSED_FLAGS if d in given]
    if "head" in given and args.head != "deconv":
        refused.append(f"--head {args.head}")
    if refused:
        raise FlagError(
            f"{', '.join(refused)}: no meaning under --recipe {name} (it trains by epochs, with"
            " its own transform, loss and schedule; see docs/erfnet_pytorch.md)"
        )
    if args.epochs is not None and args.epochs < 1:
        raise FlagError(f"--epochs must be a positive integer, got {args.epochs}")
    if args.init_from is not None and args.stage == "encoder":
        raise FlagError(
            f"--init-from starts the decoder stage of --recipe {name}; --stage encoder trains"
            " the encoder from scratch"
        )
    if args.stage == "decoder" and args.init_from is None and args.resume is None:
        raise FlagError(
            "--stage decoder needs --init-from: the encoder stage's checkpoint"
            f" (<work dir>/{ENCODER_DIR}/latest.pth) or the ImageNet encoder"
        )
    if args.data == "folder" and args.class_weights is None:
        raise FlagError(
            f"--recipe {name} with --data folder needs --class-weights FILE: its hard-coded"
            " weights are Cityscapes' (scripts/class_weights.py computes a dataset's)"
        )


def stages_to_run(args: Namespace, path: Path | None, ckpt: dict | None) -> list[str]:
    """The stages this run trains, in order: --stage (``both`` with --init-from is the decoder
    stage alone), from the stage the --resume checkpoint ``ckpt`` stopped in."""
    if args.stage == "both":
        stages = ["decoder"] if args.init_from is not None else list(STAGES)
    else:
        stages = [args.stage]
    if ckpt is None:
        return stages
    resumed = ckpt["meta"].get("stage")
    if resumed not in STAGES:
        raise CheckpointError(f"--resume {path}: not a checkpoint of --recipe {PAPER_RECIPE.name}")
    if resumed not in stages:
        raise CheckpointError(
            f"--resume: the checkpoint is of the {resumed} stage, but --stage"
            f" {args.stage} trains {' and '.join(stages)}"
        )
    return stages[stages.index(resumed) :]


def stage_dir(work_dir: Path, stage: str | None) -> Path:
    """Where a stage (None: mmseg's recipe) writes its checkpoints and TensorBoard logs."""
    return work_dir / ENCODER_DIR if stage == "encoder" else work_dir


def check_new_stage_run(args: Namespace) -> None:
    """A new run must not overwrite an earlier encoder stage in the work dir (``--stage
    decoder`` writes beside it, and may start from it)."""
    if args.resume is not None or args.restart or args.stage == "decoder":
        return
    found = stage_dir(Path(args.work_dir), "encoder") / "latest.pth"
    if found.is_file():
        raise WorkDirError(
            f"--work-dir '{args.work_dir}' holds an earlier run's encoder stage ({found}): add"
            " --resume to continue it, choose another --work-dir, or add --restart"
        )


def resume_path(args: Namespace) -> Path | None:
    """The --resume checkpoint: PATH, or without it the decoder stage's latest.pth, else the
    encoder stage's (the run stopped in it)."""
    if args.resume != "latest":  # None, or PATH
        return resolve_resume(args.resume, args.work_dir)
    for stage in reversed(STAGES):
        path = stage_dir(Path(args.work_dir), stage) / "latest.pth"
        if path.is_file():
            return path
    raise CheckpointError(
        f"--resume: no latest.pth in the work dir {args.work_dir} nor in its {ENCODER_DIR}/"
        " (nothing to resume; drop --resume to start a new run)"
    )


def stage_args(args: Namespace, stage: str, dataset_size: int, world_size: int = 1) -> Namespace:
    """The loop's settings for ``stage``: ``iters`` = epochs x iterations per epoch, validation
    (and latest.pth) every epoch, no iter_<N>.pth (one checkpoint per stage), and the test scale
    that keeps validation images at their shorter side."""
    # ceil(images / batch): erfnet_pytorch's loader keeps the last, smaller batch
    per_epoch = math.ceil(dataset_size / (args.batch_size * world_size))
    iters = args.epochs * per_epoch
    out = Namespace(**vars(args))
    out.stage, out.iters_per_epoch, out.iters = stage, per_epoch, iters
    out.val_interval, out.ckpt_interval = per_epoch, iters + 1
    out.scale = shorter_side_scale(shorter_side(args))
    out.gpu_aug, out.accum_steps = False, 1
    return out


def val_transform(args: Namespace, stage: str) -> ShorterSideEvalTransform:
    """Validation at the shorter side; the encoder stage's labels at 1/8 of it."""
    stride = PAPER_RECIPE.encoder_stride if stage == "encoder" else 1
    return ShorterSideEvalTransform(shorter_side(args), label_stride=stride)


def shorter_side(args: Namespace) -> int:
    """``--scale H W`` under this recipe: H is the shorter side (W is not used)."""
    return int(args.scale[0])


def recipe_meta(
    meta: dict[str, Any], stage: str, size: int, recipe: PaperRecipe = PAPER_RECIPE
) -> dict[str, Any]:
    """The dataset's meta for this recipe's model: one more output, "void" (black), the 0-1
    input (mean 0, std 255), the shorter-side test size and the stage."""
    out = dict(meta, void_class=len(meta["class_names"]))
    out["class_names"] = [*meta["class_names"], "void"]
    out["palette"] = [*meta["palette"], [0, 0, 0]]
    out["mean"], out["std"] = list(recipe.mean), list(recipe.std)
    out["input_note"] = "RGB in [0, 1] (x / 255), no mean/std normalisation"
    out["test_size"] = test_size.shorter_side(size)
    out["recipe"], out["stage"] = recipe.name, stage
    return out


class EpochPolyLR(ClosedFormLR):
    """erfnet_pytorch's ``LambdaLR(lambda epoch: (1 - (epoch - 1) / epochs) ** power)`` stepped
    at the start of each 1-based epoch, in an iteration loop: the lr of iteration i (0-based) is
    ``base * (1 - e / epochs) ** power`` with ``e = i // iters_per_epoch``, constant within an
    epoch."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        iters_per_epoch: int,
        epochs: int,
        power: float = PAPER_RECIPE.lr_power,
        last_epoch: int = -1,
    ) -> None:
        self.iters_per_epoch = int(iters_per_epoch)
        self.epochs = int(epochs)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)

    @property
    def max_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    def get_lr(self) -> list[float]:  # type: ignore[override]
        done = min(max(self.last_epoch, 0) // self.iters_per_epoch, self.epochs - 1)
        factor = (1.0 - done / self.epochs) ** self.power
        return [base * factor for base in self.base_lrs]

    def set_max_iters(self, max_iters: int) -> None:
        """Another --epochs on resume: the schedule now ends at ``max_iters``."""
        self.epochs = max(1, int(max_iters) // self.iters_per_epoch)
        self.apply()


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """erfnet_pytorch's ``CrossEntropyLoss2d``: NLL of the log-softmax with class weights, the
    weighted mean ``sum(w[y] * -log p_y) / sum(w[y])`` (void's weight 0 leaves it out)."""
    return F.nll_loss(F.log_softmax(logits, dim=1), labels, weight=weight.to(logits.device))


def stage_labels(
    labels: torch.Tensor, stride: int, ignore_index: int, void_index: int
) -> torch.Tensor:
    """A label batch [N, H, W] as the stage trains on it: at 1/``stride`` (the encoder's output
    size, ceil(H / 8) x ceil(W / 8)) by nearest at pixel centres (PIL's NEAREST, torch's
    ``nearest-exact``), then the ignored pixels (and the translation's 255 pads) as "void"."""
    if stride > 1:
        size = (-(-labels.shape[-2] // stride), -(-labels.shape[-1] // stride))
        small = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
        labels = small[:, 0].long()
    void = (labels == ignore_index) | (labels == IGNORE_INDEX)
    return labels.masked_fill(void, void_index)


def model_config(num_outputs: int, recipe: PaperRecipe = PAPER_RECIPE) -> dict[str, Any]:
    """The full network's ``ERFNet`` arguments: the deconv head and the recipe's dropout."""
    model = ERFNet(
        num_outputs,
        head="deconv",
        dropout=recipe.dropout_128,
        dropout_64=recipe.dropout_64,
        dropout2d=True,
    )
    return model.config


def class_weights(
    stage: str, num_classes: int, weights: Sequence[float] | None, recipe: PaperRecipe
) -> torch.Tensor:
    """The stage's weights over the classes and void: ``weights`` (one per class, from
    --class-weights) with void 0, else the recipe's hard-coded Cityscapes weights."""
    if weights is not None:
        return torch.tensor([*map(float, weights), 0.0])
    table = recipe.encoder_class_weights if stage == "encoder" else recipe.decoder_class_weights
    if len(table) != num_classes + 1:
        raise FlagError(
            f"the recipe's class weights are for {len(table) - 1} classes, the data has"
            f" {num_classes}: give --class-weights"
        )
    return torch.tensor(table)


def build_stage(
    recipe: PaperRecipe,
    stage: str,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    iters_per_epoch: int,
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    weights: Sequence[float] | None = None,
) -> Parts:
    """One stage of ``recipe`` for ``num_classes`` classes (the model has one more output,
    void): the model in train mode (fresh weights from torch's RNG), a fresh Adam, the
    per-epoch schedule, the weighted NLL and the label transform. ``epochs``, ``lr``,
    ``weight_decay`` and ``weights``: the flags that override the recipe's values."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    config = model_config(num_classes + 1, recipe)
    model: nn.Module = EncoderStage(config) if stage == "encoder" else ERFNet(**config)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=recipe.lr if lr is None else lr,
        betas=recipe.betas,
        eps=recipe.eps,
        weight_decay=recipe.weight_decay if weight_decay is None else weight_decay,
    )
    scheduler = EpochPolyLR(
        optimizer, iters_per_epoch, recipe.epochs if epochs is None else epochs, recipe.lr_power
    )
    criterion = partial(weighted_nll, weight=class_weights(stage, num_classes, weights, recipe))
    stride = recipe.encoder_stride if stage == "encoder" else 1
    labels = partial(stage_labels, stride=stride, ignore_index=ignore_index, void_index=num_classes)
    return Parts(model.train(), optimizer, scheduler, criterion, labels)


def stage_parts(
    args: Namespace,
    meta: dict[str, Any],
    path: Path | None,
    ckpt: dict | None,
    encoder: nn.Module | None,
) -> tuple[Parts, dict[str, Any]]:
    """The parts of ``args.stage`` (``stage_args``) and its meta: the model's weights from the
    --resume checkpoint ``ckpt``, else the encoder stage's ``encoder`` (the decoder stage of the
    same run), else --init-from's, else fresh from --seed."""
    weights = None
    if args.class_weights is not None:
        weights = load_class_weights(args.class_weights, meta["class_names"])
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    parts = build_stage(
        PAPER_RECIPE,
        args.stage,
        len(meta["class_names"]),
        ignore_index=meta["ignore_index"],
        iters_per_epoch=args.iters_per_epoch,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        weights=weights,
    )
    stage_meta = recipe_meta(meta, args.stage, shorter_side(args))
    if encoder is not None:  # its encoder.* tensors
        own = parts.model.state_dict()
        own.update({k: v for k, v in encoder.state_dict().items() if k.startswith("encoder.")})
        parts.model.load_state_dict(own)
    else:
        start_weights(parts.model, stage_meta, args.init_from, path, ckpt)
    parts.model.meta = stage_meta  # validation's normalisation (0-1 inputs) and its void output
    return parts, stage_meta
