"""int8 ERFNet for the CPU: onnxruntime static quantization, measured against fp32 before use.

``quantize_int8`` runs onnxruntime's ``quantize_static`` on an exported fp32 graph: QDQ format,
per-channel int8 weights, uint8 activations (the u8s8 pair that x86 VNNI kernels take), ranges
from MinMax calibration on images of a dataset split. ``compare_int8`` then runs both graphs on
the same images with the same session options and reports latency (interleaved runs, median),
pixel agreement (the share of argmax labels that int8 keeps at the network's output size) and the
mIoU of each on the split's labels (logits resized to the label size, as the test protocol does).
``quantize_and_check`` does both and refuses (``QuantizationError`` with the figures; no file left
behind) an int8 graph whose agreement is below ``min_agreement`` percent.

onnxruntime and onnx are optional extras, imported when a function needs them.
"""

from __future__ import annotations

import importlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erfnet.checkpoint import cityscapes_meta, load_model
from erfnet.config import MEAN_RGB, STD_RGB
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.data.folder import FolderDataset
from erfnet.data.synthetic import make_synthetic_cityscapes
from erfnet.data.transforms import normalize, resize_image
from erfnet.deploy.exported import PRECISION_KEY, load_exported, onnx_session
from erfnet.deploy.onnx import export_onnx
from erfnet.evaluation.metrics import ConfusionMatrix
from erfnet.model import ERFNet

__all__ = [
    "DEFAULT_MIN_AGREEMENT",
    "QuantizationError",
    "benchmark_int8",
    "calibration_samples",
    "check_agreement",
    "compare_int8",
    "format_int8_report",
    "quantize_and_check",
    "quantize_int8",
]

Size = tuple[int, int]
DEFAULT_MIN_AGREEMENT = 98.0  # percent of pixels whose int8 label equals the fp32 label
INSTALL_HINT = "pip install onnx onnxruntime  (or: pip install -e .[export])"


class QuantizationError(ValueError):
    """An int8 model that cannot be made or is refused; the message holds the figures."""


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise QuantizationError(
            f"int8 quantization needs the optional package '{module}': {INSTALL_HINT}"
        ) from None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint meta an exported graph carries (``erfnet.deploy.exported``'s reader)."""
    return load_exported(path).meta


def calibration_samples(
    root: str | Path,
    split: str,
    num_images: int,
    size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    classes: str | Path | None = None,
) -> list[tuple[np.ndarray, torch.Tensor | None]]:
    """``num_images`` images spread evenly over ``split`` of a Cityscapes-layout dataset (or of
    the folder dataset ``classes`` describes): (normalised float32 [1, 3, *size] input, trainId
    label [H, W] at the image's size or None)."""
    if num_images < 1:
        raise QuantizationError(f"need at least one calibration image, got {num_images}")
    if classes is not None:
        dataset = FolderDataset(root, classes, split)
    else:
        dataset = CityscapesDataset(root, split)
    n = min(num_images, len(dataset))
    picks = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    samples = []
    for i in picks:
        image, label = dataset.load(int(i))
        x = normalize(resize_image(image[None], size), mean, std)
        samples.append((x.numpy(), label.long() if label is not None else None))
    return samples


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    inputs: Sequence[np.ndarray],
    *,
    per_channel: bool = True,
    quant_format: str = "QDQ",
) -> Path:
    """Static int8 quantization of ``fp32_path`` with MinMax ranges over ``inputs``."""
    _require("onnx")
    _require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """The inputs, one range at a time (onnxruntime's CalibStridedMinMax protocol)."""

        def __init__(self) -> None:
            self.set_range(0, len(inputs))

        def __len__(self) -> int:
            return len(inputs)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(inputs[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {"input": x}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # onnxruntime writes its augmented calibration graph to a temporary folder of its own.
    quantize_static(
        str(fp32_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ if quant_format == "QDQ" else QuantFormat.QOperator,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # One image at a time, its ranges merged into the running min / max: memory stays flat
        # (all at once costs about 1 GB per 512x1024 image).
        extra_options={"CalibStridedMinMax": 1},
    )
    _copy_meta(fp32_path, out_path)
    return out_path


def _copy_meta(src: str | Path, dst: str | Path) -> None:
    onnx = _require("onnx")
    meta = onnx.load(str(src), load_external_data=False).metadata_props
    proto = onnx.load(str(dst))
    have = {p.key for p in proto.metadata_props}
    for p in meta:
        if p.key not in have:
            entry = proto.metadata_props.add()
            entry.key, entry.value = p.key, p.value
    proto.metadata_props.add().CopyFrom(_prop(onnx, PRECISION_KEY, "int8"))
    onnx.save(proto, str(dst))


def _prop(onnx: Any, key: str, value: str) -> Any:
    entry = onnx.StringStringEntryProto()
    entry.key, entry.value = key, value
    return entry


def _labels(logits: np.ndarray, size: Sequence[int] | None = None) -> torch.Tensor:
    t = torch.from_numpy(logits)
    if size is not None and tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return t.argmax(1)[0]


def compare_int8(
    fp32_path: str | Path,
    int8_path: str | Path,
    samples: Sequence[tuple[np.ndarray, torch.Tensor | None]],
    *,
    repeats: int = 5,
    threads: int = 0,
) -> dict[str, Any]:
    """fp32 vs int8 on ``samples``: latency (ms, median of interleaved runs on the first input),
    pixel agreement (%) and, where the samples have labels, mIoU (%) of each."""
    fp32, int8 = onnx_session(fp32_path, threads), onnx_session(int8_path, threads)
    x0 = samples[0][0]
    for s in (fp32, int8):  # untimed: allocations and kernel selection
        s.run(None, {"input": x0})
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(repeats):
        for name, s in (("fp32", fp32), ("int8", int8)):
            t = time.perf_counter()
            s.run(None, {"input": x0})
            times[name].append(time.perf_counter() - t)
    equal = total = 0
    num_classes = int(fp32.run(None, {"input": x0})[0].shape[1])
    cms = {"fp32": ConfusionMatrix(num_classes), "int8": ConfusionMatrix(num_classes)}
    labelled = all(label is not None for _, label in samples)
    for x, label in samples:
        out = {"fp32": fp32.run(None, {"input": x})[0], "int8": int8.run(None, {"input": x})[0]}
        a, b = _labels(out["fp32"]), _labels(out["int8"])
        equal += int((a == b).sum())
        total += a.numel()
        if labelled:
            for name, logits in out.items():
                cms[name].update(_labels(logits, label.shape), label)
    report: dict[str, Any] = {
        "size": list(x0.shape[-2:]),
        "images": len(samples),
        "repeats": repeats,
        "fp32_ms": 1e3 * statistics.median(times["fp32"]),
        "int8_ms": 1e3 * statistics.median(times["int8"]),
        "agreement": 100.0 * equal / total,
        "fp32_path": str(fp32_path),
        "int8_path": str(int8_path),
        "fp32_mb": Path(fp32_path).stat().st_size / 2**20,
        "int8_mb": Path(int8_path).stat().st_size / 2**20,
    }
    report["speedup"] = report["fp32_ms"] / report["int8_ms"]
    for name, cm in cms.items():
        report[f"{name}_miou"] = cm.compute()["mIoU"] if labelled else None  # percent
    return report


def check_agreement(report: dict[str, Any], min_agreement: float) -> None:
    """Raise ``QuantizationError`` (with the measured figures) if int8 agrees too little."""
    if report["agreement"] < min_agreement:
        raise QuantizationError(
            f"int8 model refused: its labels agree with fp32 on {report['agreement']:.2f}% of "
            f"pixels (minimum {min_agreement:g}%) over {report['images']} image(s) at "
            f"{report['size'][0]}x{report['size'][1]}; " + _summary(report)
        )


def _summary(r: dict[str, Any]) -> str:
    miou = ""
    if r.get("fp32_miou") is not None:
        miou = f", mIoU fp32 {r['fp32_miou']:.2f}% / int8 {r['int8_miou']:.2f}%"
    return f"latency fp32 {r['fp32_ms']:.1f} ms / int8 {r['int8_ms']:.1f} ms{miou}"


def quantize_and_check(
    fp32_path: str | Path,
    out_path: str | Path,
    calib_root: str | Path,
    *,
    split: str = "val",
    num_images: int = 16,
    size: Size = (512, 1024),
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    repeats: int = 5,
    classes: str | Path | None = None,
) -> dict[str, Any]:
    """Quantize with ``num_images`` of ``split``, compare with fp32 on them, keep the int8 graph
    at ``out_path`` only if its agreement is at least ``min_agreement`` percent. ``classes``:
    the classes file of a folder dataset at ``calib_root`` (None: Cityscapes layout)."""
    meta = read_meta(fp32_path)
    samples = calibration_samples(
        calib_root,
        split,
        num_images,
        size,
        meta.get("mean", MEAN_RGB),
        meta.get("std", STD_RGB),
        classes=classes,
    )
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        quantize_int8(fp32_path, tmp, [x for x, _ in samples])
        report = compare_int8(fp32_path, tmp, samples, repeats=repeats)
        report.update(split=split, min_agreement=min_agreement, int8_path=str(out_path))
        check_agreement(report, min_agreement)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def format_int8_report(r: dict[str, Any]) -> str:
    """The fp32 / int8 table of a ``compare_int8`` report."""
    split = f" of {r['split']}" if r.get("split") else ""
    miou = {k: f"{r[f'{k}_miou']:.2f}" if r.get(f"{k}_miou") is not None else "-" for k in
            ("fp32", "int8")}  # fmt: skip
    return "\n".join(
        [
            f"onnxruntime CPU at {r['size'][0]}x{r['size'][1]}, {r['images']} image(s){split}, "
            f"latency = median of {r['repeats']} interleaved runs",
            f"{'graph':<6} {'latency ms':>11} {'size MiB':>9} {'mIoU %':>7} {'agreement %':>12}",
            f"{'fp32':<6} {r['fp32_ms']:>11.1f} {r['fp32_mb']:>9.1f} {miou['fp32']:>7} {'100':>12}",
            f"{'int8':<6} {r['int8_ms']:>11.1f} {r['int8_mb']:>9.1f} {miou['int8']:>7} "
            f"{r['agreement']:>12.2f}",
            f"int8 is x{r['speedup']:.2f} the speed of fp32",
        ]
    )


def benchmark_int8(
    size: Size = (512, 1024),
    calib_images: int = 4,
    checkpoint: str | Path | None = None,
    repeats: int = 5,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """int8 vs fp32 onnxruntime at ``size`` on a synthetic Cityscapes of that size.

    The model is ``checkpoint`` or, without one, a random-weight ERFNet with random BatchNorm
    statistics (latency does not depend on the weights; its agreement is a lower bound for a
    trained model, whose labels are rarely near a tie). No agreement gate is applied.
    """
    if checkpoint is not None:
        model = load_model(checkpoint)
        meta = model.meta
    else:
        torch.manual_seed(0)
        model = ERFNet(num_classes=19).eval()
        _random_bn_stats(model)
        meta = cityscapes_meta(19)
    tmp = Path(tempfile.mkdtemp(prefix="erfnet_int8_bench_", dir=workdir))
    try:
        root = make_synthetic_cityscapes(
            tmp / "data", train=0, val=calib_images, size=size, extras=False
        )
        fp32 = export_onnx(model, tmp / "fp32.onnx", *size, meta=meta)
        report = quantize_and_check(
            fp32, tmp / "int8.onnx", root, num_images=calib_images, size=size,
            min_agreement=0.0, repeats=repeats,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["model"] = str(checkpoint) if checkpoint else "random weights, random BN statistics"
    return report


@torch.no_grad()
def _random_bn_stats(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that folding and int8 ranges see real scales."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
