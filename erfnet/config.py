"""Constants and recipe defaults, defined once and imported everywhere else.

The recipe is mmsegmentation's ``erfnet_fcn_4x4_512x1024_160k_cityscapes``.
Sizes are (height, width) throughout the project.
"""

from __future__ import annotations

from dataclasses import dataclass

# ImageNet statistics on the 0-255 scale, RGB order (mmseg's data_preprocessor): the defaults of
# TrainTransform and of a model without meta; inference normalises with a checkpoint's own
# meta["mean"] / ["std"].
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
