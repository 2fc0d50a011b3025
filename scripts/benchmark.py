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
``section_x(args, model) -> {json key: results}`` (the long ones in erfnet/bench/) and its line
in SECTIONS.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erfnet.bench import measure
from erfnet.bench.data_section import section_data
from erfnet.bench.model_speed import section_infer, section_train
from erfnet.bench.video import benchmark_video, format_video_benchmark
from erfnet.config import RECIPE
from erfnet.data.synthetic import make_synthetic_cityscapes
from erfnet.deploy.exported import load_network
from erfnet.distributed import resolve_device
from erfnet.errors import FlagError, UserError, cli_main
from erfnet.model import ERFNet, count_parameters
from erfnet.outputs import atomic_write_text, check_outputs, output_file
from erfnet.runtime import check_runtime_flags

ROOT = Path(__file__).resolve().parents[1]
# erfnet.fuse.tune_cpu_allocator()'s setting, as glibc's environment variables.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
CPU_ONLY = ("malloc", "shared_cpu", "deploy")  # skipped on CUDA


# ---------------------------------------------------------------- flags


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
    add("--qat-iters", type=int, default=0, metavar="N", help="deploy section: add the int8"
        " of N steps of quantization-aware fine-tuning (export.py --qat-iters; default 0 = off)")
    add("--quick", action="store_true", help="tiny sizes and few runs (smoke test)")
    add("--json", metavar="OUT.json", help="write all results here")
    return p
# fmt: on


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' (HxW) -> (512, 1024)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW like 512x1024, got {text!r}") from None
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"size must be at least 8x8, got {text!r}")
    return h, w


def check_args(args: argparse.Namespace) -> None:
    check_runtime_flags(args)
    for name in ("batch", "train_batch", "repeats", "data_images", "data_batch", "data_step_batch"):
        if (value := getattr(args, name)) is not None and value < 1:
            raise FlagError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.qat_iters < 0:
        raise FlagError(f"--qat-iters must be >= 0, got {args.qat_iters}")
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
    train_batch = args.train_batch or (8 if big else 2)
    args.train_shape = (args.sizes[0] if quick else RECIPE.crop_size), train_batch
    # Batch N at every size, except on the CPU by default: only at the first size there.
    args.infer_configs = [
        (s, b)
        for s in args.sizes
        for b in sorted({1, args.batch})
        if cuda or batch_given or b == 1 or s == args.sizes[0]
    ]


# ---------------------------------------------------------------- sections


def section_flops(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """Parameters and per-image FLOPs at each size."""
    backbone = sum(count_parameters(m) for m in (model.encoder, model.decoder))
    out = {"params": count_parameters(model), "params_backbone": backbone, "flops": {}}
    rows = [
        {"": "parameters (backbone + head)", "value": f"{out['params']:,}", "GMAC": ""},
        {"": "parameters (backbone)", "value": f"{backbone:,}", "GMAC": ""},
    ]
    for h, w in args.sizes:
        flops = out["flops"][f"{h}x{w}"] = measure.count_flops(model, (h, w))
        rows.append(
            {"": f"FLOPs at {h}x{w}", "value": f"{flops / 1e9:.2f} G", "GMAC": f"{flops / 2e9:.2f}"}
        )
    measure.show("Model size (FLOPs: multiply-add = 2)", rows)
    return {"model": out}


def section_malloc(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The infer section at the first size, batch 1, in one process per glibc malloc setting:
    the default, and erfnet.fuse.tune_cpu_allocator()'s (set through glibc's environment)."""
    (h, w), rows = args.sizes[0], []
    flags = f"--sections infer --device cpu --sizes {h}x{w} --batch 1 --compile off --no-approx"
    flags = [*flags.split(), "--repeats", str(args.repeats)]
    flags += ["--threads", str(args.threads)] if args.threads else []
    flags += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    flags += ["--quick"] if args.quick else []
    for allocator, env in (("default", {}), ("tuned", TUNED_MALLOC)):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "scripts.benchmark", *flags, "--json", f"{tmp}/out.json"]
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"malloc run failed:\n{proc.stderr.decode()[-2000:]}")
            infer = json.loads(Path(f"{tmp}/out.json").read_text())["infer"]
        rows += [{**r, "allocator": allocator} for r in infer]
    for r in rows:  # against the baseline with the default allocator
        r["speedup"] = rows[0]["median_ms"] / r["median_ms"]
    measure.show(
        f"Allocator (process-wide): {h}x{w}, batch 1, one process each",
        rows,
        "variant | allocator | ms=median_ms | speedup={speedup:.2f}x",
    )
    return {"malloc": rows}


def section_shared_cpu(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The quick start (``train.py --data synthetic``, its default threads and workers): s/it
    on an idle machine and beside one busy process, which the CPU defaults must survive."""
    iters, rows = (6 if args.quick else 30), []
    flags = f"--data synthetic --iters {iters} --log-interval 3 --val-interval 1000"
    flags += " --ckpt-interval 1000 --num-vis 0 --no-progress"
    with tempfile.TemporaryDirectory(prefix="erfnet_bench_") as tmp:
        for load in ("idle", "1 busy process"):
            cmd = [sys.executable, "train.py", *flags.split(), "--work-dir", f"{tmp}/{len(rows)}"]
            busy = None
            if load != "idle":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"quick-start run failed:\n{proc.stderr[-2000:]}")
            lines = proc.stderr.splitlines()
            # "iter N/M | ... | X s/it": the windows after the first (which holds the warm-up)
            windows = [
                float(ln.split(" s/it")[0].rsplit("| ", 1)[1]) for ln in lines if " s/it " in ln
            ]
            setup = next(ln for ln in lines if "training for" in ln)
            rows.append(
                {
                    "load": load,
                    "s_per_it": statistics.median(windows[1:]),
                    "iters": iters,
                    "settings": setup.rsplit("(", 1)[1].rstrip(")"),
                }
            )
    for r in rows:
        r["vs_idle"] = r["s_per_it"] / rows[0]["s_per_it"]
    measure.show(
        f"Quick start on a shared CPU: train.py --data synthetic, {iters} iterations, median"
        " s/it of the windows after the first",
        rows,
        "load | s/it=s_per_it | vs idle={vs_idle:.2f}x | threads, workers, cores=settings",
    )
    return {"shared_cpu": rows}


def section_video(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The video path on a synthetic H.264 clip: end-to-end FPS with decode / network / encode
    pipelined in threads against the same stages one after another (interleaved rounds, the
    per-stage tables of each). The int8 graphs are measured in the deploy section."""
    frames, rounds = (4, 1) if args.quick else (12, 2)
    video = benchmark_video(args.sizes[0], frames, args.device, rounds=rounds)
    print("\nVideo path (random-weight ERFNet, fast path)\n" + format_video_benchmark(video))
    return {"video": video}


@torch.inference_mode()
def section_deploy(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """Every CPU deployment path at the first size, batch 1, in one interleaved run: latency,
    speed against the plain eager model, agreement and mIoU against it on held-out images, and
    the export gate's verdict; the plot beside --json."""
    from erfnet.deploy.bench import PLAIN, deploy_paths, plot_paths, score_paths

    size, threads = args.sizes[0], args.threads or 2
    with measure.torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        calib, scored, x = deploy_inputs(args, model, size, Path(tmp))
        built = deploy_paths(
            model, size, calib, threads, Path(tmp), args.compile != "off", args.qat_iters
        )
        rows = score_paths(built, model, scored, size)
        fns = {name: functools.partial(fn, x) for name, (fn, _) in built.paths.items()}
        times = measure.interleaved(fns, args.device, args.repeats, args.warmup, args.budget)
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
    isa = measure.cpu_isa()
    measure.show(
        f"Deploy paths, CPU, {size[0]}x{size[1]}, batch 1, {threads} threads (median of"
        f" {len(times[PLAIN])} interleaved runs; agreement and mIoU on {len(scored)} held-out"
        f" image(s)); ISA: {measure.format_isa(isa)}",
        rows,
        "path | ms=median_ms | x plain={speedup:.2f} | argmax agreement %={agreement:.2f} | mIoU"
        " drop={miou_drop:.2f} | gate (drop / agreement)=gate | first call s=first_call_s | note",
    )
    for name, why in built.skipped.items():
        print(f"  {name}: skipped ({why})")
    result = {"deploy": rows, "deploy_skipped": built.skipped, "isa": isa}
    if args.json:
        plot = Path(args.json).with_name(Path(args.json).stem + "_deploy.png")
        print(f"  plot: {plot_paths(rows, plot)}")
        result["deploy_plot"] = str(plot) if plot.is_file() else None
    return result


def deploy_inputs(
    args: argparse.Namespace, model: nn.Module, size: tuple[int, int], tmp: Path
) -> tuple[Any, Any, torch.Tensor]:
    """int8 calibration inputs (train), the scored images (val, with labels) and the first one's
    input, the timed batch, at ``size``: from --data or a synthetic Cityscapes made at that
    size; calibration and scored images disjoint, as the export gate's."""
    from erfnet.deploy.gate import NetworkInputs, held_out_images

    calib_n, score_n = (2, 2) if args.quick else (16, 8)
    root = args.data or make_synthetic_cityscapes(
        tmp / "data", train=calib_n, val=score_n, test=0, size=size, extras=False
    )
    held = held_out_images(root, None, calib_n, score_n)
    mean, std = model.meta["mean"], model.meta["std"]
    x = torch.from_numpy(NetworkInputs(held.scored, mean, std, size)[0])
    return NetworkInputs(held.calibration, mean, std, size), held.scored, x


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


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check the flags (and --json, before minutes of measuring), build the model, describe
    the machine, run the chosen sections, write the JSON."""
    check_args(args)
    if args.json:
        check_outputs(output_file("--json", args.json), [("--checkpoint", args.checkpoint)])
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    resolve_defaults(args)
    model, info = build_model(args), machine_info(args)
    gpu = f" / {info['gpu']}" if "gpu" in info else ""
    print(
        f"erfnet benchmark on {args.device}: {info['processor']}{gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; ISA: {measure.format_isa(info['isa'])}"
    )
    weights = args.checkpoint or "random (seed 0) with random BatchNorm statistics"
    results: dict[str, Any] = {"machine": info, "weights": weights, "args": vars(args)}
    started, cuda = time.perf_counter(), args.device.type == "cuda"
    for name, section in SECTIONS.items():
        if ("all" in args.sections or name in args.sections) and not (cuda and name in CPU_ONLY):
            results |= section(args, model)
    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, default=str))
        print(f"wrote {args.json}")
    return results


def build_model(args: argparse.Namespace) -> nn.Module:
    """--checkpoint's model, or a random one with non-trivial BatchNorm statistics (so that
    folding BN is really exercised by the comparisons)."""
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the recipe (and erfnet.training.step) run
    if args.checkpoint:
        return load_network(args.checkpoint, None, args.device)
    torch.manual_seed(0)
    model, g = ERFNet(), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.to(args.device).eval()


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """What the figures were measured on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": measure.cpuinfo("model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(args.device),
        "isa": measure.cpu_isa(),
    }
    if args.device.type == "cuda":
        gpu = torch.cuda.get_device_name(args.device)
        info |= {"gpu": gpu, "cudnn": torch.backends.cudnn.version()}
    return info


if __name__ == "__main__":
    main()
