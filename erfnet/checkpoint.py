"""Our checkpoint format: one dict that rebuilds the model from the file alone.

    {
        "format": "erfnet-v1",
        "model": state_dict,
        "model_args": ERFNet constructor arguments,
        "meta": {"class_names", "palette", "ignore_index", "mean", "std", ...},
        # training checkpoints add: "optimizer", "scaler", "scheduler", "iteration",
        # "best_miou", "rng", "sampler", "args"
    }

Files are written atomically and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

from erfnet.config import IGNORE_INDEX, MEAN_RGB, STD_RGB
from erfnet.deploy import optimize_for_inference
from erfnet.labels import CLASS_NAMES, PALETTE
from erfnet.model import ERFNet, unwrap_model

FORMAT = "erfnet-v1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def dataset_meta(dataset: Any) -> dict[str, Any]:
    """The meta a model trained on ``dataset`` carries: its classes, palette and ignore index.

    ``dataset`` exposes ``classes`` (names), ``palette`` (one RGB triple per class) and
    ``ignore_index``; ``mean`` / ``std`` (0-255 scale, RGB) where it has them, else the
    ImageNet statistics every built-in pipeline normalises with.
    """
    classes, palette = list(dataset.classes), [list(c) for c in dataset.palette]
    if len(palette) != len(classes):
        raise ValueError(f"the dataset has {len(classes)} classes but {len(palette)} colours")
    return {
        "class_names": [str(n) for n in classes],
        "palette": [[int(v) for v in c] for c in palette],
        "ignore_index": int(dataset.ignore_index),
        "mean": list(getattr(dataset, "mean", MEAN_RGB)),
        "std": list(getattr(dataset, "std", STD_RGB)),
    }


def cityscapes_meta(num_classes: int = len(CLASS_NAMES)) -> dict[str, Any]:
    """Cityscapes' meta for checkpoints made without a dataset (the converters).

    Models with more outputs than the 19 classes get ``class_<i>`` / black for the extra ones.
    """
    names = list(CLASS_NAMES[:num_classes])
    names += [f"class_{i}" for i in range(len(names), num_classes)]
    palette = [list(c) for c in PALETTE][:num_classes]
    palette += [[0, 0, 0]] * (num_classes - len(palette))
    return {
        "class_names": names,
        "palette": palette,
        "ignore_index": IGNORE_INDEX,
        "mean": list(MEAN_RGB),
        "std": list(STD_RGB),
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600, and the rename would keep that mode; an
    # exclusive open honours the umask like a plain torch.save would.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_checkpoint(model: ERFNet, meta: dict[str, Any] | None = None, **extra: Any) -> dict:
    """The checkpoint dict for ``model`` (unwrapped from DDP / torch.compile if needed)."""
    model = unwrap_model(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # The normalisation always; class names and colours only where the caller knows them
    # (``dataset_meta``): a checkpoint never claims classes it was not trained on.
    full_meta: dict[str, Any] = {"mean": list(MEAN_RGB), "std": list(STD_RGB)}
    full_meta.update(meta or {})
    return {
        "format": FORMAT,
        "model": state,
        "model_args": dict(model.config),
        "meta": full_meta,
        **extra,
    }


def save_checkpoint(
    path: str | os.PathLike, model: ERFNet, meta: dict[str, Any] | None = None, **extra: Any
) -> None:
    """Write ``model`` (plus optional training state in ``extra``) to ``path`` atomically."""
    atomic_save(make_checkpoint(model, meta, **extra), path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read one of our checkpoints safely and check its structure."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / unsafe files
        # torch's own reason ("Unsupported global: ...", "Unsupported operand ...") follows a
        # generic preamble whose first line suggests weights_only=False: never what we want.
        text = str(e)
        start = text.find("Unpickler error:")
        reason = text[start + len("Unpickler error:") :] if start >= 0 else text
        reason = " ".join(reason.split("Check the documentation")[0].split())[:300]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {reason}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        hint = ""
        foreign_prefixes = ("module.", "backbone.", "decode_head.", "encoder.", "decoder.")
        if isinstance(ckpt, dict) and (
            "state_dict" in ckpt
            or any(isinstance(k, str) and k.startswith(foreign_prefixes) for k in ckpt)
        ):
            hint = (
                " It looks like an mmsegmentation or erfnet_pytorch file: convert it first with"
                " `python scripts/convert_checkpoint.py --from {mmseg,erfnet_pytorch} IN OUT`."
            )
        raise CheckpointError(
            f"{path} is not an erfnet checkpoint (expected a dict with 'model' and"
            f" 'model_args').{hint}"
        )
    return ckpt


def build_model_from_checkpoint(ckpt: dict, path: str | os.PathLike = "<checkpoint>") -> ERFNet:
    """Rebuild the ERFNet described by ``ckpt['model_args']`` and load its weights strictly."""
    try:
        model = ERFNet(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model_args {ckpt['model_args']!r}: {e}") from e
    if not isinstance(ckpt["model"], dict) or not all(
        isinstance(v, torch.Tensor) for v in ckpt["model"].values()
    ):
        raise CheckpointError(f"{path}: 'model' must be a state_dict (a dict of tensors)")
    missing, unexpected = [], []
    own = model.state_dict()
    for k in own:
        if k not in ckpt["model"]:
            missing.append(k)
    for k in ckpt["model"]:
        if k not in own:
            unexpected.append(k)
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


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False
) -> ERFNet:
    """Load a model for inference from one of our checkpoints, in eval mode.

    ``fast=True`` returns the fastest exact inference path for the device (BatchNorm folded into
    the convolutions, channels_last memory format); see ``erfnet.deploy``.
    """
    ckpt = load_checkpoint(path)
    model = build_model_from_checkpoint(ckpt, path).to(device).eval()
    model.meta = {"mean": list(MEAN_RGB), "std": list(STD_RGB), **(ckpt.get("meta") or {})}
    return optimize_for_inference(model) if fast else model  # the copy keeps .meta
