"""Segment video files, cameras, streams and folders of frames in real time, and time it honestly.

The path has five stages: **decode** (PyAV, FFmpeg's libraries) -> **preprocess** (resize to the
network size in 0-255 space, round, normalise with the checkpoint's mean / std) -> **network**
(logits, resized back to the frame size, argmax) -> **postprocess** (the checkpoint's palette
blended over the frame) -> **encode** (H.264 where this PyAV build has an encoder, else MPEG-4).

``run_video(..., pipelined=True)`` overlaps them: a reader thread decodes and preprocesses, the
main thread runs the network, a writer thread colours and encodes; bounded queues between them
keep memory flat. End-to-end FPS then approaches the slowest stage's rate instead of the sum of
all stages (what "benchmark FPS" quotes leave out). ``pipelined=False`` runs the very same stage
functions one after another, which is the baseline ``benchmark_video`` compares against.

Every stage is timed where it runs; the report gives each stage's mean ms per output frame and
its share of the wall time (in the pipeline the shares add up to more than 100 %: that is the
overlap). The network input is preprocessed exactly like ``(frame - mean) / std`` of the
checkpoint, so a prediction equals ``model((frame - mean) / std).argmax(1)`` frame by frame
(on CUDA the network runs under fp16 autocast by default, which may flip a near tie).

Live sources (cameras, stream URLs) drop the oldest waiting frame when the network falls
behind, so the output stays current instead of lagging further and further.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from erfnet.data.transforms import normalize, resize_image
from erfnet.deploy.exported import load_exported, onnx_session
from erfnet.evaluation.visualize import blend, palette_lut
from erfnet.video.io import (  # noqa: F401  (re-exported: the video path's public names)
    AUTO_CODECS,
    DEFAULT_FPS,
    IMAGE_SUFFIXES,
    STAGES,
    STREAM_SCHEMES,
    FrameSource,
    Size,
    VideoError,
    VideoWriter,
    check_output_path,
    open_source,
    synthetic_clip,
    write_clip,
)

__all__ = [
    "STAGES",
    "FrameSource",
    "OnnxPredictor",
    "TorchPredictor",
    "VideoError",
    "VideoWriter",
    "blend",
    "open_source",
    "preprocess_frame",
    "run_video",
    "write_clip",
]


# --------------------------------------------------------------------------------------------
# Predictors: preprocess (reader thread) and predict (main thread)
# --------------------------------------------------------------------------------------------


def _mean_std(meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def preprocess_frame(
    rgb: torch.Tensor, size: Size | None, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, h, w] float32: resized in 0-255 space and rounded (as mmseg
    resizes the uint8 image), then ``(x - mean) / std``."""
    x = rgb.permute(2, 0, 1)[None]
    if size is not None:
        x = resize_image(x, size)
    return normalize(x, mean, std)


def _labels(logits: torch.Tensor, frame_size: Size) -> torch.Tensor:
    """Logits resized bilinearly to the frame (if needed), argmax, uint8 [H, W]."""
    if tuple(logits.shape[-2:]) != tuple(frame_size):
        logits = F.interpolate(
            logits.float(), size=frame_size, mode="bilinear", align_corners=False
        )
    return logits.argmax(1)[0].to(torch.uint8)


class TorchPredictor:
    """A PyTorch ERFNet (ideally ``erfnet.load_model(path, device, fast=True)``) on its device.

    On CUDA the frame goes up as uint8 from a pinned buffer, preprocessing runs on the GPU, the
    network under fp16 autocast, and with ``cuda_graph`` (the frame size is then fixed) the
    whole frame -> labels computation is captured once in a CUDA graph and replayed.
    """

    backend = "torch"

    def __init__(
        self,
        model: nn.Module,
        meta: dict | None = None,
        network_size: Size | None = None,
        amp: bool = True,
        cuda_graph: bool = True,
    ) -> None:
        self.model = model.eval()
        self.meta = meta if meta is not None else getattr(model, "meta", {}) or {}
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.network_size = tuple(network_size) if network_size else None
        self.amp = amp and self.cuda
        mean, std = _mean_std(self.meta)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.use_graph = cuda_graph and self.cuda
        self._graph: Any = None
        self._graph_size: Size | None = None
        self.notes: list[str] = []

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        frame = torch.from_numpy(np.ascontiguousarray(rgb))
        if self.cuda:  # pinned (cached by PyTorch's host allocator): an async copy in predict
            return frame.pin_memory()
        return preprocess_frame(frame, self.network_size, self.mean, self.std).contiguous(
            memory_format=torch.channels_last
        )

    @torch.inference_mode()
    def _frame_to_labels(self, x: torch.Tensor, frame_size: Size) -> torch.Tensor:
        if self.cuda:
            x = preprocess_frame(x, self.network_size, self.mean, self.std)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.float16, enabled=self.amp, cache_enabled=False):
            logits = self.model(x)
        return _labels(logits, frame_size)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, frame_size: Size) -> np.ndarray:
        if not self.cuda:
            return self._frame_to_labels(x, frame_size).numpy()
        frame = x.to(self.device, non_blocking=True)
        if self.use_graph and self._graph is None:
            self._capture(frame, frame_size)
        if self._graph is not None and self._graph_size == tuple(frame.shape):
            self._static_in.copy_(frame)
            self._graph.replay()
            labels = self._static_out
        else:
            labels = self._frame_to_labels(frame, frame_size)
        return labels.cpu().numpy()  # waits for the GPU: the network stage ends here

    def _capture(self, frame: torch.Tensor, frame_size: Size) -> None:
        """Record frame -> labels once for this frame size; eager mode if capture fails."""
        try:
            self._static_in = frame.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: cuDNN picks its kernels outside the capture
                    self._frame_to_labels(self._static_in, frame_size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_out = self._frame_to_labels(self._static_in, frame_size)
            self._graph, self._graph_size = graph, tuple(frame.shape)
            self.notes.append(f"CUDA graph captured for {frame_size[0]}x{frame_size[1]} frames")
        except RuntimeError as e:  # e.g. an op that cannot be captured: stay eager
            self.use_graph = False
            self.notes.append(f"CUDA graph not used ({str(e).splitlines()[0]}); eager mode")


class OnnxPredictor:
    """An exported ONNX model (fp32 or int8) on onnxruntime's CPU provider.

    The normalisation and palette come from the model's metadata (written by
    scripts/export_onnx.py); the graph must take a normalised ``input`` [N, 3, H, W].
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, network_size: Size | None = None, threads: int = 0):
        path = Path(path)
        if not path.is_file():
            raise VideoError(f"--onnx {path}: no such file")
        try:
            self.session = onnx_session(path, threads)
        except Exception as e:  # onnxruntime raises its own exception types
            raise VideoError(f"--onnx {path}: cannot load: {str(e).splitlines()[0]}") from None
        self.meta = load_exported(path, threads).meta
        self.network_size = tuple(network_size) if network_size else None
        self.mean, self.std = _mean_std(self.meta)
        self.input_name = self.session.get_inputs()[0].name
        self.device = torch.device("cpu")
        self.notes: list[str] = []

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        x = preprocess_frame(torch.from_numpy(np.ascontiguousarray(rgb)), self.network_size,
                        self.mean, self.std)  # fmt: skip
        return x.numpy()

    def predict(self, x: np.ndarray, frame_size: Size) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: x})[0]
        return _labels(torch.from_numpy(logits), frame_size).numpy()


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class _Timer:
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - start
        return now


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put without blocking forever: False once the run is being stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def run_video(
    source: FrameSource,
    predictor: TorchPredictor | OnnxPredictor,
    out: str | Path | None = None,
    *,
    every: int = 1,
    max_frames: int | None = None,
    alpha: float = 0.5,
    labels_dir: str | Path | None = None,
    codec: str = "auto",
    fps: float | None = None,
    pipelined: bool = True,
    queue_size: int = 4,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Segment every ``every``-th frame of ``source`` (at most ``max_frames`` of them), write the
    palette blended over the frame to ``out`` at the source's rate / ``every`` and, with
    ``labels_dir``, one class-index PNG per frame (``<frame index>.png``). Returns the report
    (``format_report`` prints it). Ctrl-C stops cleanly with what was written so far."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if out is not None:
        check_output_path(out)
    labels_dir = Path(labels_dir) if labels_dir is not None else None
    if labels_dir is not None:
        if labels_dir.exists() and not labels_dir.is_dir():
            raise VideoError(f"--labels {labels_dir} is a file, not a folder")
        labels_dir.mkdir(parents=True, exist_ok=True)
    lut = palette_lut(predictor.meta["palette"], len(predictor.meta["class_names"]))
    out_fps = (fps or source.fps) / every
    timer = _Timer()
    state: dict[str, Any] = {"writer": None, "frames": 0, "dropped": 0, "size": None}
    total = source.frames // every if source.frames else None
    if max_frames:
        total = min(total, max_frames) if total else max_frames
    bar = None
    if progress:
        bar = tqdm(total=total, unit="frame", desc="video", dynamic_ncols=True)

    def read() -> Iterator[tuple[int, np.ndarray, Any]]:
        """Decode and preprocess (reader side); yields (frame index, frame, network input)."""
        kept = 0
        frames = iter(source)
        index = 0
        while max_frames is None or kept < max_frames:
            t = time.perf_counter()
            try:
                rgb = next(frames)
            except StopIteration:
                return
            t = timer.add("decode", t)
            if index % every == 0:
                x = predictor.preprocess(rgb)
                timer.add("preprocess", t)
                kept += 1
                yield index, rgb, x
            index += 1

    def write(index: int, rgb: np.ndarray, labels: np.ndarray) -> None:
        """Colour and encode (writer side)."""
        t = time.perf_counter()
        image = blend(rgb, lut[labels], alpha)
        t = timer.add("postprocess", t)
        if out is not None:
            if state["writer"] is None:
                state["writer"] = VideoWriter(out, out_fps, rgb.shape[:2], codec)
                if log:
                    name = state["writer"].codec
                    kind = "H.264" if "264" in name else "fallback: no H.264 encoder here"
                    kind = kind if codec == "auto" else "as asked"
                    log(f"writing {out} with {name} ({kind}) at {out_fps:g} fps")
            state["writer"].write(image)
        if labels_dir is not None:
            Image.fromarray(labels).save(labels_dir / f"{index:06d}.png", compress_level=1)
        timer.add("encode", t)
        state["frames"] += 1
        if bar is not None:
            bar.update(1)

    def network(rgb: np.ndarray, x: Any) -> np.ndarray:
        t = time.perf_counter()
        labels = predictor.predict(x, rgb.shape[:2])
        timer.add("network", t)
        state["size"] = rgb.shape[:2]
        return labels

    start = time.perf_counter()
    interrupted = False
    try:
        if pipelined:
            interrupted = _run_pipelined(read, network, write, source.live, queue_size, state)
        else:
            try:
                for index, rgb, x in read():
                    write(index, rgb, network(rgb, x))
            except KeyboardInterrupt:
                interrupted = True
    finally:
        if state["writer"] is not None:
            state["writer"].close()
        if bar is not None:
            bar.close()
        source.close()
    wall = time.perf_counter() - start
    n = state["frames"]
    if n == 0 and not interrupted:
        raise VideoError(f"{source.name}: no frames were decoded")
    report: dict[str, Any] = {
        "source": source.name,
        "mode": "pipelined" if pipelined else "sequential",
        "backend": predictor.backend,
        "device": str(predictor.device),
        "frames": n,
        "dropped": state["dropped"],
        "frame_size": list(state["size"]) if state["size"] else None,
        "network_size": list(predictor.network_size or state["size"] or ()),
        "every": every,
        "out": str(out) if out is not None else None,
        "codec": state["writer"].codec if state["writer"] is not None else None,
        "out_fps": out_fps,
        "wall_s": wall,
        "fps": n / wall if wall > 0 else 0.0,
        "stages": {
            s: {"mean_ms": 1e3 * timer.totals[s] / max(n, 1), "share": timer.totals[s] / wall}
            for s in STAGES
        },
        "interrupted": interrupted,
        "notes": list(predictor.notes),
    }
    return report


def _run_pipelined(
    read: Callable[[], Iterator[tuple[int, np.ndarray, Any]]],
    network: Callable[[np.ndarray, Any], np.ndarray],
    write: Callable[[int, np.ndarray, np.ndarray], None],
    live: bool,
    queue_size: int,
    state: dict[str, Any],
) -> bool:
    """Reader thread -> network on this thread -> writer thread; errors re-raised here."""
    inputs: queue.Queue = queue.Queue(maxsize=queue_size)
    outputs: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()

    def reader() -> None:
        try:
            for item in read():
                if live:  # never fall behind a camera: replace the oldest waiting frame
                    while True:
                        try:
                            inputs.put_nowait(item)
                            break
                        except queue.Full:
                            try:
                                inputs.get_nowait()
                                state["dropped"] += 1
                            except queue.Empty:
                                pass
                        if stop.is_set():
                            return
                elif not _put(inputs, item, stop):
                    return
            _put(inputs, _END, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            _put(inputs, _Failed(e), stop)

    def writer() -> None:
        while True:
            item = outputs.get()
            if item is _END:
                return
            try:
                write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                state["write_error"] = e
                stop.set()
                return

    threads = [threading.Thread(target=reader, daemon=True, name="video-reader"),
               threading.Thread(target=writer, daemon=True, name="video-writer")]  # fmt: skip
    for t in threads:
        t.start()
    interrupted = False
    try:
        while not stop.is_set():
            item = inputs.get()
            if item is _END:
                break
            if isinstance(item, _Failed):
                raise item.error
            index, rgb, x = item
            labels = network(rgb, x)
            if not _put(outputs, (index, rgb, labels), stop):
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if not stop.is_set():  # the writer drains what the network finished, then ends
            outputs.put(_END)
        threads[1].join()
        stop.set()  # tell the reader to stop, and unblock it if it waits on a full queue
        while True:
            try:
                inputs.get_nowait()
            except queue.Empty:
                break
        threads[0].join(timeout=5)
    if "write_error" in state:
        raise state.pop("write_error")
    return interrupted


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
