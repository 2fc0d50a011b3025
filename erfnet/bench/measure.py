"""What every benchmark section measures with: timers that wait for the device, interleaved
rounds, FLOPs, the machine's matmul peak and CPU features, and the fixed-width tables it prints."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ISA_FLAGS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AVX512-BF16": ("avx512_bf16",),
    "AMX-BF16": ("amx_bf16",),
    "AMX-INT8": ("amx_int8",),
}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer around it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``threads`` torch CPU threads inside (None: unchanged), the earlier count restored."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def interleaved(
    fns: dict[str, Callable],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    budget_s: float = float("inf"),
) -> dict[str, list[float]]:
    """Seconds per call of every function, in rounds of one call each, after ``warmup`` untimed
    rounds; fewer rounds (at least 3) when ``repeats`` would take longer than ``budget_s``."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
        if r >= 2 and (time.perf_counter() - start) / (r + 1) * (r + 2) > budget_s:
            break
    return times


def count_flops(model: nn.Module, size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of one forward pass (multiply-add = 2), counted by torch's FlopCounterMode."""
    x = torch.zeros(batch, 3, *size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


@functools.cache
def matmul_peak(device: torch.device, quick: bool, approx: bool) -> dict[str, float]:
    """GFLOP/s of an n^3 matmul per dtype, best of 5: the most the machine can do. On CUDA fp32
    convolutions run in TF32 (cudnn.allow_tf32), so both fp32 and tf32 are measured."""
    n = 256 if quick else 8192 if device.type == "cuda" else 4096
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda":
        dtypes |= {"tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    elif approx:
        dtypes["bf16"] = torch.bfloat16
    peak, tf32 = {}, torch.backends.cuda.matmul.allow_tf32
    for key, dtype in dtypes.items():
        torch.backends.cuda.matmul.allow_tf32 = key == "tf32"
        a = torch.randn(n, n, device=device).to(dtype)
        mm = functools.partial(torch.matmul, a, a)
        peak[key] = 2 * n**3 / min(interleaved({"mm": mm}, device, 5)["mm"]) / 1e9
    torch.backends.cuda.matmul.allow_tf32 = tf32
    show(f"Measured matmul peak ({n}^3)", [{"dtype": k, "GFLOP/s": v} for k, v in peak.items()])
    return peak


def cpuinfo(field: str) -> str:
    """The first ``field`` line's value in /proc/cpuinfo ("" where there is none: not Linux)."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(field)), "")


def cpu_isa() -> dict[str, bool]:
    """Which vector / matrix extensions the CPU has: what decides whether bf16 and int8 paths
    are fast on this machine."""
    flags = set(cpuinfo("flags").split())
    return {name: any(f in flags for f in options) for name, options in ISA_FLAGS.items()}


def format_isa(isa: dict[str, bool]) -> str:
    have = [k for k, v in isa.items() if v]
    return ", ".join(have) if have else "none of " + ", ".join(isa)


def show(title: str, rows: list[dict], columns: str = "") -> None:
    """Print ``rows`` as a fixed-width table. ``columns``: "header=value | ...", the value a row
    key (a float printed to about 3 figures) or a format string of the row such as
    "{speedup:.2f}x"; a bare key is its own header; default: every key of the first row."""
    specs = [c.partition("=") for c in (columns.split(" | ") if columns else rows[0])]
    specs = [(h, v or h) for h, _, v in specs]
    cells = [[h for h, _ in specs]]
    cells += [[v.format_map(r) if "{" in v else _fmt(r[v]) for _, v in specs] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(specs))]
    left = [j == 0 or h in ("note", "transform") for j, (h, _) in enumerate(specs)]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        line = (c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(r, widths, left, strict=True))
        print("  ".join(line).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v)
