"""Constants and recipe defaults, defined once and imported everywhere else.

The recipe is mmsegmentation's ``erfnet_fcn_4x4_512x1024_160k_cityscapes``.
Sizes are (height, width) throughout the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ImageNet statistics on the 0-255 scale, RGB order (mmseg's data_preprocessor): the defaults of
# TrainTransform and of a network built in code (its meta); inference normalises with a
# checkpoint's own meta["mean"] / ["std"].
MEAN_RGB: tuple[float, float, float] = (123.675, 116.28, 103.53)
STD_RGB: tuple[float, float, float] = (58.395, 57.12, 57.375)

IGNORE_INDEX = 255
# Cityscapes' 19 evaluated classes: only ERFNet's default width. Everything that needs the class
# list takes it from the dataset (``classes``, ``palette``, ``ignore_index``) or ``model.meta``.
NUM_CLASSES = 19


@dataclass(frozen=True)
class Recipe:
    """Training and test defaults of the reference recipe (4 GPUs x 4 images)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    min_lr: float = 1e-4
    poly_power: float = 0.9
    iters: int = 160_000
    batch_size_per_gpu: int = 4
    reference_gpus: int = 4
    crop_size: tuple[int, int] = (512, 1024)
    scale: tuple[int, int] = (1024, 2048)  # the random resize's base and the test resize
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    val_interval: int = 16_000
    ckpt_interval: int = 16_000
    ms_flip_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    slide_crop: tuple[int, int] = (512, 1024)
    slide_stride: tuple[int, int] = (341, 682)


RECIPE = Recipe()
# ``meta["test_size"]`` (``erfnet.test_size``) of files written before the key existed and of
# networks built in code: the recipe's keep-ratio test scale.
DEFAULT_TEST_SIZE: dict[str, Any] = {"rule": "keep_ratio", "scale": list(RECIPE.scale)}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split())


@dataclass(frozen=True)
class PaperRecipe:
    """erfnet_pytorch's training (``train/main.py``; docs/erfnet_pytorch.md gives each fact's
    source): two stages of 150 epochs at batch 6 (the encoder alone at 1/8 resolution, then the
    full network), Adam with L2 weight decay, an lr decayed once per epoch, images resized to a
    shorter side of 512 with a flip and a +-2 pixel translation, 0-1 inputs without mean/std, and
    20 outputs: the classes plus "void" (ignored pixels), whose loss weight is 0."""

    name: str = "erfnet_pytorch"
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4  # Adam's L2 form (added to the gradient), not AdamW
    lr_power: float = 0.9  # lr in epoch e (1-based) = lr * (1 - (e - 1) / epochs) ** lr_power
    epochs: int = 150  # per stage
    batch_size: int = 6
    shorter_side: int = 512  # train, validation and test size
    flip_prob: float = 0.5
    max_shift: int = 2  # translation tx, ty each uniform in -max_shift..max_shift
    encoder_stride: int = 8  # the encoder stage's logits and labels are at 1/8
    dropout_64: float = 0.03  # Dropout2d in the five 64-channel blocks
    dropout_128: float = 0.3  # and in the eight 128-channel ones
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # 0-255 scale: x / 255, as ToTensor()
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    # Hard-coded per stage in train/main.py's train(): train ids 0..18, then void (weight 0).
    encoder_class_weights: tuple[float, ...] = _floats(
        """2.3653597831726 4.4237880706787 2.9691488742828 5.3442072868347 5.2983593940735
        5.2275490760803 5.4394111633301 5.3659925460815 3.4170460700989 5.2414722442627
        4.7376127243042 5.2286224365234 5.455126285553 4.3019247055054 5.4264230728149
        5.4331531524658 5.433765411377 5.4631009101868 5.3947434425354 0"""
    )
    decoder_class_weights: tuple[float, ...] = _floats(
        """2.8149201869965 6.9850029945374 3.7890393733978 9.9428062438965 9.7702074050903
        9.5110931396484 10.311357498169 10.026463508606 4.6323022842407 9.5608062744141
        7.8698215484619 9.5168733596802 10.373730659485 6.6616044044495 10.260489463806
        10.287888526917 10.289801597595 10.405355453491 10.138095855713 0"""
    )


PAPER_RECIPE = PaperRecipe()
# ``train.py --recipe NAME``: mmseg's (the default) or the paper's own code's.
RECIPES = ("mmseg", PAPER_RECIPE.name)
