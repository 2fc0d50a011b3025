"""Segment a video file, a camera, a stream or a folder of frames; report the end-to-end FPS.

    python scripts/video.py drive.mp4 --checkpoint ckpt.pth --out drive_seg.mp4
    python scripts/video.py --camera 0 --checkpoint ckpt.pth --out cam.mp4 --resize 512 1024
    python scripts/video.py rtsp://192.168.1.10/stream --checkpoint ckpt.pth --out live.mkv
    python scripts/video.py frames/ --onnx erfnet_int8.onnx --labels labels/ --json fps.json

Writes the checkpoint's palette blended over each frame to ``--out`` (H.264 via libx264 where
this PyAV build has it, else MPEG-4; the choice is printed) at the source's frame rate divided
by ``--every``, and with ``--labels DIR`` one class-index PNG per processed frame. The network
sees each frame resized to ``--resize H W`` (default: the frame's own size) and normalised with
the checkpoint's mean / std; logits are resized back to the frame before the argmax.

Decoding, the network and encoding run in three threads with bounded queues, so the end-to-end
FPS approaches the slowest stage's; ``--sequential`` runs the same stages one after another.
At the end a per-stage table (mean ms per frame, share of the wall time) and the end-to-end FPS
are printed, and with ``--json`` written to a file. Ctrl-C stops a camera cleanly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erfnet.checkpoint import CheckpointError, load_model
from erfnet.deploy.int8 import QuantizationError
from erfnet.distributed import resolve_device
from erfnet.runtime import tune_cpu_allocator
from erfnet.video.io import check_output_path, open_source
from erfnet.video.pipeline import OnnxPredictor, TorchPredictor, VideoError, run_video
from erfnet.video.report import format_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", nargs="?", help="video file, folder of frames or stream URL")
    p.add_argument("--camera", type=int, metavar="N", help="camera /dev/videoN instead of input")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="our checkpoint (.pth), run with PyTorch")
    model.add_argument("--onnx", metavar="MODEL", help="an exported .onnx (fp32 or int8), CPU")
    p.add_argument("--out", help="overlay video to write (.mp4, .mkv, .avi, .mov, .webm)")
    p.add_argument("--labels", metavar="DIR", help="also write one class-index PNG per frame")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N processed frames")
    p.add_argument("--every", type=int, default=1, metavar="N", help="process every N-th frame")
    p.add_argument(
        "--resize", nargs=2, type=int, metavar=("H", "W"),
        help="network input size (default: the frame's size), e.g. 512 1024",
    )  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.5, help="colour weight of the blend (0.5)")
    p.add_argument("--codec", default="auto", help="encoder: auto (H.264, else mpeg4) or a name")
    p.add_argument("--fps", type=float, help="source frame rate if it does not say (frames: 30)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--no-cuda-graph", action="store_true", help="CUDA: run the network eagerly")
    p.add_argument("--no-amp", action="store_true", help="CUDA: float32 instead of fp16 autocast")
    p.add_argument("--sequential", action="store_true", help="no pipelining (for comparison)")
    p.add_argument("--json", metavar="PATH", help="write the FPS report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if (args.input is None) == (args.camera is None):
        p.error("give exactly one input: a video file, folder or URL, or --camera N")
    if args.every < 1:
        p.error(f"--every must be at least 1, got {args.every}")
    if args.max_frames is not None and args.max_frames < 1:
        p.error(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.resize is not None and min(args.resize) < 8:
        p.error(f"--resize must be at least 8 8, got {args.resize[0]} {args.resize[1]}")
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.fps is not None and not args.fps > 0:
        p.error(f"--fps must be positive, got {args.fps}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.out is not None:
        check_output_path(args.out)  # before loading anything
    if args.onnx is not None:
        predictor: Any = OnnxPredictor(args.onnx, args.resize)
    else:
        device = resolve_device(args.device)
        model = load_model(args.checkpoint, device, fast=True)
        predictor = TorchPredictor(
            model, model.meta, args.resize, amp=not args.no_amp, cuda_graph=not args.no_cuda_graph
        )
    source = open_source(args.input, camera=args.camera)
    if args.out is None and args.labels is None:
        print("no --out or --labels: measuring only", file=sys.stderr)
    report = run_video(
        source, predictor, args.out, every=args.every, max_frames=args.max_frames,
        alpha=args.alpha, labels_dir=args.labels, codec=args.codec, fps=args.fps,
        pipelined=not args.sequential, progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        return run(args)
    except CheckpointError as e:
        raise SystemExit(f"error: --checkpoint: {e}") from None
    except (VideoError, QuantizationError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    tune_cpu_allocator()  # the network's large buffers are reused instead of page-faulted
    main()
