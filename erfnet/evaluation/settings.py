"""How images are predicted: ``TestSettings`` (mmseg's test protocol for this recipe by
default) and the settings of a checkpoint's own test size (``meta["test_size"]``,
``erfnet.test_size``). ``erfnet.evaluation.inference`` runs them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from erfnet.config import RECIPE
from erfnet.labels import complete_meta
from erfnet.test_size import RULES, rule_and_scale

MODES = ("whole", "slide")
# The smallest network input: ERFNet's output stride (three 2x downsamplers); a view that is
# smaller in either side would reach the bottleneck as an empty map.
MIN_VIEW = 8
Size = tuple[int, int]


@dataclass(frozen=True)
class TestSettings:
    """How images are predicted; the defaults are mmseg's test protocol for this recipe.

    ``scale``: the test size (H, W) an image is resized to under ``rule`` (``keep_ratio``:
    fitted into it keeping its ratio, mmcv's rule; ``fixed``: to it; ``shorter_side``: the
    shorter side to S, given as (S, S); see ``erfnet.test_size``). ``mode``: one of
    ``MODES``. ``ms_flip``: average the softmax over ``ratios`` x ``scale`` views, each also
    flipped when ``flip``. ``slide_crop`` / ``slide_stride``: the crops of slide mode. ``amp``:
    fp16 autocast (CUDA only). Invalid values raise ValueError naming the field.
    """

    __test__ = False  # not a pytest test class, whatever its name

    scale: Size = RECIPE.scale
    mode: str = "whole"
    ms_flip: bool = False
    ratios: tuple[float, ...] = RECIPE.ms_flip_ratios
    flip: bool = True
    slide_crop: Size = RECIPE.slide_crop
    slide_stride: Size = RECIPE.slide_stride
    amp: bool = False
    rule: str = "keep_ratio"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.rule == "shorter_side" and tuple(self.scale)[:1] * 2 != tuple(self.scale):
            raise ValueError(
                f"rule shorter_side takes one size S as scale (S, S), got {self.scale}"
            )
        for name in ("scale", "slide_crop", "slide_stride"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
                raise ValueError(f"{name} must be two positive integers (H, W), got {value}")
            object.__setattr__(self, name, (int(value[0]), int(value[1])))
        ratios = tuple(float(r) for r in self.ratios)
        if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
            raise ValueError(f"ratios must be positive finite numbers, got {list(self.ratios)}")
        object.__setattr__(self, "ratios", ratios)
        if ratios != RECIPE.ms_flip_ratios and not self.ms_flip:
            raise ValueError("ratios are the ms+flip ratios: set ms_flip=True with them")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        crop, stride = self.slide_crop, self.slide_stride
        if stride[0] > crop[0] or stride[1] > crop[1]:
            raise ValueError(
                f"slide_stride {stride} larger than slide_crop {crop} would leave pixels uncovered"
            )

    @classmethod
    def for_test_size(cls, test_size: dict[str, Any], **others: Any) -> TestSettings:
        """The settings of a checkpoint's ``meta["test_size"]`` (and ``others``' fields)."""
        rule, scale = rule_and_scale(test_size)
        return cls(scale=scale, rule=rule, **others)

    @property
    def view_ratios(self) -> tuple[float, ...]:
        """The ratios of ``scale`` that views are made at: ``ratios`` for ms+flip, else 1."""
        return self.ratios if self.ms_flip else (1.0,)


DEFAULT_SETTINGS = TestSettings()


def model_meta(model: Any) -> dict[str, Any]:
    """``model.meta``, complete as every ERFNet, EncoderStage and export carries it. The one
    fallback: a module from elsewhere (``predict`` takes any) gets what its meta lacks, or the
    whole meta, as a network built in code (``complete_meta``)."""
    return complete_meta(getattr(model, "meta", None), getattr(model, "num_classes", 0))


def model_test_size(model: Any) -> dict[str, Any]:
    """The test size ``model`` was validated at: its ``meta["test_size"]`` (recorded by
    train.py and the converters; ``DEFAULT_TEST_SIZE`` for checkpoints written before the key
    existed, and networks built in code)."""
    return model_meta(model)["test_size"]


def settings_for(model: Any, **others: Any) -> TestSettings:
    """``TestSettings`` at the model's own test size (``model_test_size``) and ``others``."""
    return TestSettings.for_test_size(model_test_size(model), **others)
