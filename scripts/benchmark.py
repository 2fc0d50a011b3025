"""Benchmark ERFNet: parameters and FLOPs, inference latency, a training step, the data pipeline.

    python scripts/benchmark.py                       # everything, CPU, a few minutes
    python scripts/benchmark.py --sections infer --sizes 512x1024 --repeats 15
    python scripts/benchmark.py --device cuda --json bench_gpu.json
    python scripts/benchmark.py --quick --json /tmp/b.json   # tiny smoke run (tests)

Every comparison is measured side by side in one process: the variants run interleaved, one
call each per round, and the median over rounds is reported, so a busy machine slows every
variant alike. FLOPs count a multiply-add as 2 (torch.utils.flop_counter); achieved GFLOP/s is
shown beside the machine's measured peak (a large matmul). Ratios are against the plain eager
fp32 NCHW model, which is what mmsegmentation and erfnet_pytorch run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erfnet.config import IGNORE_INDEX, NUM_CLASSES, RECIPE  # noqa: E402
from erfnet.deploy import fuse_bn, optimize_for_inference  # noqa: E402
from erfnet.model import ERFNet, count_parameters  # noqa: E402

SECTIONS = ("flops", "infer", "malloc", "train", "data")
Size = tuple[int, int]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> Size:
    """'512x1024' (HxW) -> (512, 1024)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW like 512x1024, got {text!r}") from None
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"size must be at least 8x8, got {text!r}")
    return h, w


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model: nn.Module, size: Size, batch: int = 1) -> int:
    """FLOPs of one forward pass (multiply-add = 2), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 3, *size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n x n x n matmul (best of ``repeats``): the practical peak.

    The best run, not the median: a peak is what the machine can do when nothing else runs.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding BN is really exercised by the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def peak_rss_reset() -> bool:
    """Reset the process's peak RSS (Linux /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, B on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def current_rss_mb() -> float | None:
    """Resident set size now, in MiB (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function, measured in rounds (one call of each per round).

    After ``warmup`` untimed rounds, runs ``repeats`` rounds, or fewer (at least 3) when
    ``budget_s`` would be exceeded.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
        spent = time.perf_counter() - start
        if budget_s is not None and r >= 2 and spent / (r + 1) * (r + 2) > budget_s:
            break
    return times


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table; text columns (first and 'note') left-aligned."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    left = [i == 0 or h in ("note", "transform") for i, h in enumerate(header)]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        cols = zip(r, widths, left, strict=True)
        print("  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in cols).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return "-" if v is None else str(v)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def section_flops(model: nn.Module, sizes: Sequence[Size]) -> dict[str, Any]:
    """Parameters and per-image FLOPs at each size."""
    backbone = sum(count_parameters(m) for m in (model.encoder, model.decoder))
    out: dict[str, Any] = {
        "params": count_parameters(model),
        "params_backbone": backbone,
        "flops": {},
    }
    rows = [["parameters (backbone + head)", f"{out['params']:,}", ""]]
    rows.append(["parameters (backbone)", f"{backbone:,}", ""])
    for size in sizes:
        flops = count_flops(model, size)
        out["flops"][f"{size[0]}x{size[1]}"] = flops
        rows.append([f"FLOPs at {size[0]}x{size[1]}", f"{flops / 1e9:.2f} G", f"{flops / 2e9:.2f}"])
    print_table("Model size (FLOPs: multiply-add = 2)", ["", "value", "GMAC"], rows)
    return out


def _compile(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile; on CPU with inductor's freezing (weights as constants, oneDNN prepacking)."""
    compiled = torch.compile(model)
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        def call(x: torch.Tensor) -> torch.Tensor:
            with inductor_config.patch(freezing=True):
                return compiled(x)

        return call  # type: ignore[return-value]
    return compiled


_ORT_CACHE: dict[int, Any] = {}


def _onnxruntime_session(model: nn.Module) -> Any:
    """An onnxruntime session of the exported model (scripts/export_onnx.py), or None when
    onnx / onnxruntime are not installed. Exported once per model (dynamic H and W)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        return None
    if id(model) not in _ORT_CACHE:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_erfnet_export_onnx", Path(__file__).resolve().parent / "export_onnx.py"
        )
        export_onnx = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(export_onnx)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(None):
            path = export_onnx.export(model, Path(tmp) / "erfnet.onnx", 64, 128)
            _ORT_CACHE[id(model)] = ort.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
    return _ORT_CACHE[id(model)]


def _cuda_graph(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable:
    """Capture ``fn(x)`` into a CUDA graph; the returned callable replays it on ``x``'s buffer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def build_infer_variants(
    model: nn.Module, device: torch.device, x: torch.Tensor, compile_now: bool, approx: bool
) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]]:
    """name -> (callable on the NCHW fp32 batch ``x``, note). The first is the baseline.

    The CUDA-graph variant replays a graph captured on ``x`` itself (its output is static too).
    """
    plain = copy.deepcopy(model).eval()
    cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    fused = fuse_bn(model)
    fast = optimize_for_inference(model)
    v: dict[str, tuple[Callable, str]] = {
        "eager fp32 NCHW": (plain, "baseline (mmseg / erfnet_pytorch)"),
        "channels_last": (lambda x: cl(x.contiguous(memory_format=torch.channels_last)), ""),
        "fused BN": (fused, "fuse_bn, NCHW"),
        "fast": (fast, "optimize_for_inference (load_model fast=True)"),
    }
    if compile_now:
        compiled = _compile(optimize_for_inference(model), device)
        v["torch.compile(fast)"] = (
            compiled,
            "inductor" + (", freezing" if device.type == "cpu" else ""),
        )
    if device.type == "cuda":
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):

            def run(x: torch.Tensor, dt: torch.dtype = dt) -> torch.Tensor:
                with torch.autocast("cuda", dtype=dt):
                    return fast(x)

            v[f"fast + {name} autocast"] = (run, "approximate")
        with torch.inference_mode():
            graph = _cuda_graph(v["fast + fp16 autocast"][0], x)
        v["fast + fp16 + CUDA graph"] = (lambda _x: graph(), "approximate; graph replay")
    else:
        session = _onnxruntime_session(model)
        if session is not None:

            def run_ort(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])

            v["onnxruntime"] = (run_ort, "export_onnx.py graph, CPUExecutionProvider")
    if device.type == "cpu" and approx:

        def run_bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fast(x)

        v["fast + bf16 autocast"] = (run_bf16, "approximate (AVX512-BF16 / AMX)")
    return v


def section_infer(
    model: nn.Module,
    device: torch.device,
    configs: Sequence[tuple[Size, int]],
    repeats: int,
    warmup: int,
    budget_s: float,
    compile_mode: str,
    approx: bool,
    peak: dict[str, float],
) -> list[dict[str, Any]]:
    """Latency / throughput of every variant at every (size, batch), side by side."""
    rows: list[dict[str, Any]] = []
    first = True
    flops_per_image = {s: count_flops(model, s) for s in {c[0] for c in configs}}
    # fp32 convolutions run in TF32 on CUDA by default (torch.backends.cudnn.allow_tf32).
    fp32_key = "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"

    def peak_of(variant: str) -> tuple[str, float]:
        key = next((k for k in ("fp16", "bf16") if k in variant), fp32_key)
        return key, peak.get(key, float("nan"))

    for size, batch in configs:
        compile_now = compile_mode == "all" or (compile_mode == "first" and first)
        first = False
        torch.manual_seed(0)
        x = torch.randn(batch, 3, *size, device=device)
        variants = build_infer_variants(model, device, x, compile_now, approx)
        compile_s = None
        with torch.inference_mode():
            ref = variants["eager fp32 NCHW"][0](x).float()
            outs = {}
            for name, (fn, _) in variants.items():
                t = time.perf_counter()
                outs[name] = fn(x).float()
                sync(device)
                if name.startswith("torch.compile"):
                    compile_s = time.perf_counter() - t
            fns = {name: (lambda fn=fn, x=x: fn(x)) for name, (fn, _) in variants.items()}
            times = interleaved(fns, device, repeats, warmup, budget_s)
        base = statistics.median(times["eager fp32 NCHW"])
        flops = flops_per_image[size] * batch
        for name, (_, note) in variants.items():
            med = statistics.median(times[name])
            out = outs[name]
            row = {
                "size": f"{size[0]}x{size[1]}",
                "batch": batch,
                "variant": name,
                "median_ms": med * 1e3,
                "min_ms": min(times[name]) * 1e3,
                "runs": len(times[name]),
                "images_per_s": batch / med,
                "gflops_per_s": flops / med / 1e9,
                "peak_dtype": peak_of(name)[0],
                "fraction_of_peak": flops / med / 1e9 / peak_of(name)[1],
                "speedup": base / med,
                "max_abs_diff": float((out - ref).abs().max()),
                "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
                "note": note,
            }
            if name.startswith("torch.compile"):
                row["compile_s"] = compile_s
            rows.append(row)
        del variants, outs, fns
        table = [
            [
                r["variant"],
                r["median_ms"],
                r["images_per_s"],
                r["gflops_per_s"],
                f"{100 * r['fraction_of_peak']:.0f}% {r['peak_dtype']}",
                f"{r['speedup']:.2f}x",
                f"{r['max_abs_diff']:.1e}",
                f"{100 * r['argmax_agreement']:.3f}",
                r["note"],
            ]
            for r in rows
            if r["size"] == f"{size[0]}x{size[1]}" and r["batch"] == batch
        ]
        print_table(
            f"Inference {size[0]}x{size[1]}, batch {batch}, {device.type} "
            f"(median of {len(times['eager fp32 NCHW'])} interleaved runs; "
            f"{fp32_key} peak {peak.get(fp32_key, float('nan')):.0f} GFLOP/s)",
            ["variant", "ms", "img/s", "GFLOP/s", "of peak", "speedup", "max|diff|", "argmax%",
             "note"],
            table,
        )  # fmt: skip
    return rows


def child_malloc(mode: str, size: Size, repeats: int) -> None:
    """One process of the malloc section: eager vs fast, interleaved, with glibc's default
    allocator or ``erfnet.deploy.tune_cpu_allocator()``; prints one ``CHILD {json}`` line."""
    from erfnet.deploy import tune_cpu_allocator

    applied = tune_cpu_allocator() if mode == "tuned" else False
    torch.manual_seed(0)
    model = randomise_bn(ERFNet()).eval()
    fast = optimize_for_inference(model)
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        times = interleaved({"eager": lambda: model(x), "fast": lambda: fast(x)},
                            torch.device("cpu"), repeats, warmup=1)  # fmt: skip
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print("CHILD " + json.dumps({"mode": mode, "applied": applied, "times": times,
                                 "minor_faults": faults}))  # fmt: skip


def section_malloc(size: Size, rounds: int, repeats: int, threads: int | None) -> list[dict]:
    """The allocator is process-wide, so this comparison runs in separate processes, default
    and tuned alternated ``rounds`` times; each process times eager and fast interleaved."""
    import subprocess

    times: dict[tuple[str, str], list[float]] = {}
    applied = True
    for _ in range(rounds):
        for mode in ("default", "tuned"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child-malloc", mode,
                   "--sizes", f"{size[0]}x{size[1]}", "--repeats", str(repeats)]  # fmt: skip
            if threads:
                cmd += ["--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"error: malloc child failed:\n{proc.stderr[-2000:]}")
            res = json.loads(lines[-1][len("CHILD ") :])
            applied = applied and (res["applied"] or mode == "default")
            for variant, ts in res["times"].items():
                times.setdefault((variant, mode), []).extend(ts)
    base = statistics.median(times[("eager", "default")])
    rows = []
    for (variant, mode), ts in times.items():
        med = statistics.median(ts)
        rows.append({"size": f"{size[0]}x{size[1]}", "batch": 1, "variant": variant,
                     "allocator": mode, "median_ms": med * 1e3, "runs": len(ts),
                     "speedup": base / med, "tuned_applied": applied})  # fmt: skip
    print_table(
        f"Allocator (process-wide): {size[0]}x{size[1]}, batch 1, {rounds} processes each, "
        f"alternated (median of {len(times[('eager', 'default')])} runs)"
        + ("" if applied else " [tuning unavailable here: not glibc]"),
        ["variant", "allocator", "ms", "speedup"],
        [[r["variant"], r["allocator"], r["median_ms"], f"{r['speedup']:.2f}x"] for r in rows],
    )
    return rows


def _train_setup(
    model: nn.Module, device: torch.device, channels_last: bool
) -> tuple[nn.Module, torch.optim.Optimizer]:
    m = copy.deepcopy(model).to(device).train()
    if channels_last:
        m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        m.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum, weight_decay=RECIPE.weight_decay
    )
    return m, opt


def section_train(
    device: torch.device, size: Size, batch: int, repeats: int, warmup: int, budget_s: float
) -> list[dict[str, Any]]:
    """One SGD iteration (forward, loss, backward, step): plain eager vs our training path."""
    torch.manual_seed(0)
    model = ERFNet()
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch, *size), device=device)
    y[:, :4] = IGNORE_INDEX  # a few ignored pixels, as in real labels

    def plain_step(m: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], float]:
        # What mmseg runs: NCHW fp32, CE with ignore_index, SGD with momentum and weight decay.
        def step() -> float:
            loss = F.cross_entropy(m(x), y, ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())

        return step

    def ours_step(
        m: nn.Module, opt: torch.optim.Optimizer, amp: torch.dtype | None = None
    ) -> Callable[[], float]:
        from erfnet.engine import train_step

        xcl = x.contiguous(memory_format=torch.channels_last)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        return lambda: train_step(m, xcl, y, opt, scaler, autocast_dtype=amp)

    variants: dict[str, tuple[Callable[[], float], str]] = {}
    variants["eager fp32 NCHW"] = (plain_step(*_train_setup(model, device, False)), "as mmseg")
    variants["channels_last"] = (
        ours_step(*_train_setup(model, device, True)),
        "erfnet.engine.train_step, same maths",
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the recipe and erfnet.engine do
        variants["channels_last + fp16 AMP"] = (
            ours_step(*_train_setup(model, device, True), amp=torch.float16),
            "approximate (not the recipe's fp32)",
        )
    fns = {k: v[0] for k, v in variants.items()}
    # Peak memory of one iteration per variant, measured before the timing runs.
    memory: dict[str, float] = {}
    before: dict[str, float] = {}
    rss_resettable = True
    for name, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            memory[name] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            rss_resettable = peak_rss_reset() and rss_resettable
            before[name] = current_rss_mb()
            fn()
            memory[name] = peak_rss_mb()
    times = interleaved(fns, device, repeats, warmup=max(0, warmup - 1), budget_s=budget_s)
    base = statistics.median(times["eager fp32 NCHW"])
    rows = []
    for name, (_, note) in variants.items():
        med = statistics.median(times[name])
        rows.append(
            {
                "size": f"{size[0]}x{size[1]}",
                "batch": batch,
                "variant": name,
                "median_s": med,
                "min_s": min(times[name]),
                "runs": len(times[name]),
                "images_per_s": batch / med,
                "speedup": base / med,
                "peak_memory_mb": memory[name],
                "memory_before_mb": before.get(name),
                "memory_kind": "cuda max_memory_allocated"
                if device.type == "cuda"
                else ("peak RSS" if rss_resettable else "process peak RSS (not resettable)"),
                "note": note,
            }
        )
    mem_col = "max alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    print_table(
        f"Training iteration (fwd + bwd + SGD), {size[0]}x{size[1]}, batch {batch}, "
        f"{device.type} (median of {len(times['eager fp32 NCHW'])} interleaved runs)",
        ["variant", "s/iter", "img/s", "speedup", mem_col, "(RSS before)", "note"],
        [
            [r["variant"], r["median_s"], r["images_per_s"], f"{r['speedup']:.2f}x",
             r["peak_memory_mb"], r["memory_before_mb"], r["note"]]
            for r in rows
        ],
    )  # fmt: skip
    return rows


def section_data(
    root: Path | None, size: Size, images: int, repeats: int, quick: bool
) -> list[dict[str, Any]]:
    """Images/s of one loader worker (decode + transform) for the train and val pipelines."""
    from erfnet.data.cityscapes import CityscapesDataset, time_pipeline
    from erfnet.data.synthetic import make_synthetic_cityscapes
    from erfnet.data.transforms import EvalTransform, TrainTransform

    with contextlib.ExitStack() as stack:
        if root is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="erfnet_bench_")))
            t = time.perf_counter()
            root = make_synthetic_cityscapes(
                tmp / "cityscapes", train=images, val=images, test=0, size=(size[1], size[0]),
                seed=0, extras=False,
            )  # fmt: skip
            made = f"synthetic {images}+{images} images at {size[1]}x{size[0]} (WxH), written in " \
                f"{time.perf_counter() - t:.1f} s"  # fmt: skip
        else:
            made = str(root)
        if quick:
            train_tf = TrainTransform(crop_size=(size[0] // 2, size[1] // 2), scale=size)
            val_tf = EvalTransform(scale=size)
        else:
            train_tf, val_tf = TrainTransform(), EvalTransform()
        rows = []
        for split, tf in (("train", train_tf), ("val", val_tf)):
            ds = CityscapesDataset(root, split, transform=tf)
            torch.manual_seed(0)
            res = time_pipeline(ds, num=repeats, warmup=1, threads=1)
            rows.append({"split": split, "transform": repr(tf), "dataset": made, **res})
            rows[-1]["transform_name"] = type(tf).__name__
    print_table(
        f"Data pipeline, one worker (1 torch thread): {made}",
        ["split", "images/s", "load s", "transform s", "transform"],
        [[r["split"], r["images_per_s"], r["load_s"], r["transform_s"], r["transform_name"]]
         for r in rows],
    )  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sections", nargs="+", default=["all"], choices=[*SECTIONS, "all"],
        help="what to measure (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--sizes", nargs="+", type=parse_size, default=None,
        help="HxW input sizes for FLOPs and inference (default: 512x1024 1024x2048)",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=int, default=None,
        help="the 'batch N' of inference, besides batch 1 (default: 8 on CUDA at every size; 2 on "
        "CPU at the first size only)",
    )  # fmt: skip
    p.add_argument(
        "--train-batch", type=int, default=None, help="training batch (default: 2 CPU, 8 CUDA)"
    )
    p.add_argument(
        "--repeats", type=int, default=None,
        help="timed rounds per comparison (default: 7 CPU, 30 CUDA)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 / 5)")
    p.add_argument(
        "--budget", type=float, default=None,
        help="seconds per comparison after which fewer rounds are run (at least 3; default 25)",
    )  # fmt: skip
    p.add_argument(
        "--compile", choices=("off", "first", "all"), default=None,
        help="torch.compile at the first size/batch only, at all, or off "
        "(default: first on CPU, all on CUDA; it compiles once per input shape)",
    )  # fmt: skip
    p.add_argument(
        "--no-approx", action="store_true",
        help="skip the reduced-precision (bf16 / fp16) variants",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--checkpoint", default=None,
        help="our checkpoint to benchmark (default: random weights, random BN statistics)",
    )  # fmt: skip
    p.add_argument(
        "--data", default=None, metavar="ROOT",
        help="Cityscapes root for the data section (default: a synthetic 2048x1024 one in a temp "
        "dir)",
    )  # fmt: skip
    p.add_argument("--data-images", type=int, default=4, help="synthetic images per split")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few runs (smoke test)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write all results here")
    p.add_argument("--child-malloc", choices=("default", "tuned"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "train_batch", "repeats", "data_images", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name}: expected cpu or cuda")
    return device


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_malloc:
        child_malloc(args.child_malloc, (args.sizes or [(512, 1024)])[0], args.repeats or 3)
        return {}
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sections = set(SECTIONS) if "all" in args.sections else set(args.sections)
    if args.quick:
        sizes = args.sizes or [(64, 128)]
        batch, train_batch = args.batch or 2, args.train_batch or 2
        repeats, warmup = args.repeats or 3, 1 if args.warmup is None else args.warmup
        train_size, data_size, peak_n = sizes[0], (128, 256), 256
    else:
        sizes = args.sizes or [(512, 1024), (1024, 2048)]
        batch = args.batch or (8 if cuda else 2)
        train_batch = args.train_batch or (8 if cuda else 2)
        repeats = args.repeats or (30 if cuda else 7)
        warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
        train_size, data_size, peak_n = RECIPE.crop_size, (1024, 2048), 8192 if cuda else 4096
    budget = args.budget if args.budget is not None else (1e9 if args.quick else 25.0)
    compile_mode = args.compile or ("all" if cuda else "first")
    if args.quick and args.compile is None:
        compile_mode = "off"

    if args.checkpoint:
        from erfnet.checkpoint import CheckpointError, load_model

        try:
            model = load_model(args.checkpoint, device)
        except CheckpointError as e:
            raise SystemExit(f"error: --checkpoint: {e}") from None
        weights = str(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = randomise_bn(ERFNet()).to(device).eval()
        weights = "random (seed 0) with random BatchNorm statistics"

    if cuda:
        torch.backends.cudnn.benchmark = True  # as the recipe (and erfnet.engine) run
    results: dict[str, Any] = {"machine": machine_info(device), "weights": weights}
    results["args"] = {k: v for k, v in vars(args).items()}
    print(f"erfnet benchmark on {device}: {results['machine']['processor']}"
          + (f" / {results['machine']['gpu']}" if cuda else "")
          + f", torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    started = time.perf_counter()
    if "flops" in sections:
        results["model"] = section_flops(model, sizes)
    if "infer" in sections or "train" in sections:
        peak = {"fp32": matmul_peak(device, torch.float32, peak_n)}
        if cuda:
            with _tf32(False):
                peak["fp32"] = matmul_peak(device, torch.float32, peak_n)
            with _tf32(True):
                peak["tf32"] = matmul_peak(device, torch.float32, peak_n)
            peak["fp16"] = matmul_peak(device, torch.float16, peak_n)
            peak["bf16"] = matmul_peak(device, torch.bfloat16, peak_n)
        elif not args.no_approx:
            peak["bf16"] = matmul_peak(device, torch.bfloat16, peak_n)
        results["peak_gflops"] = peak
        print_table(
            f"Measured matmul peak ({peak_n}^3)",
            ["dtype", "GFLOP/s"],
            [[k, v] for k, v in peak.items()],
        )
    if "infer" in sections:
        # Batch N at every size, except on the CPU by default: only at the first size there.
        configs = [(s, b) for s in sizes for b in sorted({1, batch})]
        if not cuda and args.batch is None:
            configs = [(s, b) for s, b in configs if b == 1 or s == sizes[0]]
        results["infer"] = section_infer(
            model, device, configs, repeats, warmup, budget, compile_mode,
            not args.no_approx, results["peak_gflops"],
        )  # fmt: skip
    if "malloc" in sections and not cuda:
        results["malloc"] = section_malloc(
            sizes[0], 1 if args.quick else 2, 2 if args.quick else 4, args.threads
        )
    if "train" in sections:
        results["train"] = section_train(
            device, train_size, train_batch, max(3, repeats // 2), warmup, budget * 2
        )
    if "data" in sections:
        root = Path(args.data) if args.data else None
        if root is not None and not root.is_dir():
            raise SystemExit(f"error: --data {root}: not a directory")
        results["data"] = section_data(
            root, data_size, args.data_images, 3 if args.quick else 8, args.quick
        )
    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {out}")
    return results


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


if __name__ == "__main__":
    main()
