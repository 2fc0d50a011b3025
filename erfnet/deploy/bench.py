"""The deployment paths scripts/benchmark.py's ``deploy`` section times side by side.

``deploy_paths`` builds every way this project can run an ERFNet on the CPU at one input size:
the plain eager model, the exact fast path, torch.compile of it, the AOTInductor package
(scripts/export.py --format pt2), torch bf16 autocast, onnxruntime fp32 and int8, OpenVINO with
an f32 hint, with its default hint (bf16 on a CPU with AMX), with a bf16 hint (on a CPU with
native bf16) and int8 (NNCF). Each is a callable on a normalised float batch that returns
logits, built with the same functions scripts/export.py uses; paths whose optional package is
absent are listed in ``skipped`` with the reason. ``reduced`` names the paths that are not exact
(the export gate's thresholds for reduced precision apply to them, fp32's to the others).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config
from torch import nn

from erfnet.deploy.exported import ExportError, onnx_session, openvino_compiled, require
from erfnet.deploy.onnx import INPUT_NAME, export_onnx
from erfnet.fuse import optimize_for_inference

PLAIN = "plain eager fp32"


@dataclass
class DeployPaths:
    """name -> (callable on a normalised [N, 3, H, W] float tensor -> logits, note)."""

    paths: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = field(
        default_factory=dict
    )
    skipped: dict[str, str] = field(default_factory=dict)
    reduced: set[str] = field(default_factory=set)  # bf16 / int8: not exact


def _autocast_bf16(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(x).float()


def _frozen_compiled(compiled: Callable, x: torch.Tensor) -> torch.Tensor:
    # inductor's freezing (weights as constants, oneDNN prepacking) applies when it compiles,
    # i.e. on the first call under this setting.
    with inductor_config.patch(freezing=True):
        return compiled(x)


def _run_onnx(session: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])


def _run_openvino(compiled: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(compiled(x.numpy())[0]))


def pt2_path(
    model: nn.Module, size: tuple[int, int], threads: int, workdir: Path, paths: DeployPaths
) -> None:
    """The AOTInductor package scripts/export.py --format pt2 writes (portable target, fixed
    size), loaded as eval.py --model loads it."""
    from erfnet.deploy.aoti import check_compiler, export_pt2
    from erfnet.deploy.exported import load_exported

    try:
        check_compiler()
    except ExportError as e:
        paths.skipped["AOTInductor .pt2"] = str(e)
        return
    path = export_pt2(model, workdir / "erfnet.pt2", model.meta, size)
    paths.paths["AOTInductor .pt2"] = (
        load_exported(path, threads),
        "scripts/export.py --format pt2 (x86-64-v3, frozen); compiled at export",
    )


def torch_paths(model: nn.Module, paths: DeployPaths, compile_fast: bool = True) -> None:
    """Plain eager, the exact fast path, torch.compile (inductor, freezing) of it, bf16."""
    fast = optimize_for_inference(model)
    paths.paths[PLAIN] = (model, "what mmseg / erfnet_pytorch run")
    paths.paths["ours fast=True"] = (fast, "load_model(fast=True): BN folded, channels_last")
    if compile_fast:
        compiled = torch.compile(optimize_for_inference(model))
        paths.paths["torch.compile(fast)"] = (
            functools.partial(_frozen_compiled, compiled),
            "inductor, freezing; compiles per input shape",
        )
    else:
        paths.skipped["torch.compile(fast)"] = "--compile off"
    paths.paths["torch bf16 autocast(fast)"] = (
        functools.partial(_autocast_bf16, fast),
        "approximate",
    )
    paths.reduced.add("torch bf16 autocast(fast)")


def _skipped(paths: DeployPaths, backend: str, *modules: str) -> bool:
    """True (and the reason noted) when an optional package that ``backend`` needs is absent."""
    try:
        for module in modules:
            require(module)
    except ExportError as e:
        paths.skipped[backend] = str(e)
        return True
    return False


def onnxruntime_paths(
    model: nn.Module,
    size: tuple[int, int],
    calib: Sequence[np.ndarray],
    threads: int,
    workdir: Path,
    paths: DeployPaths,
) -> None:
    """onnxruntime fp32 and static int8 (QDQ, MinMax over ``calib``) of the fixed-size graph."""
    if _skipped(paths, "onnxruntime", "onnx", "onnxruntime"):
        return
    from erfnet.deploy.int8 import quantize_int8

    fp32 = export_onnx(model, workdir / "fp32.onnx", *size, dynamic=False)
    int8 = quantize_int8(fp32, workdir / "int8.onnx", calib)
    for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        session = onnx_session(path, threads)
        paths.paths[name] = (functools.partial(_run_onnx, session), "CPUExecutionProvider")
    paths.reduced.add("onnxruntime int8")


def openvino_paths(
    model: nn.Module,
    size: tuple[int, int],
    calib: Sequence[np.ndarray],
    threads: int,
    workdir: Path,
    paths: DeployPaths,
    nncf_options: Any = None,
) -> None:
    """OpenVINO with an f32 hint, with its default hint, and NNCF int8 (as scripts/export.py
    deploys it: the hint it records)."""
    if _skipped(paths, "openvino", "onnx", "openvino"):
        return
    from erfnet.deploy import openvino_ir
    from erfnet.deploy.build import OPENVINO_HINT

    fp32_onnx = workdir / "ov_fp32.onnx"
    if not fp32_onnx.exists():
        export_onnx(model, fp32_onnx, *size, dynamic=False)
    ir = openvino_ir.convert_onnx(fp32_onnx)
    default = openvino_compiled(ir, threads)
    hint = default.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    paths.paths["OpenVINO f32 hint"] = (
        functools.partial(_run_openvino, openvino_compiled(ir, threads, "f32")),
        "exact path",
    )
    paths.paths["OpenVINO default hint"] = (
        functools.partial(_run_openvino, default),
        f"runs {hint}",
    )
    if "16" in hint:
        paths.reduced.add("OpenVINO default hint")
    elif openvino_ir.cpu_supports_bf16():  # the bf16 export, which the default hint is not here
        paths.paths["OpenVINO bf16 hint"] = (
            functools.partial(_run_openvino, openvino_compiled(ir, threads, "bf16")),
            "the --precision bf16 export",
        )
        paths.reduced.add("OpenVINO bf16 hint")
    try:
        require("nncf")
    except ExportError as e:
        paths.skipped["OpenVINO int8"] = str(e)
        return
    options = nncf_options or openvino_ir.NNCFOptions()
    with contextlib.redirect_stdout(None):  # NNCF's progress bars
        int8 = openvino_ir.quantize_int8(ir, calib, options)
    compiled = openvino_compiled(int8, threads, OPENVINO_HINT["int8"])
    paths.paths["OpenVINO int8"] = (
        functools.partial(_run_openvino, compiled),
        f"NNCF {options.preset}, hint {OPENVINO_HINT['int8']}",
    )
    paths.reduced.add("OpenVINO int8")


def deploy_paths(
    model: nn.Module,
    size: tuple[int, int],
    calib: Sequence[np.ndarray],
    threads: int,
    workdir: Path,
    compile_fast: bool = True,
    nncf_options: Any = None,
) -> DeployPaths:
    """Every path, ``model`` (eval mode, CPU) first; ``calib``: int8 calibration inputs."""
    paths = DeployPaths()
    torch_paths(model, paths, compile_fast)
    if compile_fast:
        pt2_path(model, size, threads, workdir, paths)
    else:
        paths.skipped["AOTInductor .pt2"] = "--compile off"
    onnxruntime_paths(model, size, calib, threads, workdir, paths)
    openvino_paths(model, size, calib, threads, workdir, paths, nncf_options)
    return paths
