"""Quantization-aware fine-tuning (QAT) for an int8 OpenVINO export, with NNCF's torch backend.

``qat_int8`` puts NNCF's fake quantizers into the BN-folded model (``nncf.quantize``: the same
PERFORMANCE preset and per-channel weights as the post-training methods, ranges from the
calibration images), fine-tunes it for ``iters`` steps to reproduce the fp32 model's logits
(the fp32 model is the teacher: its labels are what the accuracy gate compares against), and
converts it to an OpenVINO IR whose FakeQuantize nodes run in int8. It sees random crops of the
calibration images only: the gate scores other images.

Mean squared error on the logits rather than a loss on labels: a pixel keeps its fp32 label when
its logits do, and the pixels int8 flips are those whose two best logits are close
(docs/deploy.md), where any loss on probabilities is flat.

nncf and openvino are optional extras, imported when ``qat_int8`` runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from erfnet.deploy.exported import ExportError, require
from erfnet.fuse import fuse_bn


@dataclass(frozen=True)
class QATOptions:
    """Steps, learning rate (Adam) and crop of the fine-tuning (one crop per step); ``margin``
    > 0 adds the hinge loss ``label_margin_loss``."""

    iters: int = 300
    lr: float = 1e-5
    crop: tuple[int, int] = (256, 512)
    seed: int = 0
    margin: float = 0.0


def label_margin_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over pixels of ``relu(margin - (logit of the label - best other logit))``: zero where
    the student prefers the teacher's label by ``margin``, whatever its logits' values. The gate
    counts labels, and near a tie matching logits alone leaves the label to rounding."""
    own = logits.gather(1, labels[:, None])
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1, keepdim=True)
    return F.relu(margin - (own - others)).mean()


def _random_crop(x: torch.Tensor, crop: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A crop of at most ``crop`` from the [1, 3, H, W] input, flipped left-right half the
    time."""
    h, w = min(crop[0], x.shape[2]), min(crop[1], x.shape[3])
    top = int(torch.randint(0, x.shape[2] - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, x.shape[3] - w + 1, (1,), generator=gen))
    x = x[:, :, top : top + h, left : left + w]
    return x.flip(3) if torch.rand((), generator=gen) < 0.5 else x


def fine_tune(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    inputs: Sequence[np.ndarray],
    options: QATOptions,
) -> list[float]:
    """``options.iters`` Adam steps of ``student`` towards ``teacher``'s logits (MSE, plus the
    margin loss on its labels if asked) on crops of ``inputs``, cycling through them; the loss
    of each step."""
    gen = torch.Generator().manual_seed(options.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=options.lr)
    losses = []
    student.train()
    steps = tqdm(range(options.iters), desc="QAT", unit="step", leave=False)
    for step in steps:
        x = _random_crop(torch.from_numpy(inputs[step % len(inputs)]), options.crop, gen)
        with torch.no_grad():
            target = teacher(x)
        out = student(x)
        loss = F.mse_loss(out, target)
        if options.margin > 0:
            loss = loss + label_margin_loss(out, target.argmax(1), options.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        steps.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
    student.eval()
    return losses


def qat_int8(
    model: torch.nn.Module,
    inputs: Sequence[np.ndarray],
    size: tuple[int, int] | None,
    options: QATOptions = QATOptions(),
) -> tuple[Any, list[float]]:
    """(the int8 OpenVINO model: input ``input`` [N, 3, H, W], output ``logits``; the losses)
    of ``model`` (an eval-mode ERFNet) fine-tuned with fake quantization on ``inputs`` (the
    normalised [1, 3, h, w] calibration images). ``size``: the fixed input size, None =
    dynamic."""
    nncf = require("nncf")
    ov = require("openvino")
    if not inputs:
        raise ExportError("int8 calibration needs at least one image")
    if options.iters < 1:
        raise ExportError(f"QAT needs at least one step, got {options.iters}")
    # NNCF compiles its fake-quantization C++ extension on first use (cached afterwards); on a
    # busy 2-core machine that takes longer than NNCF's 60 s default limit, which then aborts.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    teacher = fuse_bn(model.cpu().float())
    student = fuse_bn(model.cpu().float())
    for p in student.parameters():
        p.requires_grad_(True)
    calibration = nncf.Dataset(inputs, torch.from_numpy)
    student = nncf.quantize(
        student, calibration, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(inputs)
    )
    losses = fine_tune(student, teacher, inputs, options)
    h, w = size or (-1, -1)
    # The trace of the fake quantizers warns that their rounding makes outputs differ between
    # two traces; the gate then compares the IR itself with fp32.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ir = ov.convert_model(
            student,
            example_input=torch.from_numpy(inputs[0]),
            input=[ov.PartialShape([-1, 3, h, w])],
        )
    ir.inputs[0].get_tensor().set_names({"input"})
    ir.outputs[0].get_tensor().set_names({"logits"})
    return ir, losses
