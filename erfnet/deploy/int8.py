"""int8 ONNX graphs for the CPU: onnxruntime static quantization.

``quantize_int8`` runs onnxruntime's ``quantize_static`` on an exported fp32 graph: QDQ format,
per-channel int8 weights, uint8 activations (the u8s8 pair that x86 VNNI kernels take), ranges
from MinMax calibration over the given network inputs. scripts/export.py calls it on the
calibration images of ``erfnet.deploy.gate`` and refuses the result unless the gate, scored on
other images, passes.

onnxruntime and onnx are optional extras, imported when a function needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from erfnet.deploy.exported import PRECISION_KEY, ExportError, require
from erfnet.deploy.onnx import INPUT_NAME, read_props, set_props

__all__ = ["QuantizationError", "quantize_int8"]


class QuantizationError(ExportError):
    """An int8 model that cannot be made; the message is one line."""


def quantize_int8(
    fp32_path: str | Path, out_path: str | Path, inputs: Sequence[np.ndarray]
) -> Path:
    """Static int8 quantization of ``fp32_path`` with MinMax ranges over ``inputs``."""
    onnx = require("onnx")
    require("onnxruntime")
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
            return None if x is None else {INPUT_NAME: x}

    if len(inputs) < 1:
        raise QuantizationError("int8 calibration needs at least one image")
    out_path = Path(out_path)
    # onnxruntime writes its augmented calibration graph to a temporary folder of its own.
    quantize_static(
        str(fp32_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # One image at a time, its ranges merged into the running min / max: memory stays flat
        # (all at once holds every image's activations: docs/deploy.md).
        extra_options={"CalibStridedMinMax": 1},
    )
    # The fp32 graph's metadata (checkpoint meta, output kind), and the new precision.
    proto = onnx.load(str(out_path))
    set_props(proto, {**read_props(fp32_path), PRECISION_KEY: "int8"})
    onnx.save(proto, str(out_path))
    return out_path
