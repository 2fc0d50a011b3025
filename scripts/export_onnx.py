"""Export a trained ERFNet to ONNX (BatchNorm folded, dynamic batch, height and width).

    python scripts/export_onnx.py --checkpoint ckpt.pth --out erfnet.onnx
    python scripts/export_onnx.py --checkpoint ckpt.pth --out erfnet.onnx --opset 18 \\
        --height 512 --width 1024

The graph takes a normalised float32 image ``input`` [N, 3, H, W] (mean / std are in the
checkpoint's meta and in the ONNX metadata) and returns the logits ``logits`` [N, C, H, W].
``--height/--width`` only size the dummy input used for tracing. If onnxruntime is installed the
exported model is run at the dummy size and at a second, odd size, compared with PyTorch and
timed. Needs the ``onnx`` package (``pip install onnx onnxruntime``); the TorchScript exporter is
used (``dynamo=False``), so onnxscript is not needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from erfnet.checkpoint import CheckpointError, load_model
from erfnet.data.cityscapes import DatasetError
from erfnet.deploy.int8 import QuantizationError, format_int8_report, quantize_and_check
from erfnet.deploy.onnx import ONNX_MIN_OPSET, export_onnx
from erfnet.fuse import optimize_for_inference

MIN_OPSET = ONNX_MIN_OPSET


def require(module: str) -> Any:
    """Import an optional dependency or exit with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(
            f"error: exporting to ONNX needs the optional package '{module}': "
            "pip install onnx onnxruntime  (or: pip install -e .[export])"
        ) from None


def export(
    model: torch.nn.Module,
    out: str | Path,
    height: int = 512,
    width: int = 1024,
    opset: int = MIN_OPSET,
    meta: dict | None = None,
) -> Path:
    """``erfnet.fuse.export_onnx``, after checking that onnx is installed."""
    require("onnx")
    return export_onnx(model, out, height, width, opset, meta)


def check_onnxruntime(
    model: torch.nn.Module,
    path: str | Path,
    sizes: Sequence[tuple[int, int]],
    repeats: int = 5,
) -> list[dict[str, Any]]:
    """Compare onnxruntime's logits with PyTorch's at each size and time both (median)."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    plain = model.cpu().float().eval()
    fast = optimize_for_inference(plain)
    rows = []
    for h, w in sizes:
        torch.manual_seed(0)
        x = torch.randn(1, 3, h, w)
        with torch.inference_mode():
            ref = plain(x)
        got = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
        if got.shape != ref.shape:
            raise SystemExit(f"error: ONNX output {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
        ort_s, torch_s = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            session.run(["logits"], {"input": x.numpy()})
            ort_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                fast(x)
            torch_s.append(time.perf_counter() - t)
        rows.append(
            {
                "size": f"{h}x{w}",
                "max_abs_diff": float((got - ref).abs().max()),
                "max_rel_diff": float((got - ref).abs().max() / ref.abs().max()),
                "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
                "onnxruntime_ms": statistics.median(ort_s) * 1e3,
                "torch_fast_ms": statistics.median(torch_s) * 1e3,
            }
        )
    return rows


def quantize(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--int8``: quantize, compare with fp32 on the calibration images, gate, print the table."""
    out = path.with_name(path.stem + "_int8.onnx")
    try:
        report = quantize_and_check(
            path, out, args.calib_data, split=args.calib_split, num_images=args.calib_images,
            size=(args.height, args.width), min_agreement=args.min_agreement,
            repeats=args.repeats, classes=args.calib_classes,
        )  # fmt: skip
    except (QuantizationError, DatasetError) as e:
        raise SystemExit(f"error: --int8: {e}") from None
    print(format_int8_report(report))
    print(f"wrote {out}")
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our checkpoint (.pth)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--height", type=int, default=512, help="dummy input height (default 512)")
    p.add_argument("--width", type=int, default=1024, help="dummy input width (default 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per size for the check")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--int8", action="store_true", help="also write an int8 model (<out>_int8.onnx)")
    p.add_argument("--calib-data", metavar="ROOT", help="--int8: Cityscapes-layout dataset root")
    p.add_argument("--calib-split", default="val", help="--int8: split to calibrate on (val)")
    p.add_argument("--calib-classes", metavar="FILE", default=None,
                   help="--int8: --calib-data is a folder dataset described by this classes"
                   " file (default: a Cityscapes-layout root)")  # fmt: skip
    p.add_argument("--calib-images", type=int, default=16, help="--int8: images (default 16)")
    p.add_argument(
        "--min-agreement", type=float, default=98.0,
        help="--int8: refuse the int8 model if its labels agree with fp32 on fewer than this "
        "percent of pixels of the calibration images (default 98)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.int8 and not args.calib_data:
        p.error("--int8 needs --calib-data ROOT (a Cityscapes-layout dataset to calibrate on)")
    if args.calib_images < 1:
        p.error(f"--calib-images must be at least 1, got {args.calib_images}")
    if not 0.0 <= args.min_agreement <= 100.0:
        p.error(f"--min-agreement must be in [0, 100], got {args.min_agreement}")
    if args.opset < MIN_OPSET:
        p.error(f"--opset must be at least {MIN_OPSET}, got {args.opset}")
    if args.height < 8 or args.width < 8:
        p.error(f"--height/--width must be at least 8, got {args.height}x{args.width}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    require("onnx")  # fail before loading anything
    try:
        model = load_model(args.checkpoint, "cpu")
    except CheckpointError as e:
        raise SystemExit(f"error: --checkpoint: {e}") from None
    t = time.perf_counter()
    path = export(model, args.out, args.height, args.width, args.opset, getattr(model, "meta", {}))
    size_mb = path.stat().st_size / 2**20
    took = time.perf_counter() - t
    print(f"wrote {path} ({size_mb:.1f} MiB, opset {args.opset}) in {took:.1f} s")
    result: dict[str, Any] = {"path": str(path), "opset": args.opset, "size_mb": size_mb}
    if args.int8:
        result["int8"] = quantize(path, args)
    if args.no_check:
        return result
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime is not installed: skipped the check (pip install onnxruntime)")
        return result
    # A second, odd size shows that height and width are really dynamic.
    sizes = [(args.height, args.width), (args.height // 2 + 3, args.width // 2 + 5)]
    result["check"] = check_onnxruntime(model, path, sizes, args.repeats)
    for r in result["check"]:
        print(
            f"{r['size']}: max |onnx - torch| {r['max_abs_diff']:.2e} "
            f"(relative {r['max_rel_diff']:.2e}), argmax agreement "
            f"{100 * r['argmax_agreement']:.3f}%, onnxruntime {r['onnxruntime_ms']:.1f} ms vs "
            f"torch fast {r['torch_fast_ms']:.1f} ms (median of {args.repeats})"
        )
    return result


if __name__ == "__main__":
    main()
