"""Video input and output with PyAV (FFmpeg's libraries in a wheel): files, folders of frames,
cameras and stream URLs as frame sources; an encoder that picks H.264 where this build has it,
else MPEG-4; a synthetic street clip for tests and benchmarks. ``erfnet.video.pipeline`` runs the
network over them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import av
import numpy as np
from PIL import UnidentifiedImageError

from erfnet.data.decode import IMAGE_SUFFIXES, DatasetError, open_image
from erfnet.errors import UserError

Size = tuple[int, int]
STAGES = ("decode", "preprocess", "network", "postprocess", "encode")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
# Encoders tried for ``codec="auto"``, best first: H.264 (libx264, else any software H.264 this
# FFmpeg build has), then MPEG-4 part 2, which every FFmpeg build can write.
AUTO_CODECS = ("libx264", "libopenh264", "h264", "mpeg4")
# Pixel formats for codecs that need one other than yuv420p; ffv1 / libx264rgb are lossless RGB.
_PIX_FMT = {"ffv1": "bgr0", "libx264rgb": "rgb24", "png": "rgb24", "rawvideo": "rgb24"}
_CODEC_OPTIONS = {
    "libx264": {"preset": "veryfast"},
    "libx264rgb": {"qp": "0", "preset": "veryfast"},
}
DEFAULT_FPS = 30.0  # for a folder of frames or a source that does not say
# Output frame rates every container here stores as given (mp4, mkv, avi, mov; checked with
# PyAV 2025: avi caps rates near 600-1000, below 1/1000 the rate fraction degenerates).
FPS_RANGE = (0.001, 1000.0)


class VideoError(UserError):
    """A source or output that cannot be used; the message names it and says what is wrong."""


@dataclass
class FrameSource:
    """Decoded frames (HxWx3 uint8 RGB) of a file, camera, stream or folder, in order. ``fps`` is
    the source's frame rate (``DEFAULT_FPS`` when it does not say), ``frames`` the frame count when
    known (0 otherwise), ``live`` is True for cameras and streams."""

    name: str
    fps: float
    frames: int
    live: bool
    _frames: Callable[[], Iterator[np.ndarray]]
    _close: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)  # e.g. a variable frame rate, once seen

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._frames()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(
    source: str | Path | None = None, *, camera: int | None = None, timeout_s: float = 10.0
) -> FrameSource:
    """Open a video file, a folder of frames, a stream URL (rtsp://...) or camera ``N``
    (``/dev/videoN`` through v4l2). Raises ``VideoError`` with one clear message otherwise."""
    if camera is not None:
        device = Path(f"/dev/video{int(camera)}")
        if not device.exists():
            raise VideoError(f"camera {camera}: {device} does not exist (no such camera)")
        return _open_av(str(device), f"camera {camera} ({device})", live=True, format="v4l2")
    if source is None:
        raise VideoError("no input: give a video file, a folder of frames, a URL or a camera")
    text = str(source)
    scheme = urlparse(text).scheme.lower()
    if "://" in text:
        if scheme not in STREAM_SCHEMES:
            raise VideoError(
                f"{text}: unsupported stream URL scheme '{scheme}://' "
                f"(expected one of {', '.join(s + '://' for s in STREAM_SCHEMES)})"
            )
        return _open_av(text, text, live=True, timeout=timeout_s)
    path = Path(text)
    if path.is_dir():
        return _open_folder(path)
    if not path.exists():
        raise VideoError(f"{path}: no such video file or folder")
    return _open_av(str(path), str(path), live=False)


def _open_av(target: str, name: str, live: bool, **kwargs: Any) -> FrameSource:
    try:
        container = av.open(target, "r", **kwargs)
    except av.error.FFmpegError as e:
        raise VideoError(f"{name}: cannot open: {e.strerror or e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads inside FFmpeg, off the GIL
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else DEFAULT_FPS
    source = FrameSource(name, fps, int(stream.frames or 0), live, lambda: iter(()))

    def frames() -> Iterator[np.ndarray]:
        watch = _RateWatch()
        try:
            for frame in container.decode(stream):
                if not live and watch.varies(frame.pts):
                    source.notes.append(
                        f"warning: {name} has a variable frame rate; the output is written at"
                        f" one constant rate ({fps:g} fps / --every), so its timing differs"
                    )
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise VideoError(f"{name}: cannot decode: {e.strerror or e}") from None

    source._frames, source._close = frames, container.close
    return source


@dataclass
class _RateWatch:
    """The time steps between a file's frames (in its time base): a second step that differs
    by more than a tick of rounding means a variable frame rate."""

    last_pts: int | None = None
    step: int | None = None
    variable: bool = False

    def varies(self, pts: int | None) -> bool:
        """True once: at the first frame whose step differs from the first step."""
        if pts is None or self.variable:
            return False
        if self.last_pts is not None:
            step = pts - self.last_pts
            if self.step is None:
                self.step = step
            elif abs(step - self.step) > 1:
                self.variable = True
        self.last_pts = pts
        return self.variable


def _open_folder(path: Path) -> FrameSource:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VideoError(f"{path}: no frames ({', '.join(IMAGE_SUFFIXES)}) in this folder")

    def frames() -> Iterator[np.ndarray]:
        for file in files:
            try:
                with open_image(file) as img:  # PIL's size bound, from the header
                    yield np.array(img.convert("RGB"))
            except DatasetError as e:
                raise VideoError(str(e)) from None
            except (UnidentifiedImageError, OSError) as e:
                raise VideoError(f"{file}: cannot read frame: {e}") from None

    return FrameSource(str(path), DEFAULT_FPS, len(files), False, frames)


def check_output_path(path: str | Path) -> Path:
    """``path`` if a video can be written there (its folder is created); else ``VideoError``."""
    path = Path(path)
    if path.is_dir():
        raise VideoError(f"--out {path} is a folder; expected a video file such as out.mp4")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise VideoError(f"--out {path}: {parent} is a file, not a folder")
            break
    try:
        av.format.ContainerFormat(_format_name(path), "w")
    except (ValueError, av.error.FFmpegError):
        raise VideoError(
            f"--out {path}: FFmpeg knows no video format for '{path.suffix or '(no suffix)'}'"
            " (use .mp4, .mkv, .avi, .mov or .webm)"
        ) from None
    return path


def _format_name(path: Path) -> str:
    names = {".mp4": "mp4", ".mkv": "matroska", ".avi": "avi", ".mov": "mov", ".webm": "webm"}
    return names.get(path.suffix.lower(), path.suffix.lower().lstrip(".") or "?")


class VideoWriter:
    """Encode HxWx3 uint8 RGB frames to ``path`` at ``fps``. ``codec="auto"`` picks the first of
    ``AUTO_CODECS`` that opens (H.264 via libx264, preset veryfast, yuv420p; MPEG-4 part 2 as the
    fallback); ``self.codec`` says which. ``ffv1`` (.mkv) and ``libx264rgb`` (qp 0) are lossless
    RGB. Odd frame sizes use yuv444p for H.264."""

    def __init__(self, path: str | Path, fps: float, size: Size, codec: str = "auto") -> None:
        self.path = check_output_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size = (int(size[0]), int(size[1]))
        check_fps(fps)
        rate = Fraction(fps).limit_denominator(1001)
        candidates = AUTO_CODECS if codec == "auto" else (codec,)
        errors = []
        self.container = av.open(str(self.path), "w", format=_format_name(self.path))
        for name in candidates:
            if name not in av.codecs_available:
                errors.append(f"{name}: not in this FFmpeg build")
                continue
            try:
                self.stream = self._add_stream(name, rate)
                self.codec = name
                break
            except (ValueError, av.error.FFmpegError) as e:
                errors.append(f"{name}: {e}")
        else:
            self.container.close()
            self.path.unlink(missing_ok=True)
            raise VideoError(f"--out {self.path}: no usable encoder ({'; '.join(errors)})")

    def _add_stream(self, name: str, rate: Fraction) -> Any:
        h, w = self.size
        odd = h % 2 or w % 2
        pix_fmt = _PIX_FMT.get(name, "yuv444p" if odd and "264" in name else "yuv420p")
        if odd and pix_fmt == "yuv420p":
            raise VideoError(f"{name} needs an even frame size, got {w}x{h} (WxH)")
        stream = self.container.add_stream(name, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.thread_type = "AUTO"
        stream.options = dict(_CODEC_OPTIONS.get(name, {}))
        if name == "mpeg4":
            stream.bit_rate = max(2_000_000, 4 * w * h)  # the default 200 kb/s is a smear
        stream.codec_context.open()  # fail here, not at the first frame, if the codec refuses
        return stream

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != self.size:
            (h, w), (vh, vw) = rgb.shape[:2], self.size
            raise VideoError(
                f"--out {self.path}: a {h}x{w} (HxW) frame for a {vh}x{vw} video; every frame"
                " must have one size"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        self._encode(frame)

    def close(self) -> None:
        try:
            self._encode(None)  # flush the encoder
        finally:
            self.container.close()

    def _encode(self, frame: av.VideoFrame | None) -> None:
        try:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except (av.error.FFmpegError, OSError) as e:  # e.g. the disk is full
            raise VideoError(f"--out {self.path}: cannot write: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0]


def check_fps(fps: float) -> None:
    """``VideoError`` unless ``fps`` is an output frame rate within ``FPS_RANGE``."""
    low, high = FPS_RANGE
    if not low <= fps <= high:  # also refuses nan and inf
        raise VideoError(f"output frame rate {fps:g} fps is outside {low:g}..{high:g} fps")


def write_clip(path: str | Path, frames: Sequence[np.ndarray], fps: float, codec: str) -> Path:
    """Write ``frames`` to a clip (tests and the benchmark's synthetic input)."""
    writer = VideoWriter(path, fps, frames[0].shape[:2], codec)
    for f in frames:
        writer.write(f)
    writer.close()
    return writer.path
