"""The test size a checkpoint was validated at: ``meta["test_size"]``, one of three rules.

- ``{"rule": "keep_ratio", "scale": [H, W]}``: mmcv's rescale rule (what mmseg tests with): the
  image is fitted into the scale keeping its ratio (``rescale_size``). Cityscapes' recipe:
  ``[1024, 2048]``, also the default of files written before the key existed.
- ``{"rule": "shorter_side", "size": S}``: the shorter side becomes S, the ratio kept
  (erfnet_pytorch's ``Resize(512)``; the longer side truncated as torchvision computes it).
- ``{"rule": "fixed", "size": [H, W]}``: every image resized to H x W.

``train.py`` records the keep-ratio rule of its ``--scale`` (the size it validates at), the
converters the rule of the foreign recipe; ``erfnet.predict`` and ``scripts/predict.py`` /
``scripts/video.py`` test at it unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from erfnet.data.paper_transforms import shorter_side_size  # re-exported too
from erfnet.data.transforms import rescale_size

RULES = ("keep_ratio", "shorter_side", "fixed")
# The largest side a test size may name: far above any real test scale, small enough that a
# typo (an extra digit or two) is refused rather than allocated.
MAX_SIDE = 16384


def keep_ratio(scale: Sequence[int]) -> dict[str, Any]:
    """``meta["test_size"]`` for mmcv's keep-ratio rule at ``scale`` (H, W)."""
    return {"rule": "keep_ratio", "scale": [int(scale[0]), int(scale[1])]}


def shorter_side(size: int) -> dict[str, Any]:
    """``meta["test_size"]`` for erfnet_pytorch's rule: the shorter side resized to ``size``."""
    return {"rule": "shorter_side", "size": int(size)}


def _side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIDE


def check_test_size(value: Any) -> dict[str, Any]:
    """``value`` as a plain ``test_size`` dict; ValueError (one line, what was expected) when it
    is not one of ``RULES`` in the documented format."""
    expected = (
        'expected {"rule": "keep_ratio", "scale": [H, W]}, {"rule": "shorter_side", "size": S}'
        f' or {{"rule": "fixed", "size": [H, W]}} with sides 1..{MAX_SIDE}'
    )
    rule = value.get("rule") if isinstance(value, dict) else None
    key = "scale" if rule == "keep_ratio" else "size"
    if rule in RULES and set(value) == {"rule", key}:
        field = value[key]
        if rule == "shorter_side" and _side(field):
            return {"rule": rule, key: field}
        pair = isinstance(field, list | tuple) and len(field) == 2 and all(map(_side, field))
        if rule != "shorter_side" and pair:
            return {"rule": rule, key: [int(field[0]), int(field[1])]}
    raise ValueError(f"test_size {value!r:.120}: {expected}")


def rule_size(
    size: Sequence[int], rule: str, scale: Sequence[int], ratio: float = 1.0
) -> tuple[int, int]:
    """The network input (h, w) for an image of ``size`` under ``rule`` at ``scale`` (H, W; for
    ``shorter_side`` S in both) times an ms ``ratio`` (truncated, as mmseg's MultiScaleFlipAug)."""
    if not all(isinstance(v, int) and v >= 1 for v in size):
        raise ValueError(f"image size {tuple(size)}: two positive integers (H, W) expected")
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    if rule == "keep_ratio":
        return rescale_size((int(size[0]), int(size[1])), target)
    if rule == "shorter_side":
        return shorter_side_size(size, target[0])
    if rule == "fixed":
        return target
    raise ValueError(f"test size rule {rule!r}: one of {RULES} expected")


def rule_and_scale(test_size: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    """(rule, (H, W)) of a checked ``test_size``: ``shorter_side`` S gives (S, S)."""
    test_size = check_test_size(test_size)
    value = test_size["scale" if test_size["rule"] == "keep_ratio" else "size"]
    if test_size["rule"] == "shorter_side":
        return "shorter_side", (value, value)
    return test_size["rule"], (value[0], value[1])


def describe(test_size: dict[str, Any]) -> str:
    """'keep_ratio 1024x2048', 'shorter_side 512', 'fixed 512x1024'."""
    rule, scale = rule_and_scale(test_size)
    if rule == "shorter_side":
        return f"shorter_side {scale[0]}"
    return f"{rule} {scale[0]}x{scale[1]}"
