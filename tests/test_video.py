"""erfnet/video.py and scripts/video.py: a lossless synthetic clip through the real-time path.

The clip is written here with PyAV (ffv1 in .mkv: lossless RGB), so decoded frames equal the
frames drawn; the output is written losslessly too, so each output frame can be compared with
the checkpoint's palette of ``model((frame - mean) / std).argmax(1)`` computed frame by frame.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import erfnet
from erfnet.bench.video import benchmark_video, format_video_benchmark
from erfnet.data.synthetic import synthesize_sample
from erfnet.runtime import cpu_plan
from erfnet.video.pipeline import (
    FrameSource,
    OnnxPredictor,
    TorchPredictor,
    VideoError,
    open_source,
    run_video,
)
from erfnet.video.report import format_report
from scripts import video as video_script

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 128)  # (H, W) of the clip
FRAMES = 8
RATE = 25
# Not the Cityscapes defaults, so that using them (and not the checkpoint's) would be caught.
META = {
    "mean": [10.0, 20.0, 30.0],
    "std": [50.0, 60.0, 70.0],
    "palette": [[1, 2, 3], [250, 10, 10], [10, 250, 10], [10, 10, 250], [200, 200, 0]],
    "class_names": ["a", "b", "c", "d", "e"],
    # Validated at the clip's own size: the scripts' default network size is the frame's.
    "test_size": {"rule": "fixed", "size": list(SIZE)},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)  # random weights whose argmax has four classes on the clip
    model = erfnet.ERFNet(num_classes=5)
    path = tmp_path_factory.mktemp("video_ckpt") / "tiny.pth"
    erfnet.save_checkpoint(path, model, meta=META)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> torch.nn.Module:
    return erfnet.load_model(checkpoint, "cpu", fast=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A street-like clip (a pan across one synthetic scene) written losslessly with PyAV."""
    h, w = SIZE
    scene = synthesize_sample(np.random.default_rng(0), h, w + 4 * FRAMES)[0]
    frames = [np.ascontiguousarray(scene[:, 4 * i : 4 * i + w]) for i in range(FRAMES)]
    path = tmp_path_factory.mktemp("clip") / "street.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = w, h, "bgr0"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path, frames


def decode(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], rate


def reference_labels(model: torch.nn.Module, frame: np.ndarray, net_size=None) -> np.ndarray:
    """The documented computation, by hand: resize in 0-255 space and round, ``(x - mean) /
    std`` with the checkpoint's statistics, the model, logits back to the frame, argmax."""
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    if net_size is not None:
        x = F.interpolate(x, size=net_size, mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255)
    mean = torch.tensor(META["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(META["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        logits = model((x - mean) / std)
    if net_size is not None:
        logits = F.interpolate(logits, size=frame.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


PALETTE = np.array(META["palette"], dtype=np.uint8)


@pytest.mark.parametrize("pipelined", [True, False])
def test_output_frames_are_the_palette_of_the_argmax(model, clip, tmp_path, pipelined) -> None:
    path, frames = clip
    out, labels_dir = tmp_path / "out.mkv", tmp_path / "labels"
    report = run_video(
        open_source(path),
        TorchPredictor(model),
        out,
        alpha=1.0,
        codec="ffv1",
        labels_dir=labels_dir,
        pipelined=pipelined,
    )
    decoded_in, _ = decode(path)
    assert all((a == b).all() for a, b in zip(decoded_in, frames, strict=True))  # lossless input
    written, rate = decode(out)
    assert len(written) == FRAMES and rate == RATE
    assert report["frames"] == FRAMES and report["frame_size"] == list(SIZE)
    seen = set()
    for i, (frame, got) in enumerate(zip(decoded_in, written, strict=True)):
        ref = reference_labels(model, frame)
        seen |= set(np.unique(ref).tolist())
        assert got.shape == (*SIZE, 3)
        np.testing.assert_array_equal(got, PALETTE[ref])
        np.testing.assert_array_equal(np.array(Image.open(labels_dir / f"{i:06d}.png")), ref)
    assert len(seen) > 1  # a constant prediction would not test the palette


def test_blend_and_resize(model, clip, tmp_path) -> None:
    """--resize: the network sees a smaller frame; the blend is round(0.5 frame + 0.5 colour)."""
    path, _ = clip
    out = tmp_path / "blend.mkv"
    net = (32, 64)
    predictor = TorchPredictor(model, network_size=net)
    report = run_video(open_source(path), predictor, out, alpha=0.5, codec="ffv1")
    assert report["network_size"] == list(net) and report["frame_size"] == list(SIZE)
    written, _ = decode(out)
    for frame, got in zip(decode(path)[0], written, strict=True):
        color = PALETTE[reference_labels(model, frame, net)].astype(np.float32)
        want = np.round(0.5 * frame.astype(np.float32) + 0.5 * color).astype(np.uint8)
        np.testing.assert_array_equal(got, want)


def test_every_and_max_frames(model, clip, tmp_path) -> None:
    path, _ = clip
    report = run_video(
        open_source(path), TorchPredictor(model), tmp_path / "e.mkv", every=2, codec="ffv1"
    )
    written, rate = decode(tmp_path / "e.mkv")
    assert len(written) == report["frames"] == FRAMES // 2
    assert rate == RATE / 2  # the output still plays at the source's speed
    report = run_video(open_source(path), TorchPredictor(model), None, max_frames=3)
    assert report["frames"] == 3


def test_folder_of_frames(model, clip, tmp_path) -> None:
    _, frames = clip
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames[:3]):
        Image.fromarray(f).save(folder / f"{i:04d}.png")
    report = run_video(
        open_source(folder),
        TorchPredictor(model),
        tmp_path / "f.mkv",
        alpha=1.0,
        codec="ffv1",
        fps=10,
    )
    written, rate = decode(tmp_path / "f.mkv")
    assert report["frames"] == len(written) == 3 and rate == 10
    np.testing.assert_array_equal(written[2], PALETTE[reference_labels(model, frames[2])])


def test_default_codec_is_h264(model, clip, tmp_path) -> None:
    path, _ = clip
    out = tmp_path / "out.mp4"
    lines: list[str] = []
    report = run_video(open_source(path), TorchPredictor(model), out, log=lines.append)
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        name = stream.codec_context.name
        assert (stream.height, stream.width) == SIZE
        assert sum(1 for _ in c.decode(stream)) == FRAMES
    if "libx264" in av.codecs_available:
        assert name == "h264" and report["codec"] == "libx264"
    assert report["codec"] in lines[0]


def test_report_has_every_stage(model, clip) -> None:
    path, _ = clip
    report = run_video(open_source(path), TorchPredictor(model), None)
    assert set(report["stages"]) == {"decode", "preprocess", "network", "postprocess", "encode"}
    assert all(s["mean_ms"] >= 0 and s["share"] >= 0 for s in report["stages"].values())
    assert report["stages"]["network"]["mean_ms"] > 0 and report["fps"] > 0
    text = format_report(report)
    assert "network" in text and "FPS" in text


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no such video file"):
        open_source(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(VideoError, match="bad.mp4: cannot open"):
        open_source(bad)
    missing = next(n for n in range(90, 200) if not Path(f"/dev/video{n}").exists())
    with pytest.raises(VideoError, match=f"camera {missing}: /dev/video{missing} does not exist"):
        open_source(camera=missing)
    with pytest.raises(VideoError, match="unsupported stream URL scheme 'foo://'"):
        open_source("foo://camera")
    with pytest.raises(VideoError, match="cannot open"):  # loopback, nothing listening
        open_source("rtsp://127.0.0.1:1/stream", timeout_s=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="no frames"):
        open_source(empty)


def test_script_errors_are_one_line(checkpoint: Path, clip, tmp_path: Path) -> None:
    path, _ = clip
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"\x00" * 1000)
    missing = next(n for n in range(90, 200) if not Path(f"/dev/video{n}").exists())
    cases = [
        ([str(tmp_path / "missing.mp4")], "no such video file"),
        ([str(bad)], "cannot open"),
        (["--camera", str(missing)], "does not exist"),
        ([str(path), "--out", str(tmp_path / "file" / "out.mp4")], "is a file, not a folder"),
        ([str(path), "--out", str(tmp_path)], "is a folder"),
        ([str(path), "--out", str(tmp_path / "out.nosuchformat")], "no video format"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            video_script.main([*args, "--checkpoint", str(checkpoint), "--no-progress"])
        assert str(e.value).startswith("error: ") and message in str(e.value), args
    with pytest.raises(SystemExit) as e:  # bad flags: argparse's exit status 2
        video_script.main([str(path), "--checkpoint", str(checkpoint), "--every", "0"])
    assert e.value.code == 2


def test_script_end_to_end(checkpoint: Path, clip, tmp_path: Path) -> None:
    path, _ = clip
    out, report_file = tmp_path / "out.mp4", tmp_path / "fps.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "video.py"),
            str(path),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--json",
            str(report_file),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "end to end" in proc.stdout and "FPS" in proc.stdout
    report = json.loads(report_file.read_text())
    assert report["frames"] == FRAMES and report["mode"] == "pipelined"
    assert len(decode(out)[0]) == FRAMES
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "video.py"),
            str(tmp_path / "nope.mp4"),
            "--checkpoint",
            str(checkpoint),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.mp4'}: no such video file or folder"
    ]


def test_onnx_predictor_matches_torch(model, checkpoint, clip, tmp_path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from erfnet.deploy.onnx import export_onnx

    path, frames = clip
    onnx_path = export_onnx(erfnet.load_model(checkpoint), tmp_path / "m.onnx", *SIZE, meta=META)
    predictor = OnnxPredictor(onnx_path)
    assert predictor.meta["mean"] == META["mean"] and predictor.meta["palette"] == META["palette"]
    x = predictor.preprocess(frames[0])
    got = predictor.predict(x, SIZE)
    ref = reference_labels(model, frames[0])
    assert (got == ref).mean() > 0.999  # onnxruntime's float rounding may flip a near tie
    with pytest.raises(VideoError, match="no such file"):
        OnnxPredictor(tmp_path / "none.onnx")


def test_benchmark_video_smoke(tmp_path: Path) -> None:
    result = benchmark_video(size=(32, 64), frames=3, workdir=tmp_path, rounds=1)
    assert result["sequential"]["frames"] == result["pipelined"]["frames"] == 3
    assert result["speedup"] > 0
    text = format_video_benchmark(result)
    assert "sequential" in text and "pipelined" in text and "FPS" in text
    assert list(tmp_path.iterdir()) == []  # its temporary clip is gone


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single 'error: ...' line of a failed run (no traceback)."""
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("writing")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _feed_then_stall(fifo: Path, data: bytes, release: threading.Event) -> None:
    """A live stream that stalls: ``data``, then nothing (the pipe stays open until release)."""
    fd = os.open(fifo, os.O_WRONLY)  # waits until the reader opens it
    try:
        os.write(fd, data)
        release.wait(120)
    finally:
        os.close(fd)


def test_writer_failure_with_a_stalled_source_ends_in_seconds(checkpoint, tmp_path) -> None:
    """Issue 20.6: the writer fails (an odd frame size mpeg4 cannot encode) while the reader
    waits on a stream that sends nothing more; the run used to hang at 0 % CPU for ever."""
    fifo = tmp_path / "stream.y4m"
    os.mkfifo(fifo)
    h, w = 63, 128  # odd height: mpeg4 refuses it when the writer opens
    data = f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C444\n".encode() + b"FRAME\n" + bytes(3 * h * w)
    release = threading.Event()
    feeder = threading.Thread(target=_feed_then_stall, args=(fifo, data, release), daemon=True)
    feeder.start()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "video.py"),
                str(fifo),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(tmp_path / "out.mp4"),
                "--codec",
                "mpeg4",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        release.set()
        if feeder.is_alive():  # the script never opened the pipe: let the feeder's open return
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(10)
    assert proc.returncode == 1
    assert "needs an even frame size" in _one_error_line(proc)


class _Stalls:
    """Frames, then a wait that only the test ends: a live source that stopped sending."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames, self.release = frames, threading.Event()

    def __call__(self):
        yield from self.frames
        self.release.wait(60)


class _FailsAt:
    """A predictor whose ``n``-th prediction raises (an error inside the network)."""

    def __init__(self, predictor: TorchPredictor, n: int) -> None:
        self.inner, self.n, self.calls = predictor, n, 0
        self.meta, self.backend, self.device = predictor.meta, "torch", predictor.device
        self.network_size, self.notes, self.preprocess = None, [], predictor.preprocess

    def predict(self, x, size):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("boom")
        return self.inner.predict(x, size)


def _broken(frames: list[np.ndarray]):
    yield from frames
    raise VideoError("broken: cannot decode: damaged packet")


def _run_in_thread(result: dict, *args, **kwargs) -> None:
    try:
        result["report"] = run_video(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - examined by the test
        result["error"] = e


@pytest.mark.parametrize("failing", ["writer", "network", "reader"])
def test_any_stage_failure_stops_the_pipeline(model, clip, tmp_path, failing) -> None:
    """Issue 20.6: whichever stage fails, run_video raises its error within seconds (run in a
    thread here, so a hang fails the test instead of stalling it); frames computed before a
    reader or network failure are still written."""
    _, frames = clip
    stalls = _Stalls([np.zeros((63, 128, 3), np.uint8)] if failing == "writer" else frames[:2])
    source = FrameSource("stalls", 25.0, 0, False, stalls)
    predictor = TorchPredictor(model)
    if failing == "network":
        source = FrameSource("clip", 25.0, 0, False, lambda: iter(frames))
        predictor = _FailsAt(predictor, 3)
    if failing == "reader":
        source = FrameSource("broken", 25.0, 0, False, lambda: _broken(frames[:2]))
    out, result = tmp_path / "out.mkv", {}
    codec = "mpeg4" if failing == "writer" else "ffv1"  # mpeg4 refuses an odd frame size
    worker = threading.Thread(
        target=_run_in_thread, args=(result, source, predictor, out), kwargs={"codec": codec}
    )
    worker.start()
    worker.join(30)
    stalls.release.set()
    assert not worker.is_alive(), f"run_video hung after a {failing} failure"
    expected = {"writer": "even frame size", "network": "boom", "reader": "damaged"}[failing]
    assert expected in str(result.get("error"))
    if failing != "writer":
        assert len(decode(out)[0]) == 2  # what was computed before the failure


def test_frames_of_another_size_are_one_line(checkpoint, clip, tmp_path) -> None:
    """A folder whose frames change size mid-stream: one line naming the frame."""
    _, frames = clip
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames[:3]):
        Image.fromarray(frame if i != 1 else frame[:-2]).save(folder / f"{i:03d}.png")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "video.py"),
            str(folder),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "out.mp4"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "frame 1 is 62x128 (HxW)" in _one_error_line(proc)


def _video(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "video.py"), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_outputs_that_are_the_input_are_refused(checkpoint, clip, tmp_path) -> None:
    """Issue 20.9: ``--out IN`` used to overwrite its own input (rc 0)."""
    path, _ = clip
    before = path.read_bytes()
    same = path.parent / "." / path.name  # another spelling of the same file
    proc = _video(str(path), "--checkpoint", str(checkpoint), "--out", str(same))
    assert proc.returncode == 1
    assert f"--out {same} is the input" in _one_error_line(proc)
    assert path.read_bytes() == before
    for flag, value in (("--json", str(path)), ("--labels", str(tmp_path))):
        with pytest.raises(SystemExit) as e:  # --labels: the input folder of frames
            source = str(tmp_path) if flag == "--labels" else str(path)
            video_script.main([source, "--checkpoint", str(checkpoint), flag, value])
        assert "input" in str(e.value) and path.read_bytes() == before
    with pytest.raises(SystemExit) as e:  # an unwritable --json, found before the run
        video_script.main([str(path), "--checkpoint", str(checkpoint), "--json", "/proc/x.json"])
    assert "--json /proc/x.json: cannot write in" in str(e.value)


@pytest.mark.parametrize("fps", ["inf", "nan", "1e-9", "0", "5000"])
def test_fps_out_of_range_is_refused(checkpoint, clip, fps) -> None:
    """``--fps inf`` gave a traceback, ``--fps 1e-9`` silently wrote 24 fps."""
    path, _ = clip
    if fps == "inf":  # once through the real entry point
        proc = _video(str(path), "--checkpoint", str(checkpoint), "--fps", fps)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "--fps must be a frame rate between 0.001 and 1000, got inf" in proc.stderr
        return
    with pytest.raises(SystemExit) as e:
        video_script.main([str(path), "--checkpoint", str(checkpoint), "--fps", fps])
    assert e.value.code == 2


def _variable_rate_clip(path: Path, frames: list[np.ndarray]) -> Path:
    """An ffv1 clip whose frames are 40 ms apart, then 120 ms: a variable frame rate."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "bgr0"
        for pts, f in zip((0, 40, 80, 200), frames, strict=False):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_variable_frame_rate_and_threads(checkpoint, clip, tmp_path) -> None:
    """A variable-frame-rate input is flattened to one rate: a one-line warning says so;
    ``--threads`` sets the network's threads (the thread plan otherwise)."""
    vfr = _variable_rate_clip(tmp_path / "vfr.mkv", clip[1])
    report = tmp_path / "r.json"
    proc = _video(
        str(vfr), "--checkpoint", str(checkpoint), "--threads", "1", "--json", str(report)
    )
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {vfr} has a variable frame rate" in proc.stdout
    assert json.loads(report.read_text())["threads"] == 1
    steady = video_script.main([str(clip[0]), "--checkpoint", str(checkpoint), "--no-progress"])
    assert not any("variable frame rate" in n for n in steady["notes"])
    assert steady["threads"] == (cpu_plan("cpu", 2, None)[1] or torch.get_num_threads())


def _openvino_model(onnx_path: Path, out: Path) -> Path:
    """An OpenVINO IR of ``onnx_path`` with its erfnet metadata, as the exporter writes it."""
    ov = pytest.importorskip("openvino")
    from erfnet.deploy.exported import META_KEY

    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(META), ["erfnet", META_KEY])
    ov.save_model(model, str(out))
    return out


def test_exported_models_through_the_script(model, checkpoint, clip, tmp_path) -> None:
    """``--model`` runs an .onnx or an OpenVINO .xml (through load_exported); ``--onnx`` is
    the old name of the flag."""
    pytest.importorskip("onnxruntime")
    from erfnet.deploy.onnx import export_onnx

    path, frames = clip
    onnx_path = export_onnx(erfnet.load_model(checkpoint), tmp_path / "m.onnx", *SIZE, meta=META)
    xml = _openvino_model(onnx_path, tmp_path / "m.xml")
    for flag, exported, backend in (
        ("--onnx", onnx_path, "onnxruntime"),
        ("--model", xml, "openvino"),
    ):
        labels, report = tmp_path / f"labels_{backend}", tmp_path / f"{backend}.json"
        proc = _video(
            str(path),
            flag,
            str(exported),
            "--labels",
            str(labels),
            "--json",
            str(report),
            "--max-frames",
            "2",
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(report.read_text())["backend"] == backend
        got = np.array(Image.open(labels / "000000.png"))
        # OpenVINO computes in bf16 by default on CPUs that have it (AMX, AVX512-BF16)
        agree = 0.999 if backend == "onnxruntime" else 0.95
        assert (got == reference_labels(model, frames[0])).mean() > agree
    proc = _video(str(path), "--model", str(tmp_path / "none.xml"))
    assert proc.returncode == 1
    assert _one_error_line(proc) == f"error: --model {tmp_path / 'none.xml'}: no such file"
