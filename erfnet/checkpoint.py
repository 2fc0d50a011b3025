"""Our checkpoint format: one dict that rebuilds the model from the file alone.

    {
        "format": "erfnet-v1",
        "model": state_dict,
        "model_args": ERFNet constructor arguments,
        "meta": {"class_names", "palette", "ignore_index", "mean", "std", "head", ...},
        # training checkpoints add: "optimizer", "scaler", "scheduler", "iteration",
        # "best_miou", "rng", "sampler", "args"
    }

Files are written atomically and read with ``torch.load(weights_only=True)``. The meta is complete
when written and when read (``complete_meta``, the one place that fills what a file lacks), so
every reader uses ``meta["mean"]`` and friends directly.
"""

from __future__ import annotations

import errno
import inspect
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from erfnet.checkpoint_checks import MAX_CLASSES, check_inflation, export_kind, meta_problem
from erfnet.errors import UserError
from erfnet.fuse import optimize_for_inference
from erfnet.labels import CLASS_NAMES, PALETTE, complete_meta
from erfnet.model import ERFNet, unwrap_model
from erfnet.outputs import atomic_write

FORMAT = "erfnet-v1"
# The terms of weights this project's code trained from scratch (the code's own licence). Weights
# from elsewhere keep their source's terms: ``meta["licence"]`` holds the terms that apply and
# ``meta["lineage"]`` where the weights came from, oldest first (erfnet.convert,
# erfnet.training.finetune); an export copies both into its metadata.
PROJECT_LICENCE = "Apache-2.0"


class CheckpointError(UserError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


class IntermediateCheckpointError(CheckpointError, UserError):
    """The encoder stage's checkpoint of ``--recipe erfnet_pytorch``: no model to predict with."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. the disk is full); the previous file is intact."""


def dataset_meta(dataset: Any) -> dict[str, Any]:
    """The meta a model trained on ``dataset`` carries: its classes, palette and ignore index.

    ``dataset`` exposes ``classes`` (names), ``palette`` (one RGB triple per class) and
    ``ignore_index``; ``mean`` / ``std`` (0-255 scale, RGB) where it has them, else
    ``complete_meta``'s.
    """
    classes, palette = list(dataset.classes), [list(c) for c in dataset.palette]
    if len(palette) != len(classes):
        raise ValueError(f"the dataset has {len(classes)} classes but {len(palette)} colours")
    meta: dict[str, Any] = {
        "class_names": [str(n) for n in classes],
        "palette": [[int(v) for v in c] for c in palette],
        "ignore_index": int(dataset.ignore_index),
    }
    meta.update({k: list(getattr(dataset, k)) for k in ("mean", "std") if hasattr(dataset, k)})
    return complete_meta(meta, len(classes))


def cityscapes_meta(num_classes: int = len(CLASS_NAMES)) -> dict[str, Any]:
    """Cityscapes' meta for checkpoints made without a dataset (the converters).

    Models with more outputs than the 19 classes get ``class_<i>`` / black for the extra ones.
    """
    names = list(CLASS_NAMES[:num_classes])  # complete_meta adds class_<i>
    palette = [list(c) for c in PALETTE][:num_classes]
    palette += [[0, 0, 0]] * (num_classes - len(palette))
    return complete_meta({"class_names": names, "palette": palette}, num_classes)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through the one atomic writer (``erfnet.outputs.atomic_write``: a
    temporary file in the same folder, fsync, rename over ``path``).

    A kill at any moment leaves either the old file or the new one, never a partial file. The
    object is serialised in memory first, so a failed write is a plain ``OSError`` (torch's
    writer turns one into an opaque RuntimeError) and the message can say how much space the
    file needs; a failed write removes its temporary file and raises ``CheckpointWriteError``.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise CheckpointWriteError(_write_error(path, len(data), e)) from None


def _write_error(path: Path, size: int, e: OSError) -> str:
    """'cannot write X: <reason>; it needs N MB, M MB free ...; the previous X is intact'."""
    previous = (
        f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} existed"
    )
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
        except OSError:
            free = "free space unknown"
        return (
            f"no space left on the device of '{path.parent}': writing {path.name} needs"
            f" {size / 1e6:.1f} MB ({free}); {previous}. Free some space (e.g. old"
            " iter_<N>.pth, or a lower --keep-ckpts) and continue with --resume"
        )
    return f"cannot write checkpoint '{path}': {e.strerror or e}; {previous}"


def model_args(ckpt_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` of a checkpoint with ERFNet's own defaults for the arguments it omits."""
    params = inspect.signature(ERFNet.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **ckpt_args}


def make_checkpoint(model: ERFNet, meta: dict[str, Any] | None = None, **extra: Any) -> dict:
    """The checkpoint dict for ``model`` (unwrapped from DDP / torch.compile if needed), with
    its meta completed (``complete_meta``)."""
    model = unwrap_model(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = dict(model.config)
    # Weights without a recorded origin were made here: the project's licence. (Only when
    # writing: an old file read without these keys is not known to be ours.)
    origin = {"licence": PROJECT_LICENCE, "lineage": [], **(meta or {})}
    return {
        "format": FORMAT,
        "model": state,
        "model_args": config,
        "meta": complete_meta(origin, config["num_classes"], config["head"]),
        **extra,
    }


def combine_licences(a: str, b: str) -> str:
    """The terms of weights derived from weights under ``a`` and ``b``: the project's licence
    adds no restriction, any other terms carry over (both, when they differ)."""
    if a == b or b == PROJECT_LICENCE:
        return a
    if a == PROJECT_LICENCE:
        return b
    return f"{a} and {b}"


def lineage_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """The ``licence`` and ``lineage`` entries of a checkpoint meta, for a checkpoint that
    continues its weights (``train.py --resume``); a file without them is taken as the
    project's own."""
    meta = meta or {}
    return {
        "licence": meta.get("licence", PROJECT_LICENCE),
        "lineage": list(meta.get("lineage", [])),
    }


def save_checkpoint(
    path: str | os.PathLike, model: ERFNet, meta: dict[str, Any] | None = None, **extra: Any
) -> None:
    """Write ``model`` (plus optional training state in ``extra``) to ``path`` atomically."""
    atomic_save(make_checkpoint(model, meta, **extra), path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read one of our checkpoints safely and check its structure (exports are named as such,
    zip records that would inflate far beyond the file are refused before reading them)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    kind = export_kind(path)
    if kind is not None:
        raise CheckpointError(
            f"{path} is {kind}, not a checkpoint: load .onnx / OpenVINO .xml exports with"
            " erfnet.deploy.exported.load_exported(path) (the scripts' --model flag), and"
            " load_model a .pth checkpoint"
        )
    check_inflation(path, CheckpointError)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_error(path, e)}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(
            f"{path} is not an erfnet checkpoint (expected a dict with 'model' and"
            f" 'model_args').{_foreign_hint(ckpt)}"
        )
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt.get("meta") or {}, dict):
        raise CheckpointError(f"{path}: 'model_args' and 'meta' must be dicts")
    args = model_args(ckpt["model_args"])
    num_classes = _checked_num_classes(ckpt, args, path)
    # Meta that cannot work (mean / std, class names, palette, ignore index, test size): one line.
    problem = meta_problem(ckpt.get("meta") or {}, num_classes)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    # Files written before the meta was complete get the missing keys here, once.
    ckpt["meta"] = complete_meta(ckpt.get("meta"), num_classes, str(args.get("head")))
    return ckpt


def _checked_num_classes(ckpt: dict, args: dict[str, Any], path: Path) -> int:
    """``model_args["num_classes"]``, refused in one line before anything is allocated when it
    is not an int in 1..MAX_CLASSES or disagrees with the class names (a head whose weights
    disagree is reported with the other mis-shaped tensors when the model is built)."""
    n = args.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CLASSES:
        raise CheckpointError(
            f"{path}: model_args num_classes {n!r} is not a class count (1..{MAX_CLASSES})"
        )
    names = (ckpt.get("meta") or {}).get("class_names")
    if isinstance(names, list | tuple) and names and len(names) != n:
        raise CheckpointError(
            f"{path}: meta class_names has {len(names)} names for a model of {n} classes"
            " (model_args num_classes)"
        )
    return n


def _load_error(path: Path, e: Exception) -> str:
    """Why ``torch.load`` failed, in words: the blocked global's name for an unsafe pickle (never
    torch's advice to load with weights_only=False), the file's kind for a non-checkpoint."""
    text = str(e)
    blocked = re.search(r"GLOBAL (\S+)", text)
    if blocked or "Weights only load failed" in text:
        name = blocked.group(1) if blocked else "an object that is not a tensor or container"
        return (
            f"Unsupported global: {name}: a safe load (weights_only=True) refuses to create it;"
            " a checkpoint holds only tensors, numbers, strings and containers"
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as oe:
        return f"{oe.strerror or oe}"
    if size == 0:
        return "the file is empty (0 bytes): an interrupted copy or download?"
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        return (
            f"not a PyTorch file (it starts with {head!r}, {size} bytes; a checkpoint is a zip"
            " archive written by torch.save)"
        )
    return (
        f"the file ({size} bytes) is truncated or corrupt: {type(e).__name__}:"
        f" {' '.join(text.split())[:200]}"
    )


def _foreign_hint(ckpt: Any) -> str:
    """What a dict that is not our checkpoint probably is, and what to do with it."""
    if not isinstance(ckpt, dict):
        return ""
    if ckpt and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()):
        own = {k for k in ERFNet().state_dict() if not k.startswith("head.")}
        if {k for k in ckpt if not k.startswith("head.")} == own:  # any head: any class count
            return (
                " It is a bare ERFNet state_dict() of this project (weights without"
                " 'model_args' and meta): save it with"
                " erfnet.checkpoint.save_checkpoint(path, model, meta) instead of"
                " torch.save(model.state_dict())."
            )
    foreign_prefixes = ("module.", "backbone.", "decode_head.", "encoder.", "decoder.")
    if "state_dict" in ckpt or any(
        isinstance(k, str) and k.startswith(foreign_prefixes) for k in ckpt
    ):
        return (
            " It looks like an mmsegmentation or erfnet_pytorch file: convert it first with"
            " `python scripts/convert_checkpoint.py --from {mmseg,erfnet_pytorch} IN OUT`."
        )
    return ""


def build_model_from_checkpoint(ckpt: dict, path: str | os.PathLike = "<checkpoint>") -> ERFNet:
    """Rebuild the ERFNet described by ``ckpt['model_args']`` and load its weights strictly;
    a class count that is absurd or disagrees with the weights is refused before building, and
    so is the encoder stage's checkpoint of ``--recipe erfnet_pytorch``."""
    if (ckpt.get("meta") or {}).get("stage") == "encoder":  # it only starts the decoder stage
        raise IntermediateCheckpointError(
            f"{path} is the encoder stage of --recipe erfnet_pytorch (an intermediate, logits at"
            " 1/8 without a decoder): train the full network from it with `python train.py"
            f" --recipe erfnet_pytorch --stage decoder --init-from {path}`"
        )
    _checked_num_classes(ckpt, model_args(ckpt["model_args"]), Path(path))
    try:
        model = ERFNet(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model_args {ckpt['model_args']!r}: {e}") from e
    if not isinstance(ckpt["model"], dict) or not all(
        isinstance(v, torch.Tensor) for v in ckpt["model"].values()
    ):
        raise CheckpointError(f"{path}: 'model' must be a state_dict (a dict of tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt["model"]]
    unexpected = [k for k in ckpt["model"] if k not in own]
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in ckpt["model"].items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shape_errors:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, mis-shaped {shape_errors[:10]}"
        )
    model.load_state_dict(ckpt["model"])
    return model


def check_finite(model: torch.nn.Module, path: str | os.PathLike = "<checkpoint>") -> None:
    """CheckpointError (one line) when a weight or buffer holds NaN or infinity: such a model
    predicts garbage, which would be scored or drawn without a word."""
    bad = [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]});"
            " the run that saved it had diverged: use an earlier checkpoint"
        )


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False
) -> ERFNet:
    """Load a model for inference from one of our checkpoints, in eval mode.

    ``fast=True`` returns the fastest exact inference path for the device (BatchNorm folded into
    the convolutions, channels_last memory format); see ``erfnet.fuse``. ``model.meta`` is the
    checkpoint's complete meta. Weights holding NaN or infinity are refused (``check_finite``).
    """
    ckpt = load_checkpoint(path)
    model = build_model_from_checkpoint(ckpt, path)
    check_finite(model, path)
    model = model.to(device).eval()
    model.meta = ckpt["meta"]
    return optimize_for_inference(model) if fast else model  # the copy keeps .meta
