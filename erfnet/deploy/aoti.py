"""AOTInductor packages (.pt2) of an ERFNet: compiled ahead of time, weights frozen, CPU checked.

``export_pt2`` compiles ``optimize_for_inference(model)`` (BN folded, channels_last weights, the
FCN head in row strips at a fixed size) with
``torch._inductor.aoti_compile_and_package``: export and compile run under ``torch.no_grad()``,
the only way inductor's freezing applies (weights become constants, the convolutions are
prepacked for oneDNN with their ReLUs and residual adds fused in; without it the package is no
faster than the eager fast path). The checkpoint's meta and the package's CPU target sit in the
package metadata (``aot_inductor.metadata``: string keys and values), readable from the zip
without loading the compiled library.

A .pt2 holds a compiled shared library: loading one runs native code from the file. It is an
executable, never data; load only packages you made.

CPU target. By default the C++ is built for ``x86-64-v3`` (AVX2, FMA, BMI2, F16C, ...) and the
generated kernels are vectorised with 256-bit AVX2, whatever the build CPU: a package built on an
AVX-512 machine then runs on any x86-64 CPU of the last ten years. ``target="native"`` builds for
the build CPU (``-march=native``, AVX-512 where it has it). The flags the package needs are
recorded (``CPU_FLAGS_KEY``), and ``check_host`` refuses, in one line, a package whose flags
this CPU lacks: PyTorch's own loader only warns, and the process then dies with SIGILL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erfnet.deploy.exported import META_KEY, OUTPUT_KEY, PRECISION_KEY, ExportError
from erfnet.fuse import optimize_for_inference

TARGETS = ("portable", "native")
PORTABLE_MARCH = "x86-64-v3"
# gcc's x86-64-v3 level as /proc/cpuinfo flags (LZCNT shows up as "abm"), v2's included.
MARCH_FLAGS = {
    "x86-64-v3": (
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "f16c",
        "fma",
        "abm",
        "movbe",
        "xsave",
        "cx16",
        "lahf_lm",
        "popcnt",
        "sse4_1",
        "sse4_2",
        "ssse3",
    )
}
# For a native build: the build CPU's instruction-set flags (what -march=native may use).
ISA_FLAG_PREFIXES = (
    "sse",
    "ssse3",
    "avx",
    "amx",
    "fma",
    "f16c",
    "bmi",
    "abm",
    "movbe",
    "popcnt",
    "aes",
    "vaes",
    "pclmulqdq",
    "vpclmulqdq",
    "gfni",
    "sha_ni",
    "adx",
    "xsave",
    "cx16",
)
MARCH_KEY = "erfnet_cpu_march"  # "x86-64-v3" or "native"
CPU_FLAGS_KEY = "erfnet_cpu_flags"  # the /proc/cpuinfo flags the package needs, space-separated
SIZE_KEY = "erfnet_input_size"  # "HxW" (fixed) or "dynamic"
SUFFIX = ".pt2"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def target_flags(target: str) -> tuple[str | None, list[str]]:
    """(-march value or None for native, the CPU flags a package built for ``target`` needs)."""
    if target == "portable":
        return PORTABLE_MARCH, sorted(MARCH_FLAGS[PORTABLE_MARCH])
    if target == "native":
        return None, sorted(f for f in cpu_flags() if f.startswith(ISA_FLAG_PREFIXES))
    raise ExportError(f"unknown CPU target {target!r}; expected one of {', '.join(TARGETS)}")


class WithArgmax(nn.Module):
    """``model`` followed by an argmax over the classes: int64 labels [N, H, W]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)


# A dynamic package takes H and W in multiples of 8 (ERFNet's three downsamplers; other sizes
# would need the odd-size resizes that model.py makes only when they are needed).
SIZE_MULTIPLE = 8


def _dynamic_shapes(size: tuple[int, int] | None) -> Any:
    if size is not None:
        return None
    dim = torch.export.Dim
    rows, cols = dim("rows8", min=2, max=1024), dim("cols8", min=2, max=1024)
    return ({2: SIZE_MULTIPLE * rows, 3: SIZE_MULTIPLE * cols},)


def export_pt2(
    model: nn.Module,
    out: str | Path,
    meta: dict[str, Any],
    size: tuple[int, int] | None,
    *,
    argmax: bool = False,
    target: str = "portable",
) -> Path:
    """Compile ``model`` (an eval-mode ERFNet) into the AOTInductor package ``out``.

    The package takes a normalised float32 [1, 3, H, W] image (H and W fixed to ``size``, or
    free when it is None; batches run one image at a time) and returns logits [1, C, H, W], or
    with ``argmax`` int64 labels [1, H, W].
    """
    march, flags = target_flags(target)
    net = optimize_for_inference(model.cpu().float())
    if size is None:  # strips unroll over a known height: a dynamic package runs the head whole
        net.head.rows = 0
    if argmax:
        net = WithArgmax(net)
    h, w = size or (512, 1024)  # a dynamic export only traces at this size
    metadata = {
        META_KEY: json.dumps(meta),
        OUTPUT_KEY: "labels" if argmax else "logits",
        PRECISION_KEY: "fp32",
        MARCH_KEY: march or "native",
        CPU_FLAGS_KEY: " ".join(flags),
        SIZE_KEY: f"{h}x{w}" if size else "dynamic",
    }
    configs: dict[str, Any] = {
        "freezing": True,
        "aot_inductor.metadata": metadata,
        # 256-bit kernels for the portable target (the ISA recorded as AOTI_CPU_ISA "AVX2").
        "cpp.simdlen": 256 if march else None,
    }
    if march:
        configs["cpp.march"] = march
    # Freezing applies only without autograd (the weights must be constants, not parameters).
    with torch.no_grad(), _quiet_warnings():
        program = torch.export.export(
            net.eval(), (torch.randn(1, 3, h, w),), dynamic_shapes=_dynamic_shapes(size)
        )
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(out), inductor_configs=configs
        )
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The package's metadata (ours and AOTInductor's ``AOTI_*`` keys), read from the zip
    without loading its library; ExportError when the file is not an AOTInductor package."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("_metadata.json")]
            names = [n for n in names if "/data/aotinductor/" in f"/{n}"]
            if not names:
                raise ExportError(f"{path}: not an AOTInductor package (no model metadata)")
            return json.loads(archive.read(sorted(names)[0]))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError):
        raise ExportError(f"{path}: not an AOTInductor package (.pt2 zip)") from None


def check_host(path: str | Path, metadata: dict[str, str]) -> None:
    """ExportError (one line) unless this machine can run the package's compiled code."""
    built = (metadata.get("AOTI_PLATFORM", ""), metadata.get("AOTI_MACHINE", ""))
    here = (sys.platform, platform.machine())
    if built != here:
        raise ExportError(
            f"{path}: compiled for {built[0]}/{built[1]}, this is {here[0]}/{here[1]}; export"
            " it again on this machine (scripts/export.py --format pt2)"
        )
    needed = metadata.get(CPU_FLAGS_KEY, "").split()
    have = cpu_flags()
    missing = [f for f in needed if f not in have]
    if not have and needed:
        missing = ["(cannot read /proc/cpuinfo to check)"]
    if missing:
        march = metadata.get(MARCH_KEY, "?")
        raise ExportError(
            f"{path}: compiled for {march} CPUs ({metadata.get('AOTI_CPU_ISA', '?')} kernels);"
            f" this CPU lacks {', '.join(missing[:6])}: running it would crash (illegal"
            " instruction); export it again on this machine, or use an .onnx / .xml export"
        )


# Warnings that say nothing a user can act on: PyTorch's loader warns when the package's
# AOTI_CPU_ISA differs from the host's best ISA, also for a portable AVX2 package on an AVX-512
# CPU (check_host makes the real check), and of an "outdated pt2 file" when its first loader
# fails on a machine without a C++ compiler (its fallback then loads the package); the C++ build
# warns of a missing CUDA runtime.
QUIET_LOGGERS = (
    "torch.export.pt2_archive._package",
    "torch._inductor.package.package",
    "torch.utils.cpp_extension",
)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_pt2(path: str | Path) -> tuple[Any, dict[str, str]]:
    """(the loaded package, a callable on a [1, 3, H, W] tensor; its metadata), after
    ``check_host``."""
    metadata = read_metadata(path)
    check_host(path, metadata)
    with _quiet_warnings():
        runner = torch._inductor.aoti_load_package(str(path))
    return runner, metadata


def fixed_size(metadata: dict[str, str]) -> tuple[int, int] | None:
    """The package's fixed (H, W) input size, None when H and W are dynamic."""
    text = metadata.get(SIZE_KEY, "dynamic")
    if text == "dynamic":
        return None
    h, w = text.split("x")
    return int(h), int(w)


def run_pt2(runner: Any, x: torch.Tensor, dynamic: bool) -> torch.Tensor:
    """The package on a batch, one image at a time (it was exported for batch 1); a dynamic
    package's H and W must be multiples of ``SIZE_MULTIPLE`` (the caller checks a fixed one's)."""
    if dynamic and (x.shape[-2] % SIZE_MULTIPLE or x.shape[-1] % SIZE_MULTIPLE):
        raise ExportError(
            f"a dynamic .pt2 takes H and W in multiples of {SIZE_MULTIPLE}, got"
            f" {x.shape[-2]}x{x.shape[-1]} (export with --size H W for other sizes)"
        )
    with torch.no_grad():
        outs = [runner(image[None].contiguous()) for image in x.float()]
    return torch.cat(outs)


def check_compiler() -> None:
    """ExportError unless the C++ compiler AOTInductor builds with (``$CXX``, else g++) exists."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise ExportError(
            f"a .pt2 export compiles C++: no compiler '{compiler}' found (install g++, or set"
            " CXX); or export .onnx / .xml instead"
        )
