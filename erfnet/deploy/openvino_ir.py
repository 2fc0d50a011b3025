"""OpenVINO IRs of an ERFNet: converted from the ONNX export, argmax appended, int8 via NNCF.

The IR is converted from the one ONNX export (``erfnet.deploy.onnx``) with
``openvino.convert_model`` and saved with ``compress_to_fp16=False`` (fp32 weights); its metadata
sits in rt_info under ``["erfnet", key]``, the keys of ``erfnet.deploy.exported``. bf16 is not a
different graph but the CPU plugin's ``INFERENCE_PRECISION_HINT``, recorded under ``HINT_KEY`` so
that ``load_exported`` compiles the IR as the accuracy gate ran it. int8 is NNCF post-training
quantization (``nncf.quantize``) of that IR with a calibration set.

openvino and nncf are optional extras, imported here when a function needs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erfnet.deploy.exported import OUTPUT_KEY, ExportError, openvino_compiled, require

# The first convolution (the input downsampler) and the classifier of either head, by the node
# names the ONNX export gives them: the layers NNCF's ignored scope keeps in float when asked.
EDGE_LAYER_PATTERNS = (r"/encoder/encoder\.0/.*", r"/head/classifier/.*", r"/head/output_conv/.*")


@dataclass(frozen=True)
class NNCFOptions:
    """The NNCF post-training quantization settings ``quantize_int8`` uses (see docs/deploy.md
    for what each gave on a trained checkpoint)."""

    preset: str = "performance"  # "performance" (symmetric) or "mixed" (asymmetric activations)
    fast_bias_correction: bool = True
    ignore_edge_layers: bool = False  # keep the first and last convolutions in float
    # More node-name patterns (regular expressions) NNCF keeps in float: mixed precision.
    ignored_patterns: tuple[str, ...] = ()
    # nncf.quantize_with_accuracy_control: layers go back to float, most harmful first, until the
    # labels of the calibration images agree with fp32 on at least 1 - max_agreement_drop of
    # their pixels (the gate then scores other images).
    accuracy_control: bool = False
    max_agreement_drop: float = 0.0075


def _float_edges(**more: Any) -> NNCFOptions:
    return NNCFOptions(ignore_edge_layers=True, fast_bias_correction=False, **more)


# scripts/export.py --int8-method: the NNCF settings tried for a gate-passing int8 export, in
# the order of docs/deploy.md's frontier ("float" = kept in f32, the rest int8).
INT8_METHODS = {
    "defaults": NNCFOptions(),
    "float-edges": _float_edges(),
    "float-head": _float_edges(ignored_patterns=(r"/head/.*",)),
    "float-decoder-head": _float_edges(ignored_patterns=(r"/head/.*", r"/decoder/.*")),
    "accuracy-control": _float_edges(accuracy_control=True),
}
# The default: the post-training method closest to the gate on trained checkpoints
# (docs/deploy.md); seconds to a few minutes.
DEFAULT_INT8_METHOD = "float-decoder-head"
# The method closest to the gate of all measured (docs/deploy.md: quantization-aware
# fine-tuning, on both checkpoints), named when the gate refuses; minutes and ~10 GB at 512x1024.
BEST_INT8_METHOD = "qat"


def cpu_supports_bf16() -> bool:
    """True where OpenVINO's CPU plugin runs bf16 natively (AVX512-BF16 or AMX)."""
    ov = require("openvino")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def convert_onnx(onnx_path: str | Path) -> Any:
    """``openvino.convert_model`` of an ONNX export (input ``input``, output ``logits``)."""
    ov = require("openvino")
    return ov.convert_model(str(onnx_path))


def append_argmax(model: Any) -> Any:
    """A new model ending in int32 ``labels`` [N, H, W]: the argmax over the class axis (a
    stable TopK, k=1, returns the first index among equal maxima, like ``torch.argmax``)."""
    ov = require("openvino")
    ops = require("openvino.opset11")
    logits, k = model.get_results()[0].input_value(0), ops.constant(np.int64(1))
    top = ops.topk(
        logits, k, axis=1, mode="max", sort="value", index_element_type="i32", stable=True
    )
    labels = ops.squeeze(top.output(1), ops.constant(np.array([1], dtype=np.int64)))
    labels.output(0).get_tensor().set_names({"labels"})
    out = ov.Model([labels], model.get_parameters(), "erfnet")
    out.set_rt_info("labels", ["erfnet", OUTPUT_KEY])
    return out


def save_ir(model: Any, xml_path: str | Path, props: Mapping[str, str]) -> Path:
    """Write ``model`` with fp32 weights and ``props`` under rt_info ``["erfnet", key]``."""
    ov = require("openvino")
    for key, value in props.items():
        model.set_rt_info(value, ["erfnet", key])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def ir_files(xml_path: str | Path) -> list[Path]:
    """The files an IR consists of: the .xml and its .bin weights beside it."""
    xml_path = Path(xml_path)
    return [xml_path, xml_path.with_suffix(".bin")]


def _item_input(item: tuple[Sequence[np.ndarray], int, np.ndarray]) -> np.ndarray:
    """The network input of an accuracy-control item (inputs, index, fp32 labels)."""
    inputs, index, _ = item
    return inputs[index]


def _agreement(compiled: Any, items: Any) -> tuple[float, list[float]]:
    """nncf's validation_fn: the share of pixels whose argmax equals the fp32 labels (mean,
    and per item)."""
    per_item = []
    for inputs, index, labels in items:
        pred = np.asarray(compiled(inputs[index])[0]).argmax(1).astype(np.uint8)
        per_item.append(float((pred == labels).mean()))
    return float(np.mean(per_item)), per_item


def _accuracy_items(model: Any, inputs: Sequence[np.ndarray]) -> list[tuple[Any, int, Any]]:
    """(inputs, index, fp32 labels as uint8) per calibration image; inputs load on access."""
    fp32 = openvino_compiled(model, hint="f32")
    return [
        (inputs, i, np.asarray(fp32(inputs[i])[0]).argmax(1).astype(np.uint8))
        for i in range(len(inputs))
    ]


def quantize_int8(
    model: Any, inputs: Sequence[np.ndarray], options: NNCFOptions = NNCFOptions()
) -> Any:
    """NNCF post-training int8 quantization of an fp32 IR, statistics from ``inputs``."""
    nncf = require("nncf")
    if not inputs:
        raise ExportError("int8 calibration needs at least one image")
    presets = {
        "performance": nncf.QuantizationPreset.PERFORMANCE,
        "mixed": nncf.QuantizationPreset.MIXED,
    }
    common: dict[str, Any] = {
        "preset": presets[options.preset],
        "subset_size": len(inputs),
        "fast_bias_correction": options.fast_bias_correction,
    }
    patterns = [*(EDGE_LAYER_PATTERNS if options.ignore_edge_layers else ())]
    patterns += options.ignored_patterns
    if patterns:
        common["ignored_scope"] = nncf.IgnoredScope(patterns=patterns, validate=False)
    if not options.accuracy_control:
        return nncf.quantize(model, nncf.Dataset(inputs), **common)
    items = nncf.Dataset(_accuracy_items(model, inputs), _item_input)
    return nncf.quantize_with_accuracy_control(
        model,
        items,
        items,
        validation_fn=_agreement,
        max_drop=options.max_agreement_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        **common,
    )
