"""Nothing lost, ever: bad files found early or late, closed pipes, a second run in the same work
dir, DataLoader worker errors, 16-bit / EXIF images, a full disk, clear messages, CPU defaults
(README "What survives what" describes each behaviour).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import erfnet.outputs as outputs_module
import train as train_cli
from erfnet.checkpoint import CheckpointError, load_model, save_checkpoint
from erfnet.data.check import PROGRESS_FROM, check_datasets
from erfnet.data.cityscapes import CityscapesDataset, DatasetError, load_image
from erfnet.model import ERFNet
from erfnet.runtime import cpu_plan
from scripts import predict


@pytest.fixture
def data(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synthetic dataset."""
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    return root


def _files(root: Path, split: str, kind: str = "leftImg8bit") -> list[Path]:
    """The images (or with kind "gtFine" the _labelIds.png) of ``split``, sorted."""
    pattern = "*_labelIds.png" if kind == "gtFine" else "*.png"
    return sorted((root / kind / split).rglob(pattern))


def tiny_run_args(tiny: tuple[str, ...], root: Path, work: Path, *extra: str) -> list[str]:
    """The tiny run's flags on the dataset ``root`` into ``work``, in the main process."""
    return [*tiny, "--data-root", str(root), "--work-dir", str(work), "--workers", "0", *extra]


@pytest.fixture
def run_args(tiny_args) -> Callable[..., list[str]]:
    """``run_args(root, work, *extra)``: ``tiny_run_args`` of the tiny run."""
    return partial(tiny_run_args, tiny_args)


def _png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit PNG (RGB for HxWx3, grey for HxW): PIL cannot write 16-bit RGB."""
    h, w = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- 1. bad files, early or late


def test_the_check_shows_progress_on_large_datasets_and_skips_others(synthetic_root: Path, capsys):
    ds = CityscapesDataset(synthetic_root, "train")
    ds.samples = ds.samples * (PROGRESS_FROM // len(ds.samples) + 1)  # as many files as a big one
    no_samples = torch.utils.data.TensorDataset(torch.zeros(2))
    assert check_datasets({"train": ds, "other": no_samples}) == {
        "train": 2 * len(ds.samples),
        "other": None,
    }
    assert "checking data" in capsys.readouterr().err
    assert check_datasets({"train": ds}, progress=False)
    assert "checking data" not in capsys.readouterr().err


def test_every_bad_file_is_listed_before_the_first_iteration(data: Path, tmp_path: Path, run_args):
    bad_val = _files(data, "val")[0]
    bad_val.write_bytes(bad_val.read_bytes()[:200])  # truncated
    not_an_image = _files(data, "train")[0]
    not_an_image.write_text("not an image")
    label = _files(data, "train", "gtFine")[1]
    Image.open(label).resize((32, 16)).save(label)  # the wrong size
    work = tmp_path / "w"
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(run_args(data, work))
    msg = str(exc.value.code)
    assert msg.startswith("error: the data check found 3 problem(s)")
    for path in (bad_val, not_an_image, label):
        assert str(path) in msg
    assert "--skip-data-check" in msg
    assert not (work / "latest.pth").exists()
    assert "error: the data check found 3 problem(s)" in (work / "train.log").read_text()


def test_a_val_file_broken_later_saves_first_then_one_line(
    data: Path, tmp_path: Path, run_args, run_train
):
    """--skip-data-check stands for a file that changed after the check: validation at
    iteration 2 fails, the checkpoints of iteration 2 are written first, and the error is one
    line (from a DataLoader worker: --workers 1) that train.log holds too."""
    bad = _files(data, "val")[0]
    bad.write_bytes(bad.read_bytes()[:200])
    work = tmp_path / "w"
    args = run_args(data, work, "--skip-data-check")
    args[args.index("--workers") + 1] = "1"
    r = run_train(args)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith("error: validation at iteration 2 failed: cannot decode")
    assert str(bad) in errors[0] and "latest.pth of iteration 2 saved" in errors[0]
    assert torch.load(work / "latest.pth", weights_only=True)["iteration"] == 2
    assert (work / "iter_2.pth").is_file()
    assert errors[0] in (work / "train.log").read_text()


def test_a_train_label_error_in_a_worker_is_one_line(
    data: Path, tmp_path: Path, run_args, run_train
):
    """Label values are checked on decoding (not by the header pass): the error comes from a
    DataLoader worker and reads as with --workers 0."""
    for label in _files(data, "train", "gtFine"):
        Image.fromarray(np.full((64, 128), 200, np.uint8)).save(label)  # not a label id
    outs = []
    for workers in ("0", "2"):
        args = run_args(data, tmp_path / f"w{workers}")
        args[args.index("--workers") + 1] = workers
        r = run_train(args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        outs.append([line for line in r.stderr.splitlines() if line.startswith("error:")])
    assert len(outs[0]) == 1 and len(outs[1]) == 1
    assert "reading a training batch at iteration 0 failed" in outs[1][0]
    assert "values [200] that are not Cityscapes label ids" in outs[1][0]
    assert "nothing saved" in outs[1][0]
    # The same words either way (which file fails first may differ between the two runs).
    assert outs[0][0].split("label '")[0] == outs[1][0].split("label '")[0]


# ---------------------------------------------------------------- 2. Ctrl-C with a closed pipe


def test_ctrl_c_after_the_pipe_reader_died_still_saves(
    synthetic_root: Path, tmp_path: Path, run_args, start_train
):
    args = run_args(synthetic_root, tmp_path, "--iters", "200", "--val-interval", "1000")
    args.remove("--no-progress")  # the tqdm bar writes too
    proc = start_train(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in proc.stdout:  # until the loop runs
            if b"iter 1/200" in line:
                break
        proc.stdout.close()  # `| tee log` stopped by the same Ctrl-C
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130
    finally:
        proc.kill()
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["iteration"] >= 1
    assert "stopped by SIGINT" in (tmp_path / "train.log").read_text()


# ---------------------------------------------------------------- 3. one run per work dir


def test_a_second_run_in_the_same_work_dir_stops_at_once(
    synthetic_root: Path, tmp_path: Path, run_args, run_train, start_train
):
    args = run_args(synthetic_root, tmp_path, "--iters", "1000", "--val-interval", "1000")
    holder = start_train(args, stderr=subprocess.PIPE, text=True)
    try:
        for line in holder.stderr:
            if "training for" in line:
                break
        holder.send_signal(signal.SIGSTOP)  # holds the lock, idle: no CPU taken from the test
        r = run_train(args)
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"error: --work-dir '{tmp_path}' is in use by another training run (pid {holder.pid}"
            f" on host {socket.gethostname()}); wait for it to finish or stop it, or choose"
            " another --work-dir"
        )
        settings = json.loads((tmp_path / "args.json").read_text())
        assert settings["iters"] == 1000  # the holder's, untouched
        assert (tmp_path / "train.log").read_text().count("run settings") == 1
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    r = run_train([*args, "--iters", "1", "--restart"])  # a crashed holder's lock is no obstacle
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------- 5. images that are not 8-bit


def test_16bit_images_read_as_their_high_byte(data: Path):
    ds = CityscapesDataset(data, "val")
    path = ds.samples[0].image
    image8 = np.asarray(Image.open(path).convert("RGB"))
    expected = ds.load(0)[0]
    _png16(path, image8.astype(np.uint16) * 256 + 200)  # 16-bit: high byte x, low byte 200
    assert torch.equal(load_image(path), expected)
    assert torch.equal(ds[0]["image"], CityscapesDataset(data, "val")[0]["image"])
    grey = data / "grey16.png"
    _png16(grey, np.full((4, 6), 40000, np.uint16))
    assert predict.read_rgb(grey).tolist() == np.full((4, 6, 3), 40000 >> 8).tolist()


def test_exif_orientation_is_applied_and_checked(data: Path):
    ds = CityscapesDataset(data, "val")
    s = ds.samples[0]
    upright = np.asarray(Image.open(s.image).convert("RGB"))  # 64x128 as shown
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored as 128x64
    Image.fromarray(np.rot90(upright, 1).copy()).save(s.image, exif=exif.tobytes())
    assert load_image(s.image).permute(1, 2, 0).numpy().tolist() == upright.tolist()
    assert predict.read_rgb(s.image).tolist() == upright.tolist()
    assert check_datasets({"val": ds}, progress=False) == {"val": 4}  # label size agrees
    exif[0x0112] = 1  # now the stored 128x64 is what is shown: the label no longer fits
    Image.fromarray(np.rot90(upright, 1).copy()).save(s.image, exif=exif.tobytes())
    with pytest.raises(DatasetError, match="is 64x128 .* is 128x64"):
        check_datasets({"val": ds}, progress=False)


def test_predict_outputs_are_unique_per_input(synthetic_root: Path, tmp_path: Path):
    src = _files(synthetic_root, "val")[0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(src, folder / "x.png")
    Image.open(src).convert("RGB").save(folder / "x.jpg")
    shutil.copy(src, folder / "y.png")
    ckpt = tmp_path / "m.pth"
    save_checkpoint(ckpt, ERFNet().eval())
    out = tmp_path / "out"
    written = predict.main(
        [
            str(folder),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--scale",
            "32",
            "64",
            "--device",
            "cpu",
        ]
    )
    names = sorted(p.name for p in written)
    assert names == sorted(p.name for p in out.iterdir())  # nothing overwritten
    assert names == [
        "x.jpg_blend.png",
        "x.jpg_color.png",
        "x.png_blend.png",
        "x.png_color.png",
        "y_blend.png",
        "y_color.png",
    ]


# ---------------------------------------------------------------- 6. full disk, .tmp, keep-ckpts


class _FullDiskFile:
    """A file whose writes stop half way with ENOSPC, like a disk that fills up."""

    def __init__(self, path, mode):
        self._f = open(path, mode)  # noqa: SIM115 - closed by __exit__

    def write(self, data) -> int:
        self._f.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_full_disk_is_one_line_and_the_previous_checkpoint_stays(
    data: Path, tmp_path: Path, monkeypatch, capsys, run_args
):
    work = tmp_path / "w"
    work.mkdir()
    stale = work / ".latest.pth.99999.deadbeef.tmp"  # a write killed by SIGKILL
    stale.write_bytes(b"x" * 1000)
    latest_writes = []

    def open_filling_up(path, mode="r", *args, **kwargs):  # the 2nd latest.pth meets a full disk
        if ".latest.pth." in str(path):
            latest_writes.append(path)
            if len(latest_writes) == 2:
                return _FullDiskFile(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(outputs_module, "open", open_filling_up, raising=False)  # the writer
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(run_args(data, work, "--val-interval", "100", "--ckpt-interval", "1"))
    msg = str(exc.value.code)
    assert msg.startswith("error: no space left on the device of")
    assert "writing latest.pth needs" in msg and " MB (" in msg and "MB free" in msg
    assert "the previous latest.pth is intact" in msg
    assert torch.load(work / "latest.pth", weights_only=True)["iteration"] == 1
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]  # stale one and new one
    log_text = (work / "train.log").read_text()
    assert "removed 1 stale .tmp file(s)" in log_text and "error: no space left" in log_text


def test_a_really_full_tmpfs(synthetic_root: Path, tmp_path: Path, run_args, run_train):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        r = run_train(run_args(synthetic_root, small / "w"))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        error = r.stderr.strip().splitlines()[-1]
        assert error.startswith("error: no space left on the device of"), error
        assert "MB free" in error
        assert not [p for p in (small / "w").iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_keep_ckpts_default_bounds_disk_use(synthetic_root: Path, tmp_path: Path, run_args):
    assert train_cli.get_args_parser().get_default("keep_ckpts") == 3
    args = run_args(synthetic_root, tmp_path, "--iters", "5", "--val-interval", "100")
    args[args.index("--ckpt-interval") + 1] = "1"
    assert train_cli.cli(args) == 0
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["best.pth", "iter_3.pth", "iter_4.pth", "iter_5.pth", "latest.pth"]


# ---------------------------------------------------------------- 7. messages


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "the file is empty (0 bytes)"),
        (b"epoch 3 loss 0.2\n", "not a PyTorch file (it starts with b'epoch 3 '"),
    ],
    ids=["empty", "text"],
)
def test_files_that_are_not_checkpoints_say_so(tmp_path: Path, content, expected):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(
            ["--data", "synthetic", "--work-dir", str(tmp_path / "w"), "--resume", str(path)]
        )
    msg = str(exc.value.code)
    assert msg.startswith(f"error: cannot read checkpoint {path}: {expected}"), msg
    assert "IndexError" not in msg and "EOFError" not in msg


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_blocked_pickle_names_the_global_not_torchs_advice(tmp_path: Path):
    path = tmp_path / "evil.pth"
    meta = {"note": "x" * 500, "payload": _Payload()}  # a long preamble must not hide the name
    torch.save({"model": {}, "model_args": {}, "meta": meta}, path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "Unsupported global: posix.getcwd" in msg and "weights_only=False" not in msg


def test_our_own_bare_state_dict_is_not_told_to_convert(tmp_path: Path):
    path = tmp_path / "sd.pth"
    torch.save(ERFNet().state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "bare ERFNet state_dict()" in msg and "save_checkpoint" in msg
    assert "convert" not in msg


@pytest.mark.parametrize("device", ["mps", "meta", "cuda"])
def test_devices_this_machine_lacks_are_one_error_line(device: str, tmp_path: Path):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(["--data", "synthetic", "--device", device, "--work-dir", str(tmp_path)])
    assert str(exc.value.code).startswith(f"error: --device {device}")


def test_resume_with_a_new_lr_logs_and_records_the_kept_one(
    synthetic_root: Path, tmp_path: Path, run_args
):
    base = run_args(synthetic_root, tmp_path, "--iters", "1", "--val-interval", "100")
    assert train_cli.cli(base) == 0
    kept = json.loads((tmp_path / "args.json").read_text())["lr"]
    assert train_cli.cli([*base, "--iters", "2", "--resume", "--lr", str(kept * 5)]) == 0
    assert json.loads((tmp_path / "args.json").read_text())["lr"] == kept
    log_text = (tmp_path / "train.log").read_text()
    assert f"-> {kept * 5:g}" in log_text and "checkpoint's values are kept" in log_text
    training_lines = [line for line in log_text.splitlines() if "training for" in line]
    assert training_lines[-1].split("lr ")[1].startswith(f"{kept:g},")


def test_nonfinite_and_second_sigint_never_point_at_a_missing_file(
    synthetic_root: Path, tmp_path: Path, monkeypatch, capsys, run_args
):
    def nan_criterion(args, class_names, ignore_index):
        return lambda logits, labels: logits.sum() * float("nan")

    monkeypatch.setattr(train_cli, "get_criterion", nan_criterion)
    work = tmp_path / "w"
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(run_args(synthetic_root, work, "--max-nonfinite", "1"))
    assert "No checkpoint was written" in str(exc.value.code)
    assert "latest.pth" not in str(exc.value.code)

    def abort(args):
        raise KeyboardInterrupt("second SIGINT: aborting")

    monkeypatch.setattr(train_cli, "main", abort)
    assert train_cli.cli(["--data", "synthetic", "--work-dir", str(work)]) == 130
    assert "No checkpoint was written" in capsys.readouterr().err
    save_checkpoint(work / "latest.pth", ERFNet())
    assert train_cli.cli(["--data", "synthetic", "--work-dir", str(work)]) == 130
    assert f"{work / 'latest.pth'}, is intact" in capsys.readouterr().err


# ---------------------------------------------------------------- 8. CPU oversubscription


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_defaults_leave_a_core_free(cores: int, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    workers, threads = cpu_plan("cpu", None, None, cores)
    assert threads >= 1 and workers >= 0
    assert threads + workers <= max(1, cores - 1)
    # An explicit --workers still leaves room; $OMP_NUM_THREADS is honoured.
    workers, threads = cpu_plan("cpu", 2, None, cores)
    assert workers == 2 and threads == max(1, cores - 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_plan("cpu", None, None, cores)[1] is None


def test_the_shared_cpu_benchmark_reports_idle_and_busy(tmp_path: Path):
    from scripts import benchmark

    out = tmp_path / "b.json"
    benchmark.main(["--sections", "shared_cpu", "--quick", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["shared_cpu"]
    assert [r["load"] for r in rows] == ["idle", "1 busy process"]
    assert all(r["s_per_it"] > 0 and "threads" in r["settings"] for r in rows)


# ---------------------------------------------------------------- earlier runs, stops, failures


def test_a_new_run_never_overwrites_an_earlier_one(
    synthetic_root: Path, tmp_path: Path, run_args, run_train
):
    """Without --resume, a work dir holding checkpoints is refused before anything is written;
    --restart moves the earlier run's files into a dated sub-folder, then starts over."""
    work = tmp_path / "w"
    args = run_args(synthetic_root, work, "--iters", "2", "--val-interval", "2")
    assert train_cli.cli(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    r = run_train(args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip() == (
        f"error: --work-dir '{work}' holds the checkpoints of an earlier run (best.pth,"
        " iter_2.pth, latest.pth): add --resume to continue it, choose another --work-dir, or"
        " add --restart to start over (it moves that run's files into a dated sub-folder)"
    )
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == before  # nothing written
    r = run_train([*args, "--restart"])
    assert r.returncode == 0, r.stderr[-3000:]
    (moved,) = work.glob("previous-*")
    assert sorted(p.name for p in moved.iterdir()) == [
        "args.json",
        "best.pth",
        "iter_2.pth",
        "latest.pth",
        "tensorboard",
        "train.log",
    ]
    assert f"--restart: the earlier run's files are now in {moved}" in r.stderr
    assert torch.load(work / "latest.pth", weights_only=True)["iteration"] == 2


def test_failing_commands_write_nothing(synthetic_root: Path, tmp_path: Path, run_args, run_train):
    """--resume with nothing to resume, a --resume file that is not there and a bad flag: one
    line each, and no work dir, lock or log."""
    work = tmp_path / "new"
    for extra, status, expected in (
        (["--resume"], 1, "error: --resume: no latest.pth in the work dir"),
        (["--resume", str(tmp_path / "nowhere.pth")], 1, "error: --resume"),
        (["--ohem", "0.7", "inf"], 2, "train.py: error: --ohem takes THRESH"),
    ):
        r = run_train(run_args(synthetic_root, work, *extra))
        assert r.returncode == status and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1].startswith(expected), r.stderr[-3000:]
        assert not work.exists()


def test_ctrl_c_while_importing_is_one_line(tmp_path: Path, train_env_of):
    """SIGINT while torch is still importing: exit 130 and one line, no KeyboardInterrupt
    traceback, nothing written."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        str(repo / "train.py"),
        "--data",
        "synthetic",
        "--work-dir",
        str(tmp_path / "w"),
    ]
    proc = subprocess.Popen(cmd, cwd=repo, env=train_env_of(), stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # -X importtime: one line per module imported
            if "torch" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    lines = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert lines == ["error: stopped by SIGINT while starting; no training was done"], rest[-3000:]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "when, expected",
    [
        ("check", "stopped by SIGTERM before training began; nothing saved"),
        ("batch", "stopped by SIGTERM at iteration 0; nothing saved (no iteration done)."),
    ],
)
def test_sigterm_in_the_data_check_or_the_first_batch_stops_at_once(
    when, expected, synthetic_root: Path, tmp_path: Path, run_args, run_train
):
    r = run_train(run_args(synthetic_root, tmp_path), fault=f"sigterm@{when}")
    assert r.returncode == 143, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].endswith(expected), r.stderr[-3000:]
    assert "iter 1/" not in r.stderr and not (tmp_path / "latest.pth").exists()


def test_sigterm_during_validation_abandons_it_and_resume_runs_it_first(
    synthetic_root: Path, tmp_path: Path, run_args, run_train
):
    """A signal at the first validation image: no waiting for the rest of the validation;
    latest.pth of the completed iteration is saved and --resume validates it first."""
    args = run_args(synthetic_root, tmp_path)
    r = run_train(args, fault="sigterm@val")
    assert r.returncode == 143, r.stderr[-3000:]
    assert "stopped by SIGTERM at iteration 2; latest.pth saved; its validation runs first" in (
        r.stderr
    )
    assert "val at iteration 2" not in r.stderr and not (tmp_path / "best.pth").exists()
    latest = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert latest["iteration"] == 2 and latest["validation_pending"]
    r = run_train([*args, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.index("val at iteration 2") < r.stderr.index("iter 3/4")
    assert (tmp_path / "best.pth").is_file()


def test_an_error_in_validation_saves_first_then_one_line(
    data: Path, tmp_path: Path, run_args, run_train
):
    """A val image that validation at --scale shrinks to nothing: the data check names it
    before training; without the check, validation fails inside the model, and the iterations
    done are saved before the one-line error."""
    image = _files(data, "val")[0]
    label = (
        image.parents[2].parent
        / "gtFine"
        / "val"
        / image.parent.name
        / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    )
    Image.fromarray(np.full((2, 600, 3), 90, np.uint8)).save(image)
    Image.fromarray(np.full((2, 600), 7, np.uint8)).save(label)  # 7: road
    r = run_train(run_args(data, tmp_path / "checked"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    error = r.stderr.strip().splitlines()[-1]
    assert (
        error.startswith("error: 1 val image(s) would be smaller than 8 pixels")
        and str(image) in error
        and "(2x600 -> 0x128)" in error
    ), error
    assert not (tmp_path / "checked" / "latest.pth").exists()
    work = tmp_path / "unchecked"
    r = run_train(run_args(data, work, "--skip-data-check"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: validation at iteration 2 failed:")
    assert "latest.pth of iteration 2 saved" in errors[0] and "--resume" in errors[0]
    assert torch.load(work / "latest.pth", weights_only=True)["iteration"] == 2


def test_the_lock_does_not_outlive_a_killed_run_with_workers(
    synthetic_root: Path, tmp_path: Path, run_args, run_train, start_train
):
    """kill -9 of the training process while its DataLoader workers live on: an immediate
    --resume gets the work dir (the lock is the training process's alone)."""
    args = run_args(synthetic_root, tmp_path, "--iters", "1000", "--val-interval", "1000")
    args[args.index("--workers") + 1] = "2"
    proc = start_train(args, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "iter 3/1000" in line:  # latest.pth of iteration 2 is written
                break
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    r = run_train([*args[: args.index("--workers")], "--iters", "3", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr or "nothing to do" in r.stderr


def test_a_read_only_work_dir_is_one_line(
    synthetic_root: Path, tmp_path: Path, run_args, run_train
):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ro)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        save_checkpoint(
            ro / "latest.pth", ERFNet(), optimizer={}, scheduler={}, iteration=1, sampler={}
        )
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = run_train(run_args(synthetic_root, ro, "--resume"))
        assert r.returncode == 1 and r.stderr.strip() == (
            f"error: --work-dir {ro}: cannot write in '{ro}': Read-only file system"
        ), r.stderr[-3000:]
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_ctrl_c_in_a_script_is_one_line_and_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from erfnet.errors import cli_main

    def interrupted(args: argparse.Namespace) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli_main(lambda: argparse.ArgumentParser(prog="export.py"), interrupted, [])
    assert e.value.code == 130
    assert capsys.readouterr().err == "export.py: interrupted (Ctrl-C)\n"
