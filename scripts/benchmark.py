"""Benchmark ERFNet: parameters and FLOPs, inference latency, a training step, the data pipeline.

    python scripts/benchmark.py                       # everything, CPU, a few minutes
    python scripts/benchmark.py --sections infer --sizes 512x1024 --repeats 15
    python scripts/benchmark.py --device cuda --json bench_gpu.json
    python scripts/benchmark.py --quick --json /tmp/b.json   # tiny smoke run (tests)

Every comparison is measured side by side in one process: the variants run interleaved, one
call each per round, and the median over rounds is reported, so a busy machine slows every
variant alike. FLOPs count a multiply-add as 2 (torch.utils.flop_counter); achieved GFLOP/s is
shown beside the machine's measured peak (a large matmul). Ratios are against the plain eager
fp32 NCHW model, which is what mmsegmentation and erfnet_pytorch run. A section is one function
``section_x(args, model) -> {json key: results}`` and its line in SECTIONS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from erfnet.bench import data_throughput as throughput
from erfnet.bench.video import benchmark_video, format_video_benchmark
from erfnet.config import IGNORE_INDEX, MEAN_RGB, NUM_CLASSES, RECIPE, STD_RGB
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.data.fast.cache import CachedCityscapesDataset, write_cache
from erfnet.data.synthetic import make_synthetic_cityscapes
from erfnet.data.transforms import EvalTransform, TrainTransform
from erfnet.deploy.exported import load_network
from erfnet.deploy.onnx import export_onnx
from erfnet.distributed import resolve_device
from erfnet.errors import FlagError, UserError, cli_main
from erfnet.fuse import fuse_bn, optimize_for_inference
from erfnet.labels import CLASS_NAMES
from erfnet.model import ERFNet, count_parameters
from erfnet.outputs import atomic_write, atomic_write_text, check_outputs, output_file
from erfnet.runtime import check_runtime_flags
from erfnet.training.step import train_step

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "eager fp32 NCHW"
# erfnet.fuse.tune_cpu_allocator()'s setting, as glibc's environment variables.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def parse_size(text: str) -> tuple[int, int]:
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


def count_flops(model: nn.Module, size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of one forward pass (multiply-add = 2), counted by torch's FlopCounterMode."""
    x = torch.zeros(batch, 3, *size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


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


def show(title: str, rows: list[dict], columns: dict[str, Callable | str] | None = None) -> None:
    """Print ``rows`` as a fixed-width table: header -> row key or function of the row."""
    columns = columns or {k: k for k in rows[0]}
    get = {h: (c if callable(c) else lambda r, c=c: r[c]) for h, c in columns.items()}
    cells = [list(columns)] + [[_fmt(get[h](r)) for h in columns] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    left = [j == 0 or h in ("note", "transform") for j, h in enumerate(columns)]
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


def section_flops(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """Parameters and per-image FLOPs at each size."""
    backbone = sum(count_parameters(m) for m in (model.encoder, model.decoder))
    out = {"params": count_parameters(model), "params_backbone": backbone, "flops": {}}
    rows = [
        {"": "parameters (backbone + head)", "value": f"{out['params']:,}", "GMAC": ""},
        {"": "parameters (backbone)", "value": f"{backbone:,}", "GMAC": ""},
    ]
    for h, w in args.sizes:
        flops = out["flops"][f"{h}x{w}"] = count_flops(model, (h, w))
        rows.append(
            {"": f"FLOPs at {h}x{w}", "value": f"{flops / 1e9:.2f} G", "GMAC": f"{flops / 2e9:.2f}"}
        )
    show("Model size (FLOPs: multiply-add = 2)", rows)
    return {"model": out}


def agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of pixels whose argmax class equals the reference's."""
    return float((out.argmax(1) == ref.argmax(1)).double().mean())


def autocast(fn: Callable, device: torch.device, dtype: torch.dtype) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return fn(x)

    return run


def cuda_graph(fn: Callable, x: torch.Tensor) -> Callable:
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

    def replay(_x: torch.Tensor) -> torch.Tensor:
        graph.replay()
        return out

    return replay


def onnxruntime_variant(model: nn.Module) -> Callable | None:
    """erfnet.fuse.export_onnx's graph run by onnxruntime; None without onnx/onnxruntime."""
    try:
        import onnxruntime  # optional extra, as is onnx
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(None):
        path = export_onnx(model, Path(tmp) / "erfnet.onnx", 64, 128)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


def infer_variants(
    args: argparse.Namespace, model: nn.Module, x: torch.Tensor, compile_now: bool
) -> dict[str, tuple[Callable, str]]:
    """name -> (callable on the NCHW fp32 batch ``x``, note). The first is the baseline."""
    device, cuda = args.device, args.device.type == "cuda"
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fast = optimize_for_inference(model)
    v = {
        BASELINE: (model, "baseline (mmseg / erfnet_pytorch)"),
        "channels_last": (lambda x: cl(x.contiguous(memory_format=torch.channels_last)), ""),
        "fused BN": (fuse_bn(model), "fuse_bn, NCHW"),
        "fast": (fast, "optimize_for_inference (load_model fast=True)"),
    }
    if compile_now:
        compiled = torch.compile(optimize_for_inference(model))
        if not cuda:  # inductor's freezing: weights as constants, oneDNN prepacking
            compiled = inductor_config.patch(freezing=True)(compiled)
        v["torch.compile(fast)"] = (compiled, "inductor" + ("" if cuda else ", freezing"))
    if cuda:
        v["fast + fp16 autocast"] = (autocast(fast, device, torch.float16), "approximate")
        v["fast + bf16 autocast"] = (autocast(fast, device, torch.bfloat16), "approximate")
        with torch.inference_mode():
            graph = cuda_graph(v["fast + fp16 autocast"][0], x)
        v["fast + fp16 + CUDA graph"] = (graph, "approximate; graph replay")
    elif (ort := onnxruntime_variant(model)) is not None:
        v["onnxruntime"] = (ort, "export_onnx graph, CPUExecutionProvider")
    if not cuda and args.approx:
        bf16 = autocast(fast, device, torch.bfloat16)
        v["fast + bf16 autocast"] = (bf16, "approximate (AVX512-BF16 / AMX)")
    return v


def section_infer(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """Latency / throughput and equivalence of every variant at every (size, batch)."""
    device, cuda, rows = args.device, args.device.type == "cuda", []
    peak = matmul_peak(device, args.quick, args.approx)
    fp32 = "tf32" if cuda and torch.backends.cudnn.allow_tf32 else "fp32"
    for i, (size, batch) in enumerate(args.infer_configs):
        torch.manual_seed(0)
        x = torch.randn(batch, 3, *size, device=device)
        compile_now = args.compile == "all" or (args.compile == "first" and i == 0)
        variants = infer_variants(args, model, x, compile_now)
        flops = count_flops(model, size, batch)
        with torch.inference_mode():
            ref, outs, first_s = model(x).float(), {}, {}
            for name, (fn, _) in variants.items():
                t = time.perf_counter()
                outs[name] = fn(x).float()
                sync(device)
                first_s[name] = time.perf_counter() - t
            fns = {name: functools.partial(fn, x) for name, (fn, _) in variants.items()}
            times = interleaved(fns, device, args.repeats, args.warmup, args.budget)
        base, table = statistics.median(times[BASELINE]), []
        for name, (_, note) in variants.items():
            med, out = statistics.median(times[name]), outs[name]
            dtype = next((k for k in ("fp16", "bf16") if k in name), fp32)
            table.append(
                {
                    "size": f"{size[0]}x{size[1]}",
                    "batch": batch,
                    "variant": name,
                    "median_ms": med * 1e3,
                    "min_ms": min(times[name]) * 1e3,
                    "runs": len(times[name]),
                    "images_per_s": batch / med,
                    "gflops_per_s": flops / med / 1e9,
                    "peak_dtype": dtype,
                    "fraction_of_peak": flops / med / 1e9 / peak.get(dtype, float("nan")),
                    "speedup": base / med,
                    "max_abs_diff": float((out - ref).abs().max()),
                    "argmax_agreement": agreement(out, ref),
                    "note": note,
                }
            )
            if name.startswith("torch.compile"):
                table[-1]["compile_s"] = first_s[name]
        show(
            f"Inference {size[0]}x{size[1]}, batch {batch}, {device.type} (median of "
            f"{len(times[BASELINE])} interleaved runs; {fp32} peak "
            f"{peak.get(fp32, float('nan')):.0f} GFLOP/s)",
            table,
            {
                "variant": "variant",
                "ms": "median_ms",
                "img/s": "images_per_s",
                "GFLOP/s": "gflops_per_s",
                "of peak": lambda r: f"{100 * r['fraction_of_peak']:.0f}% {r['peak_dtype']}",
                "speedup": lambda r: f"{r['speedup']:.2f}x",
                "max|diff|": lambda r: f"{r['max_abs_diff']:.1e}",
                "argmax%": lambda r: f"{100 * r['argmax_agreement']:.3f}",
                "note": "note",
            },
        )
        rows += table
    return {"peak_gflops": peak, "infer": rows}


def section_malloc(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The infer section at the first size, batch 1, in one process per glibc malloc setting:
    the default, and erfnet.fuse.tune_cpu_allocator()'s (set through glibc's environment)."""
    (h, w), rows = args.sizes[0], []
    for allocator, env in (("default", {}), ("tuned", TUNED_MALLOC)):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "scripts.benchmark",
                "--sections",
                "infer",
                "--device",
                "cpu",
                "--sizes",
                f"{h}x{w}",
                "--batch",
                "1",
                "--compile",
                "off",
                "--no-approx",
                "--repeats",
                str(args.repeats),
                "--json",
                f"{tmp}/out.json",
                *(["--threads", str(args.threads)] if args.threads else []),
                *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                *(["--quick"] if args.quick else []),
            ]
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"malloc run failed:\n{proc.stderr.decode()[-2000:]}")
            rows += [
                {**r, "allocator": allocator, "speedup": None}
                for r in json.loads(Path(f"{tmp}/out.json").read_text())["infer"]
            ]
    for r in rows:  # against the baseline with the default allocator
        r["speedup"] = rows[0]["median_ms"] / r["median_ms"]
    show(
        f"Allocator (process-wide): {h}x{w}, batch 1, one process each",
        rows,
        {
            "variant": "variant",
            "allocator": "allocator",
            "ms": "median_ms",
            "speedup": lambda r: f"{r['speedup']:.2f}x",
        },
    )
    return {"malloc": rows}


def section_train(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """One SGD iteration (forward, loss, backward, step): plain eager vs our training path."""
    device, cuda, (h, w), batch = args.device, args.device.type == "cuda", *args.train_shape
    torch.manual_seed(0)
    net = ERFNet()
    x = torch.randn(batch, 3, h, w, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch, h, w), device=device)
    y[:, :4] = IGNORE_INDEX  # a few ignored pixels, as in real labels

    def step(ours: bool, amp: torch.dtype | None = None) -> Callable[[], Any]:
        layout = torch.channels_last if ours else torch.contiguous_format
        m = copy.deepcopy(net).to(device, memory_format=layout).train()
        opt = torch.optim.SGD(
            m.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum, weight_decay=RECIPE.weight_decay
        )
        if ours:
            scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
            xcl = x.contiguous(memory_format=layout)
            return lambda: train_step(m, xcl, y, opt, scaler, autocast_dtype=amp)

        def plain() -> None:  # what mmseg runs: NCHW fp32, CE with ignore_index, SGD
            loss = F.cross_entropy(m(x), y, ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return plain

    variants = {
        BASELINE: (step(False), "as mmseg"),
        "channels_last": (step(True), "training.step.train_step, same maths"),
    }
    if cuda:
        variants["channels_last + fp16 AMP"] = (step(True, torch.float16), "approximate")
    # Peak memory of one iteration per variant, before the timing. On the CPU only the process's
    # peak RSS so far is known (ru_maxrss): cumulative, so later variants show at least the max.
    memory, kind = {}, "cuda max_memory_allocated" if cuda else "process peak RSS"
    for name, (fn, _) in variants.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        memory[name] = (
            torch.cuda.max_memory_allocated(device) / 2**20
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        )
    fns = {name: fn for name, (fn, _) in variants.items()}
    times = interleaved(
        fns, device, max(3, args.repeats // 2), max(0, args.warmup - 1), args.budget * 2
    )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [
        {
            "size": f"{h}x{w}",
            "batch": batch,
            "variant": name,
            "median_s": med[name],
            "min_s": min(times[name]),
            "runs": len(times[name]),
            "images_per_s": batch / med[name],
            "speedup": med[BASELINE] / med[name],
            "peak_memory_mb": memory[name],
            "memory_kind": kind,
            "note": note,
        }
        for name, (_, note) in variants.items()
    ]
    show(
        f"Training iteration (fwd + bwd + SGD), {h}x{w}, batch {batch}, {device.type} "
        f"(median of {len(times[BASELINE])} interleaved runs)",
        rows,
        {
            "variant": "variant",
            "s/iter": "median_s",
            "img/s": "images_per_s",
            "speedup": lambda r: f"{r['speedup']:.2f}x",
            f"{kind} MiB": "peak_memory_mb",
            "note": "note",
        },
    )
    return {"train": rows}


def section_data(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The data path: images/s of one loader worker (train and val), the train worker's time
    per stage, images/s per path (PNG or decoded cache; augmentation in the worker or on the
    device) for one worker and for the real loader with 1, 2, 4, ... workers, and the full
    recipe's projected wall time from the measured step and data rates."""
    (h, w), n, rows = ((128, 256) if args.quick else (1024, 2048)), args.data_images, []
    with tempfile.TemporaryDirectory(prefix="erfnet_bench_") as tmp:
        root = (
            Path(args.data)
            if args.data
            else make_synthetic_cityscapes(
                Path(tmp) / "cityscapes", train=n, val=n, test=0, size=(h, w), seed=0, extras=False
            )
        )
        made = args.data or f"synthetic {n}+{n} images at {h}x{w} (HxW)"
        tfs = (
            {
                "train": TrainTransform(crop_size=(h // 2, w // 2), scale=(h, w)),
                "val": EvalTransform(scale=(h, w)),
            }
            if args.quick
            else {"train": TrainTransform(), "val": EvalTransform()}
        )
        for split, tf in tfs.items():
            torch.manual_seed(0)
            res = throughput.time_pipeline(
                CityscapesDataset(root, split, transform=tf),
                num=3 if args.quick else 8,
                warmup=1,
                threads=1,
            )
            rows.append(
                {
                    "split": split,
                    "transform": repr(tf),
                    "dataset": made,
                    **res,
                    "transform_name": type(tf).__name__,
                }
            )
        show(
            f"Data pipeline, one worker (1 torch thread): {made}",
            rows,
            {
                "split": "split",
                "images/s": "images_per_s",
                "load s": "load_s",
                "transform s": "transform_s",
                "transform": "transform_name",
            },
        )
        png = CityscapesDataset(root, "train", transform=tfs["train"])
        cache = write_cache(root, Path(tmp) / "cache", "train", progress=False)["folder"]
        cached = CachedCityscapesDataset(root, "train", Path(cache).parent, png.transform)
        out = {"data": rows, **data_paths(args, png, cached, made)}
    return out


def data_paths(
    args: argparse.Namespace, png: CityscapesDataset, cached: CityscapesDataset, made: str
) -> dict[str, Any]:
    """section_data's stage table, per-path rates, loader scaling and recipe projection."""
    device, cuda, quick = args.device, args.device.type == "cuda", args.quick
    batch = args.data_batch or (16 if cuda else 2 if quick else 4)
    stages = throughput.time_stages(
        png, cached, batch=batch, device=device, num=2 * batch if quick else max(8, 2 * batch)
    )
    from_stages = throughput.path_rates(stages)
    where = {"pin": "main", "host to device": "main", "device aug": str(device)}
    stage_rows = [
        {
            "stage": k,
            "where": where.get(k, "worker"),
            "ms_per_image": v * 1e3,
            "paths": ", ".join(p for p, names in throughput.PATHS.items() if k in names),
        }
        for k, v in stages.items()
    ]
    show(
        f"Train data path per stage, median ms per image (1 torch thread; collate, pin, upload "
        f"and device aug per image of batch {batch}): {made}",
        stage_rows,
        {"stage": "stage", "where": "where", "ms/image": "ms_per_image", "paths": "paths"},
    )
    measured = throughput.time_paths(png, cached, rounds=2 if quick else 6)
    today = measured["PNG + worker aug"]
    path_rows = [
        {
            "path": p,
            "worker_images_per_s": r,
            "from_stages": from_stages.get(p),
            "speedup": r / today,
        }
        for p, r in measured.items()
    ]
    show(
        "One worker per path (images/s, side by side; 'from stages' = 1 / sum of its stages)",
        path_rows,
        {
            "path": "path",
            "img/s": "worker_images_per_s",
            "from stages": "from_stages",
            "vs today": lambda r: f"{r['speedup']:.2f}x",
        },
    )
    counts = args.data_workers or [k for k in (1, 2, 4, 8, 16, 32) if k <= (os.cpu_count() or 1)]
    loader_rows = []
    for workers in counts:
        for path in throughput.PATHS:
            rate = throughput.time_loader(
                path,
                png,
                cached,
                workers=workers,
                batch=batch,
                batches=2 if quick else 4,
                device=device,
            )
            loader_rows.append(
                {
                    "path": path,
                    "workers": workers,
                    "images_per_s": rate,
                    "per_worker": rate / workers,
                    "efficiency": rate / workers / measured[path],
                }
            )
    show(
        f"Training loader (build_train_loader, batch {batch}; without the device aug)",
        loader_rows,
        {
            "path": "path",
            "workers": "workers",
            "img/s": "images_per_s",
            "img/s per worker": "per_worker",
            "of 1-worker rate": lambda r: f"{100 * r['efficiency']:.0f}%",
        },
    )
    step_batch = args.data_step_batch or (16 if cuda else 1)
    size = (64, 128) if quick else RECIPE.crop_size
    step_s = throughput.time_step(device, step_batch, size, repeats=2 if quick or not cuda else 10)
    best = {p: max(r["images_per_s"] for r in loader_rows if r["path"] == p) for p in measured}
    projection = throughput.project_recipe(step_s, step_batch, best, stages["device aug"])
    for r in projection:
        r["workers_to_feed"] = throughput.workers_to_feed(step_s, step_batch, measured[r["path"]])
    show(
        f"Projected recipe ({RECIPE.iters} iterations x 16 images, {size[0]}x{size[1]}) on "
        f"{device}: step {step_s:.3f} s at batch {step_batch}"
        f"{' (fp16 AMP)' if cuda else ''} (+ device aug per image on the gpu-aug paths), data "
        "at the best loader rate above",
        projection,
        {
            "path": "path",
            "data img/s": "data_images_per_s",
            "step s/it": "step_s",
            "data s/it": "data_s",
            "hours": "recipe_hours",
            "bound": "bound",
            "stall": lambda r: f"{100 * r['stall_share']:.0f}%",
            "workers to feed": "workers_to_feed",
        },
    )
    return {
        "data_stages": stage_rows,
        "data_paths": path_rows,
        "data_loader": loader_rows,
        "recipe_projection": {
            "step_s": step_s,
            "step_batch": step_batch,
            "step_size": list(size),
            "rows": projection,
        },
    }


def section_shared_cpu(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The quick start (``train.py --data synthetic``, its default threads and workers): s/it
    on an idle machine and beside one busy process, which the CPU defaults must survive."""
    iters, rows = (6 if args.quick else 30), []
    with tempfile.TemporaryDirectory(prefix="erfnet_bench_") as tmp:
        for load in ("idle", "1 busy process"):
            busy = (
                None
                if load == "idle"
                else subprocess.Popen([sys.executable, "-c", "while True: pass"])
            )
            try:
                proc = subprocess.run(
                    [
                        sys.executable,
                        "train.py",
                        "--data",
                        "synthetic",
                        "--iters",
                        str(iters),
                        "--log-interval",
                        "3",
                        "--val-interval",
                        "1000",
                        "--ckpt-interval",
                        "1000",
                        "--num-vis",
                        "0",
                        "--no-progress",
                        "--work-dir",
                        f"{tmp}/{len(rows)}",
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"quick-start run failed:\n{proc.stderr[-2000:]}")
            # "iter N/M | ... | X s/it": the windows after the first (which holds the warm-up)
            windows = [
                float(line.split(" s/it")[0].rsplit("| ", 1)[1])
                for line in proc.stderr.splitlines()
                if " s/it " in line
            ][1:]
            setup = next(line for line in proc.stderr.splitlines() if "training for" in line)
            rows.append(
                {
                    "load": load,
                    "s_per_it": statistics.median(windows),
                    "iters": iters,
                    "settings": setup.rsplit("(", 1)[1].rstrip(")"),
                }
            )
    for r in rows:
        r["vs_idle"] = r["s_per_it"] / rows[0]["s_per_it"]
    show(
        f"Quick start on a shared CPU: train.py --data synthetic, {iters} iterations, median"
        " s/it of the windows after the first",
        rows,
        {
            "load": "load",
            "s/it": "s_per_it",
            "vs idle": lambda r: f"{r['vs_idle']:.2f}x",
            "threads, workers, cores": "settings",
        },
    )
    return {"shared_cpu": rows}


def section_video(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The video path on a synthetic H.264 clip: end-to-end FPS with decode / network / encode
    pipelined in threads against the same stages one after another (interleaved rounds, the
    per-stage tables of each). The int8 graphs are measured in the deploy section."""
    size = args.sizes[0]  # default 512x1024 (--quick: 64x128)
    frames, rounds = (4, 1) if args.quick else (12, 2)
    video = benchmark_video(size, frames, args.device, rounds=rounds)
    print("\nVideo path (random-weight ERFNet, fast path)\n" + format_video_benchmark(video))
    return {"video": video}


def deploy_inputs(
    args: argparse.Namespace, model: nn.Module, size: tuple[int, int], tmp: Path
) -> tuple[Any, Any]:
    """int8 calibration inputs (train) and the scored images (val, with labels) at ``size``,
    from --data or a synthetic Cityscapes made at that size; disjoint, as the export gate's."""
    from erfnet.deploy.gate import NetworkInputs, held_out_images

    calib_n, score_n = (2, 2) if args.quick else (16, 8)
    root = args.data or make_synthetic_cityscapes(
        tmp / "data", train=calib_n, val=score_n, test=0, size=size, extras=False
    )
    held = held_out_images(root, None, calib_n, score_n)
    mean, std = model.meta["mean"], model.meta["std"]
    return NetworkInputs(held.calibration, mean, std, size), held.scored


def gate_verdict(figures: dict[str, Any], reduced: bool) -> str:
    """What scripts/export.py's gate would say of these figures: fp32 thresholds for an exact
    path, the reduced-precision defaults for a bf16 / int8 one."""
    from erfnet.deploy import gate

    drop, agree = (
        (gate.DEFAULT_MAX_MIOU_DROP, gate.DEFAULT_MIN_AGREEMENT)
        if reduced
        else (gate.FP32_MAX_MIOU_DROP, gate.FP32_MIN_AGREEMENT)
    )
    missed = []
    if figures["agreement"] < agree:
        missed.append("agreement")
    if not figures["miou_drop"] <= drop:  # NaN fails too
        missed.append("mIoU drop")
    verdict = "refused: " + " and ".join(missed) if missed else "passes"
    return f"{verdict} ({drop:g} / {agree:g} %)"


def deploy_accuracy(
    built: Any, model: nn.Module, scored: Any, size: tuple[int, int]
) -> list[dict[str, Any]]:
    """Per path: the gate's figures against the plain eager model on the scored images (the
    export protocol: class maps at the label size), its verdict and its first call's time."""
    from erfnet.deploy.bench import PLAIN
    from erfnet.deploy.gate import class_maps, compare_maps

    meta = model.meta
    reference = list(class_maps(model, scored, meta, size, False))
    classes = len(scored.dataset.classes), len(meta["class_names"])
    rows = []
    for name, (fn, note) in built.paths.items():
        t = time.perf_counter()
        figures = compare_maps(reference, class_maps(fn, scored, meta, size, False), *classes)
        verdict = gate_verdict(figures, name in built.reduced)
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


def deploy_plot(rows: list[dict[str, Any]], path: Path) -> str:
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
        ax.scatter(r["speedup"], r["agreement"], marker="o" if passed else "x", s=60)
        ax.annotate(
            r["path"],
            (r["speedup"], r["agreement"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("speed, x plain eager fp32 (median, one interleaved run)")
    ax.set_ylabel("argmax agreement with fp32, % of scored pixels")
    ax.set_title(
        f"ERFNet CPU deploy paths, {rows[0]['size']}, {rows[0]['threads']} threads"
        " (o: passes the gate, x: refused)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"), fsync=False)
    finally:
        plt.close(fig)
    return f"wrote {path}"


def section_deploy(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """Every CPU deployment path at the first size, batch 1, in one interleaved run: latency,
    speed against the plain eager model, agreement and mIoU against it on held-out images, and
    the export gate's verdict; the plot beside --json."""
    from erfnet.deploy.bench import PLAIN, deploy_paths
    from erfnet.deploy.gate import NetworkInputs

    size, threads = args.sizes[0], args.threads or 2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = model.cpu().eval()
    model.meta = {
        "mean": list(MEAN_RGB),
        "std": list(STD_RGB),
        "class_names": list(CLASS_NAMES),
        **getattr(model, "meta", {}),
    }
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            calib, scored = deploy_inputs(args, model, size, Path(tmp))
            built = deploy_paths(model, size, calib, threads, Path(tmp), args.compile != "off")
            rows = deploy_accuracy(built, model, scored, size)
            mean, std = model.meta["mean"], model.meta["std"]
            x = torch.from_numpy(NetworkInputs(scored, mean, std, size)[0])
            fns = {name: functools.partial(fn, x) for name, (fn, _) in built.paths.items()}
            times = interleaved(fns, torch.device("cpu"), args.repeats, args.warmup, args.budget)
    finally:
        torch.set_num_threads(old_threads)
    base = statistics.median(times[PLAIN])
    for r in rows:
        r |= {
            "size": f"{size[0]}x{size[1]}",
            "batch": 1,
            "threads": threads,
            "median_ms": 1e3 * statistics.median(times[r["path"]]),
            "runs": len(times[r["path"]]),
        }
        r["speedup"] = base * 1e3 / r["median_ms"]
    isa = cpu_isa()
    show(
        f"Deploy paths, CPU, {size[0]}x{size[1]}, batch 1, {threads} threads (median of"
        f" {len(times[PLAIN])} interleaved runs; agreement and mIoU on {len(scored)} held-out"
        f" image(s)); ISA: {format_isa(isa)}",
        rows,
        {
            "path": "path",
            "ms": "median_ms",
            "x plain": lambda r: f"{r['speedup']:.2f}",
            "argmax agreement %": lambda r: f"{r['agreement']:.2f}",
            "mIoU drop": lambda r: f"{r['miou_drop']:.2f}",
            "gate (drop / agreement)": "gate",
            "first call s": "first_call_s",
            "note": "note",
        },
    )
    for name, why in built.skipped.items():
        print(f"  {name}: skipped ({why})")
    result = {"deploy": rows, "deploy_skipped": built.skipped, "isa": isa}
    if args.json:
        plot = Path(args.json).with_name(Path(args.json).stem + "_deploy.png")
        print(f"  plot: {deploy_plot(rows, plot)}")
        result["deploy_plot"] = str(plot) if plot.is_file() else None
    return result


# --sections name -> section, run in this order. Adding a section: its function and a line here.
SECTIONS: dict[str, Callable[[argparse.Namespace, nn.Module], dict[str, Any]]] = {
    "flops": section_flops,
    "infer": section_infer,
    "malloc": section_malloc,  # CPU only: the CUDA caching allocator does not use malloc
    "train": section_train,
    "data": section_data,
    "shared_cpu": section_shared_cpu,  # CPU only: train.py's CPU defaults beside a busy process
    "video": section_video,  # pipelined vs sequential FPS
    "deploy": section_deploy,  # CPU only: every export path and torch.compile, with agreement
}


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--sections", nargs="+", default=["all"], choices=[*SECTIONS, "all"], help="default all")
    add("--sizes", nargs="+", type=parse_size, help="HxW sizes (default 512x1024 1024x2048)")
    add("--batch", type=int, help="inference batch besides 1 (default 8 CUDA; CPU 2, first size)")
    add("--train-batch", type=int, help="training batch (default: 2 CPU, 8 CUDA)")
    add("--repeats", type=int, help="timed rounds per comparison (default: 7 CPU, 30 CUDA)")
    add("--warmup", type=int, help="untimed rounds (default 1 CPU, 5 CUDA)")
    add("--budget", type=float, help="seconds per comparison before fewer rounds (default 25)")
    add("--compile", choices=("off", "first", "all"), help="torch.compile at the first size and"
        " batch, all, or off (default first CPU, all CUDA; compiles per input shape)")
    add("--no-approx", dest="approx", action="store_false", help="skip bf16 / fp16 variants")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add("--threads", type=int, help="torch CPU threads (default: torch's)")
    add("--checkpoint", help="our checkpoint (default: random weights and BN statistics)")
    add("--data", metavar="ROOT", help="Cityscapes root (default: a synthetic one in a temp dir)")
    add("--data-images", type=int, default=4, help="synthetic images per split")
    add("--data-batch", type=int, help="data section's loader batch (default: 16 CUDA, 4 CPU)")
    add("--data-workers", type=int, nargs="+", help="loader workers to try (default: 1, 2, 4, "
        "... up to the CPU count)")
    add("--data-step-batch", type=int, help="batch of the data section's step for the recipe "
        "projection (default: 16 CUDA, 1 CPU; scaled linearly to 16)")
    add("--quick", action="store_true", help="tiny sizes and few runs (smoke test)")
    add("--json", metavar="OUT.json", help="write all results here")
    return p
# fmt: on


def check_args(args: argparse.Namespace) -> None:
    check_runtime_flags(args)
    for name in ("batch", "train_batch", "repeats", "data_images", "data_batch", "data_step_batch"):
        if (value := getattr(args, name)) is not None and value < 1:
            raise FlagError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.data_workers and min(args.data_workers) < 0:
        raise FlagError(f"--data-workers must be >= 0, got {args.data_workers}")
    if args.data and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: not a directory")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on the device and on --quick."""
    cuda, quick = args.device.type == "cuda", args.quick
    batch_given, big = args.batch is not None, cuda and not quick
    args.sizes = args.sizes or ([(64, 128)] if quick else [(512, 1024), (1024, 2048)])
    args.batch = args.batch or (8 if big else 2)
    args.repeats = args.repeats or (3 if quick else 30 if cuda else 7)
    args.warmup = args.warmup if args.warmup is not None else 5 if big else 1
    args.budget = args.budget or (float("inf") if quick else 25.0)
    args.compile = args.compile or ("off" if quick else "all" if cuda else "first")
    args.train_shape = (args.sizes[0] if quick else RECIPE.crop_size), args.train_batch or 2
    if big and args.train_batch is None:
        args.train_shape = args.train_shape[0], 8
    # Batch N at every size, except on the CPU by default: only at the first size there.
    args.infer_configs = [
        (s, b)
        for s in args.sizes
        for b in sorted({1, args.batch})
        if cuda or batch_given or b == 1 or s == args.sizes[0]
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    if args.json:  # before the benchmark, which takes minutes
        check_outputs(output_file("--json", args.json), [("--checkpoint", args.checkpoint)])
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    resolve_defaults(args)
    cuda = args.device.type == "cuda"
    if args.checkpoint:
        model = load_network(args.checkpoint, None, args.device)
    else:
        torch.manual_seed(0)
        model = randomise_bn(ERFNet()).to(args.device).eval()
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the recipe (and erfnet.training.step) run
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(args.device),
        "isa": cpu_isa(),
    }
    if cuda:
        info |= {
            "gpu": torch.cuda.get_device_name(args.device),
            "cudnn": torch.backends.cudnn.version(),
        }
    weights = args.checkpoint or "random (seed 0) with random BatchNorm statistics"
    results: dict[str, Any] = {"machine": info, "weights": weights, "args": vars(args)}
    print(
        f"erfnet benchmark on {args.device}: {info['processor']}"
        f"{' / ' + info['gpu'] if cuda else ''}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; ISA: {format_isa(info['isa'])}"
    )
    started = time.perf_counter()
    for name, section in SECTIONS.items():
        cpu_only = name in ("malloc", "shared_cpu", "deploy")
        if ("all" in args.sections or name in args.sections) and not (cpu_only and cuda):
            results |= section(args, model)
    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, default=str))
        print(f"wrote {args.json}")
    return results


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


ISA_FLAGS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AVX512-BF16": ("avx512_bf16",),
    "AMX-BF16": ("amx_bf16",),
    "AMX-INT8": ("amx_int8",),
}


def cpu_isa() -> dict[str, bool]:
    """Which vector / matrix extensions the CPU has (Linux /proc/cpuinfo flags): what decides
    whether bf16 and int8 paths are fast on this machine."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {name: any(f in flags for f in options) for name, options in ISA_FLAGS.items()}


def format_isa(isa: dict[str, bool]) -> str:
    have = [k for k, v in isa.items() if v]
    return ", ".join(have) if have else "none of " + ", ".join(isa)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return names[0] if names else platform.processor()


if __name__ == "__main__":
    main()
