"""Convert foreign ERFNet checkpoints (mmsegmentation, Eromera/erfnet_pytorch) into ours.

Each source has ONE explicit table from its module names to ours (``MMSEG_TABLE``,
``ERFNET_PYTORCH_TABLE``); a parameter key is ``<module>.<leaf>`` and only the module part is
renamed, the leaf (``weight``, ``bias``, ``running_mean``, ...) is kept. Everything the table does
not name is an error, as are missing and mis-shaped tensors: all of them are listed in one
``ConversionError``.

mmseg's ``erfnet_fcn`` model becomes ``ERFNet(head="fcn")`` with the usual normalisation
(``MEAN_RGB`` / ``STD_RGB``). erfnet_pytorch's network becomes ``ERFNet(head="deconv")`` with its
20 outputs (class 19 is "void") and meta ``mean`` [0, 0, 0] / ``std`` [255, 255, 255]: the original
was trained on RGB images in [0, 1] without normalisation, and ``(x - 0) / 255`` on the 0-255 scale
is exactly that.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from numpy._core.multiarray import scalar  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar

from erfnet.checkpoint import FORMAT, check_inflation, cityscapes_meta, save_checkpoint
from erfnet.config import NUM_CLASSES, RECIPE
from erfnet.errors import UserError
from erfnet.model import ERFNet
from erfnet.test_size import keep_ratio, shorter_side

SOURCES = ("mmseg", "erfnet_pytorch")
# Where each source's weights come from and the terms they are published under; a converted
# checkpoint records them in its meta ("licence", "lineage") and everything made from it carries
# them on (erfnet.training.finetune, the exports).
SOURCE_LICENCES = {"mmseg": "Apache-2.0", "erfnet_pytorch": "CC BY-NC 4.0"}
SOURCE_URLS = {
    "mmseg": "https://github.com/open-mmlab/mmsegmentation",
    "erfnet_pytorch": "https://github.com/Eromera/erfnet_pytorch",
}

# Block kinds in our (= mmseg's) index order: D downsampler, N non-bottleneck-1d, U upsampler.
_ENCODER_KINDS = "DD" + "N" * 5 + "D" + "N" * 8
_DECODER_KINDS = "UNNUNN"
_NB1D_PARTS = ("conv3x1_1", "conv1x3_1", "bn1", "conv3x1_2", "conv1x3_2", "bn2")
# mmseg's NonBottleneck1d keeps its layers in ``convs_layers`` (1, 4, 6: ReLU; 9: Dropout).
_MMSEG_NB1D_INDEX = dict(zip((0, 2, 3, 5, 7, 8), _NB1D_PARTS, strict=True))

# Foreign modules that are dropped on purpose map to DROP.
DROP = None

# erfnet_pytorch's evaluation resizes every image with Resize(512): its shorter side to 512.
ERFNET_PYTORCH_TEST_SIZE = shorter_side(512)


class ConversionError(UserError):
    """A foreign checkpoint that cannot be converted; the message lists every problem."""


def _block_modules(kind: str) -> dict[str, str]:
    """Our sub-module names of a block, keyed by the same name (both sources but mmseg's NB1d)."""
    parts = ("conv", "bn") if kind in "DU" else _NB1D_PARTS
    return {p: p for p in parts}


def _build_mmseg_table() -> dict[str, str | None]:
    table: dict[str, str | None] = {}
    for stage, kinds in (("encoder", _ENCODER_KINDS), ("decoder", _DECODER_KINDS)):
        for i, kind in enumerate(kinds):
            if kind == "N":
                for idx, ours in _MMSEG_NB1D_INDEX.items():
                    table[f"backbone.{stage}.{i}.convs_layers.{idx}"] = f"{stage}.{i}.{ours}"
            else:
                for theirs, ours in _block_modules(kind).items():
                    table[f"backbone.{stage}.{i}.{theirs}"] = f"{stage}.{i}.{ours}"
    table["decode_head.convs.0.conv"] = "head.conv"
    table["decode_head.convs.0.bn"] = "head.bn"
    table["decode_head.conv_seg"] = "head.classifier"
    return table


def _build_erfnet_pytorch_table() -> dict[str, str | None]:
    table: dict[str, str | None] = {}
    # encoder.initial_block is our encoder.0; encoder.layers.k is our encoder.(k+1).
    for i, kind in enumerate(_ENCODER_KINDS):
        theirs_block = "encoder.initial_block" if i == 0 else f"encoder.layers.{i - 1}"
        for theirs, ours in _block_modules(kind).items():
            table[f"{theirs_block}.{theirs}"] = f"encoder.{i}.{ours}"
    for i, kind in enumerate(_DECODER_KINDS):
        for theirs, ours in _block_modules(kind).items():
            table[f"decoder.layers.{i}.{theirs}"] = f"decoder.{i}.{ours}"
    table["decoder.output_conv"] = "head.output_conv"
    # The encoder-only pre-training classifier; the full network never uses it.
    table["encoder.output_conv"] = DROP
    return table


MMSEG_TABLE: dict[str, str | None] = _build_mmseg_table()
ERFNET_PYTORCH_TABLE: dict[str, str | None] = _build_erfnet_pytorch_table()
TABLES = {"mmseg": MMSEG_TABLE, "erfnet_pytorch": ERFNET_PYTORCH_TABLE}
# Our classifier weight per source and the axis of its shape holding the number of classes
# (Conv2d: [out, in, k, k]; ConvTranspose2d: [in, out, k, k]).
_CLASSIFIER = {
    "mmseg": ("head.classifier.weight", 0),
    "erfnet_pytorch": ("head.output_conv.weight", 1),
}
ERFNET_PYTORCH_VOID_CLASS = 19


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    return source


def _strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds to every key."""
    keys = list(state_dict)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def detect_source(obj: Any) -> str | None:
    """Which format a loaded checkpoint looks like: a name in SOURCES, "erfnet" (ours) or None."""
    if not isinstance(obj, dict):
        return None
    if obj.get("format") == FORMAT or ("model" in obj and "model_args" in obj):
        return "erfnet"
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    keys = [k for k in _strip_module_prefix(obj) if isinstance(k, str)]
    if any(k.startswith(("backbone.", "decode_head.")) for k in keys):
        return "mmseg"
    if any(
        k.startswith(("encoder.initial_block.", "encoder.layers.", "decoder.layers.")) for k in keys
    ):
        return "erfnet_pytorch"
    return None


def extract_state_dict(obj: Any, source: str) -> dict[str, Any]:
    """The bare state_dict of a loaded foreign file, without a ``module.`` prefix. mmseg files are a
    dict with ``state_dict`` (plus ``meta`` / ``optimizer``); a bare state_dict is accepted too.
    erfnet_pytorch files are a bare state_dict, usually saved through DataParallel."""
    _check_source(source)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(
            f"expected a {source} state_dict (a non-empty dict of tensors),"
            f" got {type(obj).__name__}"
        )
    return _strip_module_prefix(obj)


def model_args_for(source: str, num_classes: int, head_channels: int = 128) -> dict[str, Any]:
    """Our ERFNet constructor arguments for a network converted from ``source``."""
    if _check_source(source) == "mmseg":
        return {"num_classes": num_classes, "head": "fcn", "head_channels": head_channels}
    return {"num_classes": num_classes, "head": "deconv"}


def _head_size(state: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(classes, head channels) from the converted weights' shapes (defaults where absent)."""
    cls_key, cls_axis = _CLASSIFIER[source]
    cls, conv = state.get(cls_key), state.get("head.conv.weight")
    num_classes = int(cls.shape[cls_axis]) if cls is not None and cls.dim() == 4 else NUM_CLASSES
    return num_classes, int(conv.shape[0]) if conv is not None and conv.dim() == 4 else 128


def _fmt(items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def convert_state_dict(state_dict: Any, source: str) -> dict[str, torch.Tensor]:
    """Map a foreign state_dict (or an mmseg file dict) onto our ERFNet's keys, and check it;
    ConversionError lists every unknown, missing, mis-shaped or non-tensor entry. BatchNorm
    ``num_batches_tracked`` counters, which PyTorch before 0.4.1 (erfnet_pytorch's era) did not
    save, are filled with 0 when absent."""
    table = TABLES[_check_source(source)]
    foreign = extract_state_dict(state_dict, source)
    ours: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # our key -> foreign key, for error messages
    unknown, not_tensor = [], []
    for key, value in foreign.items():
        module, _, leaf = str(key).rpartition(".")
        if module not in table:
            unknown.append(str(key))
            continue
        if table[module] is DROP:
            continue
        if not isinstance(value, torch.Tensor):
            not_tensor.append(f"{key} ({type(value).__name__})")
            continue
        new_key = f"{table[module]}.{leaf}"
        ours[new_key] = value
        origin[new_key] = str(key)
    expected = ERFNet(**model_args_for(source, *_head_size(ours, source))).state_dict()
    reverse = {v: k for k, v in table.items() if v is not None}
    for key, ref in expected.items():
        if key.endswith("num_batches_tracked") and key not in ours:
            ours[key] = torch.zeros_like(ref)
            origin[key] = "<filled>"
    missing = [
        f"{reverse[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}" for k in expected if k not in ours
    ]
    unknown += [origin[k] for k in ours if k not in expected]
    shapes = [
        f"{origin[k]}: {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
        for k, v in ours.items()
        if k in expected and v.shape != expected[k].shape
    ]
    found = (
        ("unknown key(s)", unknown),
        ("missing key(s)", missing),
        ("mis-shaped tensor(s)", shapes),
        ("non-tensor value(s)", not_tensor),
    )
    problems = [f"{len(items)} {what}: {_fmt(items)}" for what, items in found if items]
    if problems:
        guess = detect_source(foreign)
        hint = f" The keys look like a {guess!r} checkpoint, not {source!r}."
        hint = hint if guess is not None and guess != source else ""
        raise ConversionError(
            f"the weights do not match a {source} ERFNet: " + "; ".join(problems) + "." + hint
        )
    return {k: ours[k] for k in expected}


def _numpy_scalar_globals() -> list[Any]:
    """Globals that rebuild numpy scalars (found in mmcv's checkpoint ``meta``): data only
    (``scalar(dtype, bytes)``; no object dtype, so only plain numbers and strings)."""
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGUS"}
    return [
        np.dtype,
        *sorted(dtype_classes, key=lambda t: t.__name__),
        (scalar, "numpy.core.multiarray.scalar"),  # pickled by numpy 1.x
        (scalar, "numpy._core.multiarray.scalar"),  # pickled by numpy 2.x
    ]


def _global_names(allowed: list[Any]) -> set[str]:
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed}


def load_foreign_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` a foreign file (numpy scalars allowed as data); never
    unpickles arbitrary objects: a refusal names the globals the file would need."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"input {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise ConversionError(f"input checkpoint not found: {path}")
    check_inflation(path, ConversionError)  # before torch.load inflates a byte
    allowed = _numpy_scalar_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / unsafe files
        raise ConversionError(_load_failure(path, e, allowed)) from e


def _load_failure(path: Path, e: Exception, allowed: list[Any]) -> str:
    """One line on why a safe load failed; never torch's advice to load with weights_only=False
    (its message carries it, so none of it is quoted for a refused pickle)."""
    text = str(e)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file, or not a torch file at all
        unsafe = []
    unsafe = [name for name in unsafe if name not in _global_names(allowed)]
    blocked = re.search(r"GLOBAL (\S+)", text)
    if unsafe or blocked:
        names = ", ".join(unsafe) or blocked.group(1)
        return (
            f"refusing to load {path}: it is not a plain weights file, it holds pickled Python"
            f" objects ({names}) and will not be unpickled, since that could run code; convert"
            " a file that holds only tensors, such as a state_dict"
        )
    reason = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    reason = " ".join(reason.split())[:300]
    if "weights_only" in reason:  # torch's advice, whatever its wording: never relayed
        reason = "damaged, or not a file of tensors"
    return f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {reason})"


def _plain_meta(meta: Any) -> dict[str, Any]:
    """Provenance fields of an mmseg ``meta`` as plain Python values (numpy scalars unwrapped)."""
    out: dict[str, Any] = {}
    if not isinstance(meta, dict):
        return out
    for key in ("mmseg_version", "mmcv_version", "time", "iter", "epoch", "seed", "exp_name"):
        value = meta.get(key)
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str | int | float | bool):
            out[key] = value
    return out


def source_lineage(source: str, file_name: str, how: str) -> dict[str, Any]:
    """``licence`` and a one-step ``lineage`` for weights taken from a ``source`` file."""
    terms, url = SOURCE_LICENCES[source], SOURCE_URLS[source]
    step = {"from": source, "file": file_name, "licence": terms, "url": url, "how": how}
    return {"licence": terms, "lineage": [step]}


def _meta_for(source: str, num_classes: int, in_path: Path, raw: Any) -> dict[str, Any]:
    meta = cityscapes_meta(num_classes)
    meta.update({"source": source, "source_file": in_path.name})
    meta.update(source_lineage(source, in_path.name, "converted"))
    if source == "mmseg":
        meta["test_size"] = keep_ratio(RECIPE.scale)  # mmseg's Cityscapes test pipeline
        foreign_meta = raw.get("meta") if isinstance(raw, dict) else None
        if isinstance(foreign_meta, dict):
            names, palette = foreign_meta.get("CLASSES"), foreign_meta.get("PALETTE")
            if isinstance(names, list | tuple) and len(names) == num_classes:
                meta["class_names"] = [str(n) for n in names]
            if isinstance(palette, list | tuple) and len(palette) == num_classes:
                meta["palette"] = [[int(c) for c in rgb] for rgb in palette]
            meta["source_meta"] = _plain_meta(foreign_meta)
        return meta
    # erfnet_pytorch: trained on ToTensor() images (RGB in [0, 1]) without normalisation; our
    # pipelines compute (x - mean) / std on the 0-255 scale, so mean 0 / std 255 gives x / 255.
    meta["mean"] = [0.0, 0.0, 0.0]
    meta["std"] = [255.0, 255.0, 255.0]
    meta["test_size"] = dict(ERFNET_PYTORCH_TEST_SIZE)
    if num_classes > ERFNET_PYTORCH_VOID_CLASS:
        meta["class_names"][ERFNET_PYTORCH_VOID_CLASS] = "void"
        meta["palette"][ERFNET_PYTORCH_VOID_CLASS] = [0, 0, 0]
        # Its training mapped ignored pixels (255) to this class; a pixel predicted as void is
        # no Cityscapes class (in the original evaluation it counts as a miss, never a hit).
        meta["void_class"] = ERFNET_PYTORCH_VOID_CLASS
    meta["input_note"] = "RGB in [0, 1] (x / 255), no mean/std normalisation"
    return meta


def convert_checkpoint(
    in_path: str | os.PathLike, out_path: str | os.PathLike, source: str
) -> ERFNet:
    """Convert ``in_path`` (an mmseg or erfnet_pytorch file) into our checkpoint at ``out_path``
    (its meta records the source); returns the converted model in eval mode."""
    _check_source(source)
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve():
        raise ConversionError(f"output path must differ from the input: {out_path}")
    raw = load_foreign_checkpoint(in_path)
    guess = detect_source(raw)
    if guess == "erfnet":
        raise ConversionError(
            f"{in_path} is already an erfnet checkpoint; no conversion needed"
            " (load it with erfnet.load_model)"
        )
    if guess is not None and guess != source:
        raise ConversionError(
            f"{in_path} looks like a {guess} checkpoint, not {source}: use --from {guess}"
        )
    try:
        state = convert_state_dict(raw, source)
    except ConversionError as e:
        raise ConversionError(f"{in_path}: {e}") from e
    num_classes, head_channels = _head_size(state, source)
    model = ERFNet(**model_args_for(source, num_classes, head_channels))
    model.load_state_dict(state, strict=True)
    save_checkpoint(out_path, model, meta=_meta_for(source, num_classes, in_path, raw))
    return model.eval()
