"""Segment a video file, a camera, a stream or a folder of frames; report the end-to-end FPS.

    python scripts/video.py drive.mp4 --checkpoint ckpt.pth --out drive_seg.mp4
    python scripts/video.py --camera 0 --checkpoint ckpt.pth --out cam.mp4 --resize 512 1024
    python scripts/video.py rtsp://192.168.1.10/stream --checkpoint ckpt.pth --out live.mkv
    python scripts/video.py frames/ --model erfnet_int8.onnx --labels labels/ --json fps.json
    python scripts/video.py drive.mp4 --model erfnet_openvino/erfnet.xml --out drive_seg.mp4

Writes the checkpoint's palette blended over each frame to ``--out`` (H.264 via libx264 where
this PyAV build has it, else MPEG-4; the choice is printed) at the source's frame rate divided
by ``--every``, and with ``--labels DIR`` one class-index PNG per processed frame. The network
sees each frame resized to ``--resize H W`` (default: the test size the checkpoint records,
``meta["test_size"]``, as ``erfnet.predict`` and scripts/predict.py; Cityscapes' keep-ratio
1024x2048 for older files) and normalised with the checkpoint's mean / std; logits are resized
back to the frame before the argmax.

Decoding, the network and encoding run in three threads with bounded queues, so the end-to-end
FPS approaches the slowest stage's; ``--sequential`` runs the same stages one after another.
At the end a per-stage table (mean ms per frame, share of the wall time) and the end-to-end FPS
are printed, and with ``--json`` written to a file. Ctrl-C stops a camera cleanly. A failure
of any stage (a frame of another size, a full disk, a broken stream) stops the others and is
printed as one line. Outputs are checked before any work: ``--out``, ``--labels`` and ``--json``
may not be the input, nor unwritable. CPU threads follow the project's thread plan
(``erfnet.runtime.cpu_plan``: the network's threads plus the reader and writer threads leave a
core free); ``--threads N`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from erfnet.deploy.exported import load_network
from erfnet.distributed import resolve_device
from erfnet.errors import FlagError, cli_main
from erfnet.evaluation.inference import model_test_size
from erfnet.outputs import atomic_write_text, output_dir, output_file
from erfnet.outputs import check_outputs as check_output_rule
from erfnet.runtime import add_runtime_flags, check_runtime_flags, cpu_plan, tune_cpu_allocator
from erfnet.video.io import FPS_RANGE, check_output_path, open_source
from erfnet.video.pipeline import ExportedPredictor, TorchPredictor, run_video
from erfnet.video.report import format_report


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", nargs="?", help="video file, folder of frames or stream URL")
    p.add_argument("--camera", type=int, metavar="N", help="camera /dev/videoN instead of input")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="our checkpoint (.pth), run with PyTorch")
    model.add_argument("--model", "--onnx", dest="model", metavar="PATH",
                       help="an exported model, CPU: .onnx (fp32 or int8, onnxruntime), OpenVINO"
                       " .xml or .pt2 (--onnx is the old name)")
    p.add_argument("--out", help="overlay video to write (.mp4, .mkv, .avi, .mov, .webm)")
    p.add_argument("--labels", metavar="DIR", help="also write one class-index PNG per frame")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N processed frames")
    p.add_argument("--every", type=int, default=1, metavar="N", help="process every N-th frame")
    p.add_argument("--resize", nargs=2, type=int, metavar=("H", "W"),
                   help="network input size (default: the checkpoint's test size,"
                   " meta['test_size']), e.g. 512 1024")
    p.add_argument("--alpha", type=float, default=0.5, help="colour weight of the blend (0.5)")
    p.add_argument("--codec", default="auto", help="encoder: auto (H.264, else mpeg4) or a name")
    p.add_argument("--fps", type=float,
                   help="frame rate of the input (overrides what the source says; a folder of"
                   " frames: 30)")
    add_runtime_flags(p)
    p.add_argument("--no-cuda-graph", action="store_true", help="CUDA: run the network eagerly")
    p.add_argument("--no-amp", action="store_true", help="CUDA: float32 instead of fp16 autocast")
    p.add_argument("--sequential", action="store_true", help="no pipelining (for comparison)")
    p.add_argument("--json", metavar="PATH", help="write the FPS report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p
# fmt: on


def check_args(args: argparse.Namespace) -> None:
    if (args.input is None) == (args.camera is None):
        raise FlagError("give exactly one input: a video file, folder or URL, or --camera N")
    if args.every < 1:
        raise FlagError(f"--every must be at least 1, got {args.every}")
    if args.max_frames is not None and args.max_frames < 1:
        raise FlagError(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.resize is not None and min(args.resize) < 8:
        raise FlagError(f"--resize must be at least 8 8, got {args.resize[0]} {args.resize[1]}")
    if not 0.0 <= args.alpha <= 1.0:
        raise FlagError(f"--alpha must be in [0, 1], got {args.alpha}")
    low, high = FPS_RANGE
    if args.fps is not None and not low <= args.fps <= high:  # also refuses nan and inf
        raise FlagError(f"--fps must be a frame rate between {low:g} and {high:g}, got {args.fps}")
    check_runtime_flags(args, exported=args.model is not None)


def check_outputs(args: argparse.Namespace) -> None:
    """Every output, before any work, by the one output rule (``erfnet.outputs``): none is or
    lies inside an input, none is another, each can be written."""
    source = args.input if args.input and "://" not in args.input else None
    inputs = [("", source), ("--checkpoint", args.checkpoint), ("--model", args.model)]
    if args.out is not None:
        check_output_path(args.out)  # a folder, a missing folder, a suffix FFmpeg cannot write
    outputs = output_file("--out", args.out) + output_file("--json", args.json)
    check_output_rule(outputs + output_dir("--labels", args.labels), inputs)


def plan_threads(args: argparse.Namespace, device: torch.device) -> int:
    """The network's CPU threads (0: the runtime's default) from the one thread plan; the reader
    and writer threads count as busy workers when pipelined."""
    busy = 0 if args.sequential else 2
    _, threads = cpu_plan(device.type, busy, args.threads)
    if threads:
        torch.set_num_threads(threads)
    return threads or 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    check_outputs(args)  # before loading anything
    device = resolve_device("cpu" if args.model is not None else args.device)
    threads = plan_threads(args, device)
    model = load_network(args.checkpoint, args.model, device, threads, fast=True)
    # the test size the checkpoint recorded, unless --resize fixes the size
    test_size = None if args.resize else model_test_size(model)
    if args.model is not None:
        predictor: Any = ExportedPredictor(model, args.resize, test_size=test_size)
    else:
        amp, graph = not args.no_amp, not args.no_cuda_graph
        predictor = TorchPredictor(
            model, args.resize, amp=amp, cuda_graph=graph, test_size=test_size
        )
    source = open_source(args.input, camera=args.camera)
    if args.out is None and args.labels is None:
        print("no --out or --labels: measuring only", file=sys.stderr)
    report = run_video(
        source,
        predictor,
        args.out,
        every=args.every,
        max_frames=args.max_frames,
        alpha=args.alpha,
        labels_dir=args.labels,
        codec=args.codec,
        fps=args.fps,
        pipelined=not args.sequential,
        progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr),
    )
    report["threads"] = threads or torch.get_num_threads()
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli_main(get_args_parser, run, argv)


if __name__ == "__main__":
    tune_cpu_allocator()  # the network's large buffers are reused instead of page-faulted
    main()
