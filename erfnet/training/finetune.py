"""``train.py --init-from CKPT``: start a new run from another ERFNet's weights.

The file is one of ours, mmseg's or erfnet_pytorch's (as ``erfnet.convert`` detects them), or
Eromera's ImageNet-pretrained encoder (``erfnet_encoder_pretrained.pth.tar``) as an encoder-only
start. Every tensor whose name and shape match is copied; when the class count differs the
classifier keeps its fresh initialisation (reported). Anything else that does not fit (another
head, other widths) is a ``CheckpointError`` naming the file: a silent partial load would train
from scratch without saying so. Optimizer, schedule and iteration start fresh (not ``--resume``).

Licence lineage: the new weights derive from the file's, so they keep its terms (``InitReport``'s
``licence`` and ``lineage`` go into the new checkpoint's meta).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erfnet.checkpoint import PROJECT_LICENCE, CheckpointError, combine_licences, lineage_meta
from erfnet.convert import (
    ERFNET_PYTORCH_TABLE,
    SOURCE_LICENCES,
    ConversionError,
    convert_state_dict,
    detect_source,
    load_foreign_checkpoint,
    source_lineage,
)
from erfnet.model import ERFNet
from erfnet.training.logs import log
from erfnet.training.resume import check_model_fits

IMAGENET_ENCODER = "imagenet_encoder"
# Eromera's ImageNet classifier wraps the encoder as ``features.encoder`` (through DataParallel).
_ENCODER_PREFIXES = ("module.features.encoder.", "features.encoder.")
_IMAGENET_CLASSIFIER_PREFIXES = ("module.classifier.", "classifier.")
# The tensors that depend on the class count, per head.
CLASSIFIER_PREFIX = {"fcn": "head.classifier.", "deconv": "head.output_conv."}


@dataclass
class InitReport:
    """What ``init_from`` did: the source format, tensors copied and tensors re-initialised."""

    source: str
    loaded: list[str]
    reinitialised: list[str]
    source_classes: int | None
    num_classes: int
    total: int = 0  # tensors of the model (an encoder-only start loads fewer)
    licence: str = PROJECT_LICENCE  # the terms the new weights are under
    lineage: list[dict[str, Any]] = field(default_factory=list)  # oldest first, this step last

    def lineage_meta(self) -> dict[str, Any]:
        """The ``licence`` and ``lineage`` entries of the new checkpoint's meta."""
        return {"licence": self.licence, "lineage": self.lineage}

    def describe(self, path: str | os.PathLike) -> list[str]:
        """The log lines: what was loaded, what was not, and the weights' licence."""
        lines = [f"--init-from {path} ({self.source}): {len(self.loaded)} tensors loaded"]
        if (
            self.source == IMAGENET_ENCODER
            or len(self.loaded) + len(self.reinitialised) < self.total
        ):
            lines.append("encoder-only start: the decoder and head are initialised as usual")
        if self.reinitialised:
            lines.append(
                f"re-initialised for {self.num_classes} classes (the file has"
                f" {self.source_classes}): {', '.join(self.reinitialised)}"
            )
        origin = ", ".join(f"{s['from']} ({s['licence']})" for s in self.lineage[:-1])
        lines.append(
            f"licence: this run's weights derive from {path}"
            + (f" (from {origin})" if origin else "")
            + f" and are under {self.licence}; the checkpoints and exports record it"
        )
        return lines


def _is_imagenet_encoder(obj: Any) -> bool:
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        state = obj if isinstance(obj, dict) else {}
    return any(isinstance(k, str) and k.startswith(_ENCODER_PREFIXES) for k in state)


def imagenet_encoder_state(obj: Any) -> dict[str, torch.Tensor]:
    """Our ``encoder.*`` tensors from Eromera's ImageNet file (its classifier dropped): its keys
    are erfnet_pytorch's under ``features.encoder.``, mapped by the converter's table."""
    state = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else obj
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        key = str(key)
        if key.startswith(_IMAGENET_CLASSIFIER_PREFIXES):
            continue  # the 1000-class ImageNet classifier
        prefix = next((p for p in _ENCODER_PREFIXES if key.startswith(p)), None)
        module, _, leaf = ("encoder." + key[len(prefix) :] if prefix else key).rpartition(".")
        target = ERFNET_PYTORCH_TABLE.get(module) if prefix else None
        if target is None or not target.startswith("encoder.") or not torch.is_tensor(value):
            if not (prefix and module == "encoder.output_conv"):
                unknown.append(key)
            continue
        out[f"{target}.{leaf}"] = value
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ConversionError(f"unexpected key(s) in the ImageNet encoder file: {shown}")
    return out


def init_lineage(path: Path, source: str, raw: Any) -> dict[str, Any]:
    """``licence`` and ``lineage`` of weights started from ``path``: the file's own lineage
    (ours) or its source's terms (mmseg, erfnet_pytorch and its ImageNet encoder), plus this
    --init-from step."""
    if source == "erfnet":
        meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
        # A file converted before lineage was recorded still names its source.
        terms = str(meta.get("licence") or SOURCE_LICENCES.get(meta.get("source"), PROJECT_LICENCE))
        step = {"from": "erfnet", "file": path.name, "licence": terms, "how": "--init-from"}
        return {"licence": terms, "lineage": [*meta.get("lineage", []), step]}
    theirs = "erfnet_pytorch" if source == IMAGENET_ENCODER else source
    out = source_lineage(theirs, path.name, "--init-from")
    out["licence"] = combine_licences(PROJECT_LICENCE, out["licence"])
    return out


def load_init_state(
    path: str | os.PathLike,
) -> tuple[str, dict[str, torch.Tensor], str | None, dict[str, Any]]:
    """(source format, state_dict in our names, the source's head or None for encoder-only,
    the ``init_lineage`` of the weights)."""
    path = Path(path)
    try:
        raw = load_foreign_checkpoint(path)  # torch.load(weights_only=True)
        source, head = detect_source(raw), None
        if source == "erfnet":
            if not isinstance(raw.get("model"), dict):
                raise ConversionError("'model' is not a state_dict")
            head = str((raw.get("model_args") or {}).get("head", "fcn"))
            state = dict(raw["model"])
            if (raw.get("meta") or {}).get("stage") == "encoder":  # --recipe erfnet_pytorch's
                head = None  # first stage: an encoder-only start (its 1/8 classifier dropped)
                state = {k: v for k, v in state.items() if k.startswith("encoder.")}
        elif source in ("mmseg", "erfnet_pytorch"):
            head = "fcn" if source == "mmseg" else "deconv"
            state = convert_state_dict(raw, source)
        elif _is_imagenet_encoder(raw):
            source, state = IMAGENET_ENCODER, imagenet_encoder_state(raw)
        else:
            raise CheckpointError(
                f"--init-from {path}: not an ERFNet checkpoint (ours, mmseg's, erfnet_pytorch's"
                " or Eromera's ImageNet encoder file)"
            )
        return source, state, head, init_lineage(path, source, raw)
    except ConversionError as e:
        raise CheckpointError(f"--init-from {path}: {e}") from None


def init_from(model: ERFNet, path: str | os.PathLike) -> InitReport:
    """Load ``path``'s weights into ``model`` (in place) as described in the module docstring."""
    source, state, src_head, lineage = load_init_state(path)
    own = model.state_dict()
    head = model.config.get("head", "fcn")
    cls_prefix = CLASSIFIER_PREFIX[head]
    where = f"--init-from {path} ({source})"
    if src_head is not None and src_head != head:
        raise CheckpointError(
            f"{where} has a '{src_head}' head but the model is built with '{head}': add"
            f" --head {src_head}"
        )
    wanted = [k for k in own if src_head is not None or k.startswith("encoder.")]
    for k in wanted:  # files saved before PyTorch 0.4.1 (2017) have no BN step counters
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, own[k])
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != own[k].shape and not k.startswith(cls_prefix)
    ]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{where}: the weights do not fit this ERFNet: missing {missing[:10]}, unexpected"
            f" {unexpected[:10]}, mis-shaped {misshaped[:10]}"
        )
    loaded, reinit = [], []
    new_state = dict(own)
    for k in wanted:
        if state[k].shape == own[k].shape:
            new_state[k] = state[k].to(own[k].dtype)
            loaded.append(k)
        else:  # the classifier of another class count: keep the fresh initialisation
            reinit.append(k)
    model.load_state_dict(new_state)
    src_classes = None
    cls_weight = state.get(cls_prefix + "weight")
    if cls_weight is not None:
        src_classes = int(cls_weight.shape[0 if head == "fcn" else 1])
    return InitReport(source, loaded, reinit, src_classes, model.num_classes, len(own), **lineage)


def start_weights(
    model: ERFNet, meta: dict[str, Any], init_path: str | None, path: Path | None, ckpt: dict | None
) -> None:
    """``model``'s weights from the --resume checkpoint ``ckpt`` (read from ``path``), else from
    --init-from (each rank loads the file: the same weights everywhere); ``meta`` gains their
    licence and lineage."""
    if ckpt is not None:
        check_model_fits(ckpt, model, path or Path("<checkpoint>"))
        model.load_state_dict(ckpt["model"])
        meta.update(lineage_meta(ckpt.get("meta")))  # a resumed run keeps its weights' terms
    elif init_path is not None:
        report = init_from(model, init_path)
        meta.update(report.lineage_meta())  # the weights keep their source's licence
        for line in report.describe(init_path):
            log.info("%s", line)
