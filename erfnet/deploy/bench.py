"""The deployment paths scripts/benchmark.py's ``deploy`` section times side by side.

``deploy_paths`` builds every way this project can run an ERFNet on the CPU at one input size:
the plain eager model, the exact fast path, torch.compile of it, the AOTInductor package
(scripts/export.py --format pt2), torch bf16 autocast, onnxruntime fp32 and int8, OpenVINO with
an f32 hint, with its default hint (bf16 on a CPU with AMX), with a bf16 hint (on a CPU with
native bf16) and int8 (NNCF). Each is a callable on a normalised float batch that returns
logits, built with the same functions scripts/export.py uses; paths whose optional package is
absent are listed in ``skipped`` with the reason. ``reduced`` names the paths that are not exact
(the export gate's thresholds for reduced precision apply to them, fp32's to the others).
``score_paths`` gives each path's gate figures and verdict, ``plot_paths`` speed against agreement.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config
from torch import nn

from erfnet.deploy import gate
from erfnet.deploy.exported import ExportError, onnx_session, openvino_compiled, require
from erfnet.deploy.onnx import INPUT_NAME, export_onnx
from erfnet.fuse import optimize_for_inference
from erfnet.outputs import atomic_write

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


def _skipped(paths: DeployPaths, name: str, *modules: str) -> bool:
    """True (and the reason noted) when an optional package that path ``name`` needs is absent."""
    try:
        for module in modules:
            require(module)
    except ExportError as e:
        paths.skipped[name] = str(e)
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
    qat_iters: int = 0,
) -> None:
    """OpenVINO with an f32 hint, with its default hint, and NNCF int8 (as scripts/export.py
    deploys it: the hint it records); with ``qat_iters`` also the int8 of quantization-aware
    fine-tuning (``--int8-method qat``)."""
    if _skipped(paths, "openvino", "onnx", "openvino"):
        return
    from erfnet.deploy import openvino_ir
    from erfnet.deploy.build import OPENVINO_HINT

    fp32 = export_onnx(model, workdir / "ov_fp32.onnx", *size, dynamic=False)
    ir = openvino_ir.convert_onnx(fp32)

    def add(name: str, compiled: Any, note: str, reduced: bool = True) -> None:
        paths.paths[name] = (functools.partial(_run_openvino, compiled), note)
        if reduced:
            paths.reduced.add(name)

    default = openvino_compiled(ir, threads)
    hint = default.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    add("OpenVINO f32 hint", openvino_compiled(ir, threads, "f32"), "exact path", False)
    add("OpenVINO default hint", default, f"runs {hint}", "16" in hint)
    if "16" not in hint and openvino_ir.cpu_supports_bf16():
        # the bf16 export, which the default hint is not here
        bf16 = openvino_compiled(ir, threads, "bf16")
        add("OpenVINO bf16 hint", bf16, "the --precision bf16 export")
    if _skipped(paths, "OpenVINO int8", "nncf"):
        return
    options = openvino_ir.NNCFOptions()
    with contextlib.redirect_stdout(None):  # NNCF's progress bars
        int8 = openvino_ir.quantize_int8(ir, calib, options)
    int8 = openvino_compiled(int8, threads, OPENVINO_HINT["int8"])
    add("OpenVINO int8", int8, f"NNCF {options.preset}, hint {OPENVINO_HINT['int8']}")
    if qat_iters:
        from erfnet.deploy.qat import QATOptions, qat_int8

        # Fine-tuning needs autograd, which the benchmark's inference mode turns off.
        with torch.inference_mode(False), torch.enable_grad():
            qat, _ = qat_int8(model, calib, size, QATOptions(iters=qat_iters))
        qat = openvino_compiled(qat, threads, OPENVINO_HINT["int8"])
        add("OpenVINO int8 QAT", qat, f"{qat_iters} steps towards the fp32 logits")


def deploy_paths(
    model: nn.Module,
    size: tuple[int, int],
    calib: Sequence[np.ndarray],
    threads: int,
    workdir: Path,
    compile_fast: bool = True,
    qat_iters: int = 0,
) -> DeployPaths:
    """Every path, ``model`` (eval mode, CPU) first; ``calib``: int8 calibration inputs."""
    paths = DeployPaths()
    torch_paths(model, paths, compile_fast)
    if compile_fast:
        pt2_path(model, size, threads, workdir, paths)
    else:
        paths.skipped["AOTInductor .pt2"] = "--compile off"
    onnxruntime_paths(model, size, calib, threads, workdir, paths)
    openvino_paths(model, size, calib, threads, workdir, paths, qat_iters)
    return paths


def gate_verdict(figures: dict[str, Any], reduced: bool) -> str:
    """What scripts/export.py's gate would say of these figures: fp32 thresholds for an exact
    path, the reduced-precision defaults for a bf16 / int8 one."""
    if reduced:
        drop, agree = gate.DEFAULT_MAX_MIOU_DROP, gate.DEFAULT_MIN_AGREEMENT
    else:
        drop, agree = gate.FP32_MAX_MIOU_DROP, gate.FP32_MIN_AGREEMENT
    missed = ["agreement"] if figures["agreement"] < agree else []
    missed += [] if figures["miou_drop"] <= drop else ["mIoU drop"]  # NaN fails too
    verdict = "refused: " + " and ".join(missed) if missed else "passes"
    return f"{verdict} ({drop:g} / {agree:g} %)"


def score_paths(
    paths: DeployPaths, model: nn.Module, scored: gate.Picks, size: tuple[int, int]
) -> list[dict[str, Any]]:
    """Per path: the gate's figures against the plain eager ``model`` on the ``scored`` images
    (the export protocol: class maps at the label size), its verdict, its first call's time."""
    meta, rows = model.meta, []
    reference = list(gate.class_maps(model, scored, meta, size, False))
    classes = len(scored.dataset.classes), len(meta["class_names"])
    for name, (fn, note) in paths.paths.items():
        t = time.perf_counter()
        figures = gate.compare_maps(
            reference, gate.class_maps(fn, scored, meta, size, False), *classes
        )
        verdict = gate_verdict(figures, name in paths.reduced)
        rows.append(
            {
                "path": name,
                "agreement": figures["agreement"],
                "miou": figures["export_miou"],
                "miou_drop": figures["miou_drop"],
                "gate": verdict if name != PLAIN else "reference",
                "first_call_s": time.perf_counter() - t,  # the first call compiles, if any
                "note": note,
            }
        )
    return rows


def plot_paths(rows: list[dict[str, Any]], path: Path) -> str:
    """Speed against agreement, one point per path, as a PNG at ``path``; what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        passed = r["gate"].startswith(("passes", "reference"))
        xy = (r["speedup"], r["agreement"])
        ax.scatter(*xy, marker="o" if passed else "x", s=60)
        ax.annotate(r["path"], xy, fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("speed, x plain eager fp32 (median, one interleaved run)")
    ax.set_ylabel("argmax agreement with fp32, % of scored pixels")
    ax.set_title(
        f"ERFNet CPU deploy paths, {rows[0]['size']}, {rows[0]['threads']} threads"
        " (o: passes the gate, x: refused)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"), fsync=False)
    finally:
        plt.close(fig)
    return f"wrote {path}"
