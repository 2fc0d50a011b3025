"""The model's speed sections of ``scripts/benchmark.py``: inference (``section_infer``, every
variant at every size and batch, with its agreement) and a training step (``section_train``),
each against the plain eager fp32 NCHW model (``BASELINE``), measured side by side."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

from erfnet.bench import measure
from erfnet.config import IGNORE_INDEX, NUM_CLASSES, RECIPE
from erfnet.deploy.onnx import export_onnx
from erfnet.fuse import fuse_bn, optimize_for_inference
from erfnet.model import ERFNet
from erfnet.training.step import train_step

BASELINE = "eager fp32 NCHW"


def section_infer(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """Latency / throughput and equivalence of every variant at every (size, batch)."""
    device, rows = args.device, []
    peak = measure.matmul_peak(device, args.quick, args.approx)
    fp32 = "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"
    for i, (size, batch) in enumerate(args.infer_configs):
        torch.manual_seed(0)
        x = torch.randn(batch, 3, *size, device=device)
        compile_now = args.compile == "all" or (args.compile == "first" and i == 0)
        variants = infer_variants(args, model, x, compile_now)
        flops = measure.count_flops(model, size, batch)
        with torch.inference_mode():
            ref, outs, first_s = model(x).float(), {}, {}
            for name, (fn, _) in variants.items():
                t = time.perf_counter()
                outs[name] = fn(x).float()
                measure.sync(device)
                first_s[name] = time.perf_counter() - t
            fns = {name: functools.partial(fn, x) for name, (fn, _) in variants.items()}
            times = measure.interleaved(fns, device, args.repeats, args.warmup, args.budget)
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
                    # the fraction of pixels whose argmax class is the baseline's
                    "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).double().mean()),
                    "note": note,
                }
            )
            if name.startswith("torch.compile"):
                table[-1]["compile_s"] = first_s[name]
        measure.show(
            f"Inference {size[0]}x{size[1]}, batch {batch}, {device.type} (median of "
            f"{len(times[BASELINE])} interleaved runs; {fp32} peak "
            f"{peak.get(fp32, float('nan')):.0f} GFLOP/s)",
            table,
            "variant | ms=median_ms | img/s=images_per_s | GFLOP/s=gflops_per_s | of peak="
            "{fraction_of_peak:.0%} {peak_dtype} | speedup={speedup:.2f}x | max|diff|="
            "{max_abs_diff:.1e} | argmax={argmax_agreement:.3%} | note",
        )
        rows += table
    return {"peak_gflops": peak, "infer": rows}


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
    cuda = args.device.type == "cuda"
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
        fp16 = torch.autocast("cuda", dtype=torch.float16)(fast)
        bf16 = torch.autocast("cuda", dtype=torch.bfloat16)(fast)
        v["fast + fp16 autocast"] = (fp16, "approximate")
        v["fast + bf16 autocast"] = (bf16, "approximate")
        with torch.inference_mode():
            graph = cuda_graph(v["fast + fp16 autocast"][0], x)
        v["fast + fp16 + CUDA graph"] = (graph, "approximate; graph replay")
    elif (ort := onnxruntime_variant(model)) is not None:
        v["onnxruntime"] = (ort, "export_onnx graph, CPUExecutionProvider")
    if not cuda and args.approx:
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16)(fast)
        v["fast + bf16 autocast"] = (bf16, "approximate (AVX512-BF16 / AMX)")
    return v


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
        measure.sync(device)
        memory[name] = (
            torch.cuda.max_memory_allocated(device) / 2**20
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        )
    fns = {name: fn for name, (fn, _) in variants.items()}
    rounds, warmup = max(3, args.repeats // 2), max(0, args.warmup - 1)
    times = measure.interleaved(fns, device, rounds, warmup, args.budget * 2)
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
    measure.show(
        f"Training iteration (fwd + bwd + SGD), {h}x{w}, batch {batch}, {device.type} "
        f"(median of {len(times[BASELINE])} interleaved runs)",
        rows,
        "variant | s/iter=median_s | img/s=images_per_s | speedup={speedup:.2f}x"
        f" | {kind} MiB=peak_memory_mb | note",
    )
    return {"train": rows}
