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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from erfnet.evaluation.visualize import blend, palette_lut
from erfnet.outputs import atomic_write
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
    check_fps,
    check_output_path,
    open_source,
    write_clip,
)
from erfnet.video.predictors import (  # noqa: F401  (re-exported)
    ExportedPredictor,
    OnnxPredictor,
    TorchPredictor,
    preprocess_frame,
)

# fmt: off
__all__ = ["STAGES", "ExportedPredictor", "FrameSource", "OnnxPredictor", "TorchPredictor",
           "VideoError", "VideoWriter", "blend", "open_source", "preprocess_frame", "run_video",
           "write_clip"]
# fmt: on


@dataclass
class _Timer:
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - start
        return now


@dataclass
class _Stages:
    """The stage functions of one run and what they share: the reader side (decode,
    preprocess), the network, and the writer side (colour, encode); each is timed."""

    source: FrameSource
    predictor: Any
    out: Path | None
    labels_dir: Path | None
    every: int
    max_frames: int | None
    alpha: float
    codec: str
    out_fps: float
    lut: np.ndarray
    log: Callable[[str], None] | None = None
    bar: Any = None
    timer: _Timer = field(default_factory=_Timer)
    writer: VideoWriter | None = None
    frames: int = 0
    dropped: int = 0
    size: Size | None = None

    def read(self) -> Iterator[tuple[int, np.ndarray, Any]]:
        """Decode and preprocess; yields (frame index, frame, network input)."""
        kept = index = 0
        frames = iter(self.source)
        while self.max_frames is None or kept < self.max_frames:
            t = time.perf_counter()
            try:
                rgb = next(frames)
            except StopIteration:
                return
            t = self.timer.add("decode", t)
            if index % self.every == 0:
                x = self.predictor.preprocess(rgb)
                self.timer.add("preprocess", t)
                kept += 1
                yield index, rgb, x
            index += 1

    def network(self, rgb: np.ndarray, x: Any) -> np.ndarray:
        t = time.perf_counter()
        labels = self.predictor.predict(x, rgb.shape[:2])
        self.timer.add("network", t)
        self.size = rgb.shape[:2]
        return labels

    def write(self, index: int, rgb: np.ndarray, labels: np.ndarray) -> None:
        """Colour and encode."""
        t = time.perf_counter()
        image = blend(rgb, self.lut[labels], self.alpha)
        t = self.timer.add("postprocess", t)
        if self.out is not None:
            if self.writer is None:
                self.writer = VideoWriter(self.out, self.out_fps, rgb.shape[:2], self.codec)
                self._log_writer()
            if rgb.shape[:2] != self.writer.size:
                (h, w), (vh, vw) = rgb.shape[:2], self.writer.size
                raise VideoError(
                    f"{self.source.name}: frame {index} is {h}x{w} (HxW) but the video being"
                    f" written ({self.out}) is {vh}x{vw}; every frame must have one size"
                )
            self.writer.write(image)
        if self.labels_dir is not None:
            path = self.labels_dir / f"{index:06d}.png"
            save = partial(Image.fromarray(labels).save, format="PNG", compress_level=1)
            try:  # the one atomic writer: never a half-written frame, never through a link
                atomic_write(path, save, fsync=False)
            except OSError as e:
                raise VideoError(f"--labels: cannot write {path}: {e.strerror or e}") from None
        self.timer.add("encode", t)
        self.frames += 1
        if self.bar is not None:
            self.bar.update(1)

    def _log_writer(self) -> None:
        if self.log and self.writer is not None:
            name = self.writer.codec
            kind = "H.264" if "264" in name else "fallback: no H.264 encoder here"
            kind = kind if self.codec == "auto" else "as asked"
            self.log(f"writing {self.out} with {name} ({kind}) at {self.out_fps:g} fps")


def run_video(
    source: FrameSource,
    predictor: TorchPredictor | ExportedPredictor,
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
    (``format_report`` prints it). Ctrl-C stops cleanly with what was written so far; a failure
    of any stage stops the others and is raised here (one ``VideoError`` line where it is ours).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    out = check_output_path(out) if out is not None else None
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        if labels_dir.exists() and not labels_dir.is_dir():
            raise VideoError(f"--labels {labels_dir} is a file, not a folder")
        labels_dir.mkdir(parents=True, exist_ok=True)
    lut = palette_lut(predictor.meta["palette"], len(predictor.meta["class_names"]))
    out_fps = (fps or source.fps) / every
    run = _Stages(
        source, predictor, out, labels_dir, every, max_frames, alpha, codec, out_fps, lut, log
    )
    if out is not None:
        check_fps(run.out_fps)
    if progress:
        total = source.frames // every if source.frames else None
        if max_frames:
            total = min(total, max_frames) if total else max_frames
        run.bar = tqdm(total=total, unit="frame", desc="video", dynamic_ncols=True)
    start = time.perf_counter()
    interrupted, reader_done = False, True
    try:
        if pipelined:
            interrupted, reader_done = _run_pipelined(run, queue_size)
        else:
            try:
                for index, rgb, x in run.read():
                    run.write(index, rgb, run.network(rgb, x))
            except KeyboardInterrupt:
                interrupted = True
    finally:
        _close(run, reader_done)
    wall = time.perf_counter() - start
    if run.frames == 0 and not interrupted:
        raise VideoError(f"{source.name}: no frames were decoded")
    return _report(run, pipelined, wall, interrupted)


def _close(run: _Stages, reader_done: bool) -> None:
    """Finish the output and close the source (not while a stalled reader is still inside it:
    closing a container under a blocked read is unsafe; the process exit ends that thread)."""
    try:
        if run.writer is not None:
            run.writer.close()
    finally:
        if run.bar is not None:
            run.bar.close()
        if reader_done:
            run.source.close()


def _report(run: _Stages, pipelined: bool, wall: float, interrupted: bool) -> dict[str, Any]:
    n, totals, predictor = run.frames, run.timer.totals, run.predictor
    return {
        "source": run.source.name,
        "mode": "pipelined" if pipelined else "sequential",
        "backend": predictor.backend,
        "device": str(predictor.device),
        "frames": n,
        "dropped": run.dropped,
        "frame_size": list(run.size) if run.size else None,
        "network_size": list(predictor.network_size or run.size or ()),
        "every": run.every,
        "out": str(run.out) if run.out is not None else None,
        "codec": run.writer.codec if run.writer is not None else None,
        "out_fps": run.out_fps,
        "wall_s": wall,
        "fps": n / wall if wall > 0 else 0.0,
        "stages": {
            s: {"mean_ms": 1e3 * totals[s] / max(n, 1), "share": totals[s] / wall} for s in STAGES
        },
        "interrupted": interrupted,
        "notes": list(predictor.notes) + list(run.source.notes),
    }


# The pipeline's threads share one ``_Channel``: its ``stop`` event ends every stage within a
# queue timeout, and the first failure of any stage is the one raised. A reader or network
# failure ends the stream in order (the writer still encodes what was computed before it); a
# writer failure stops everything at once. No stage waits on a queue without a timeout.
_END = object()  # the end of the stream, in order behind the last frame
_STOPPED = object()  # what a get returns once the run is being stopped
_POLL_S = 0.1  # how often a waiting stage looks at the stop event
_READER_JOIN_S = 2.0  # a reader blocked in a stalled stream is left behind after this


@dataclass
class _Channel:
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def fail(self, error: BaseException, stop: bool = True) -> None:
        if not self.errors:
            self.errors.append(error)
        if stop:
            self.stop.set()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put without blocking forever: False once the run is being stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    """Get without blocking forever: ``_STOPPED`` once the run is being stopped."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if stop.is_set():
                return _STOPPED


def _put_latest(q: queue.Queue, item: Any, run: _Stages) -> None:
    """Live sources: never fall behind a camera, replace the oldest waiting frame."""
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            try:
                q.get_nowait()
                run.dropped += 1
            except queue.Empty:
                pass


def _reader(run: _Stages, inputs: queue.Queue, channel: _Channel) -> None:
    try:
        for item in run.read():
            if channel.stop.is_set():
                return
            if run.source.live:
                _put_latest(inputs, item, run)
            elif not _put(inputs, item, channel.stop):
                return
    except BaseException as e:  # noqa: BLE001 - raised by the main thread
        channel.fail(e, stop=False)  # what was decoded before it still flows through
    _put(inputs, _END, channel.stop)


def _writer(run: _Stages, outputs: queue.Queue, channel: _Channel) -> None:
    while True:
        item = _get(outputs, channel.stop)
        if item is _END or item is _STOPPED:
            return
        try:
            run.write(*item)
        except BaseException as e:  # noqa: BLE001 - raised by the main thread
            channel.fail(e)  # nothing downstream to finish: stop every stage now
            return


def _run_pipelined(run: _Stages, queue_size: int) -> tuple[bool, bool]:
    """Reader thread -> network on this thread -> writer thread; the first failure of any of
    them is raised here once all have stopped. Returns (interrupted, reader finished)."""
    inputs: queue.Queue = queue.Queue(maxsize=queue_size)
    outputs: queue.Queue = queue.Queue(maxsize=queue_size)
    channel = _Channel()
    reader = threading.Thread(
        target=_reader, args=(run, inputs, channel), daemon=True, name="video-reader"
    )
    writer = threading.Thread(
        target=_writer, args=(run, outputs, channel), daemon=True, name="video-writer"
    )
    reader.start()
    writer.start()
    interrupted = False
    try:
        while True:
            item = _get(inputs, channel.stop)
            if item is _END or item is _STOPPED:
                break
            index, rgb, x = item
            if not _put(outputs, (index, rgb, run.network(rgb, x)), channel.stop):
                break
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as e:  # noqa: BLE001 - the network failed: finish what was computed
        channel.fail(e, stop=False)
    finally:
        _put(outputs, _END, channel.stop)  # the writer encodes what is queued, then ends
        writer.join()
        channel.stop.set()  # the reader stops at its next frame or queue wait
        reader.join(timeout=_READER_JOIN_S)
    if channel.errors:
        raise channel.errors[0]
    return interrupted, not reader.is_alive()
