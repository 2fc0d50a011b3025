"""Training: lr schedule, sampler, exact resume, DDP, outputs and error messages (tiny, CPU)."""

from __future__ import annotations

import io
import json
import math
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_cli
from erfnet.checkpoint import load_model, save_checkpoint
from erfnet.config import RECIPE
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.data.from_args import data_root_from_args
from erfnet.data.transforms import TrainTransform
from erfnet.model import ERFNet
from erfnet.training.resume import InfiniteSampler, SeededDataset, get_rng_state, set_rng_state
from erfnet.training.step import PolyLR, poly_lr, train_step

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
SYNTHETIC_PRESET = train_cli.SYNTHETIC_PRESET


def _parse(argv: list[str]):
    return train_cli.parse_args(train_cli.get_args_parser(), argv)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def full_run(tiny_run: Path) -> Path:
    """An uninterrupted 4-iteration run (the reference for the resume tests): conftest's
    session-wide ``tiny_run``."""
    return tiny_run


# ---------------------------------------------------------------- schedule


def test_poly_lr_start_middle_end():
    base, lo, n = 0.01, 1e-4, 160_000
    assert poly_lr(base, 0, n, 0.9, lo) == pytest.approx(base)
    assert poly_lr(base, n // 2, n, 0.9, lo) == pytest.approx((base - lo) * 0.5**0.9 + lo)
    assert poly_lr(base, n, n, 0.9, lo) == pytest.approx(lo)
    assert poly_lr(base, n + 10, n, 0.9, lo) == pytest.approx(lo)  # clamped after the end

    def lrs_of(sched_iters: int, steps: int, start_state: dict | None = None) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
        sched = PolyLR(opt, sched_iters, 0.9, lo)
        if start_state is not None:
            sched.load_state_dict(start_state)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, sched.state_dict()

    lrs, _ = lrs_of(10, 10)
    assert lrs[0] == base
    assert lrs[5] == pytest.approx((base - lo) * 0.5**0.9 + lo)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] > lo
    # Resumed after 4 steps (through a weights_only round trip): the same values exactly.
    _, state = lrs_of(10, 4)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed, _ = lrs_of(10, 6, torch.load(buf, weights_only=True))
    assert resumed == lrs[4:]


def test_rng_state_round_trip_is_weights_only_safe(tmp_path: Path):
    torch.manual_seed(1)
    np.random.seed(1)
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


# ---------------------------------------------------------------- data order


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_infinite_sampler_order_shards_and_resume():
    s = InfiniteSampler(10, seed=3)
    first = _take(iter(s), 25)
    assert first == _take(iter(InfiniteSampler(10, seed=3)), 25)  # reproducible
    assert sorted(i for i, _ in first[:10]) == list(range(10))  # an epoch is a permutation
    assert [i for i, _ in first[:10]] != [i for i, _ in first[10:20]]  # reshuffled per epoch
    assert [i for i, _ in first[:10]] != list(range(10))
    assert len({seed for _, seed in first}) == 25  # every draw its own augmentation seed
    # Starting at position 13 continues the same stream.
    assert _take(iter(InfiniteSampler(10, seed=3, start=13)), 12) == first[13:25]
    assert s.position(13) == (1, 3)
    # Two ranks: disjoint halves of each epoch (padded like DistributedSampler for odd sizes).
    r0 = [i for i, _ in _take(iter(InfiniteSampler(7, seed=3, rank=0, world_size=2)), 4)]
    r1 = [i for i, _ in _take(iter(InfiniteSampler(7, seed=3, rank=1, world_size=2)), 4)]
    assert set(r0) | set(r1) == set(range(7))
    assert len(set(r0) & set(r1)) == 1  # the one padding duplicate


def test_seeded_dataset_augmentation_is_a_function_of_the_seed(synthetic_root: Path):
    ds = SeededDataset(
        CityscapesDataset(synthetic_root, "train", transform=TrainTransform((32, 64), (64, 128)))
    )
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[(1, 1234)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    ds[(0, 99)]
    b = ds[(1, 1234)]
    c = ds[(1, 4321)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])


# ---------------------------------------------------------------- the step


def test_loss_decreases_when_overfitting_one_batch(synthetic_root: Path, one_thread):
    torch.manual_seed(0)
    ds = CityscapesDataset(
        synthetic_root, "train", transform=TrainTransform((32, 64), (64, 128), photometric=False)
    )
    batch = [ds[i] for i in range(2)]
    images = torch.stack([b["image"] for b in batch])
    labels = torch.stack([b["label"] for b in batch])
    model = ERFNet(dropout=0.0, head_dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum)
    losses = [train_step(model, images, labels, opt) for _ in range(15)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], losses


# ---------------------------------------------------------------- command line


def test_parser_defaults_come_from_the_recipe():
    cfg = _parse([])
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.min_lr, cfg.iters) == (
        RECIPE.lr,
        RECIPE.momentum,
        RECIPE.weight_decay,
        RECIPE.min_lr,
        RECIPE.iters,
    )
    assert cfg.crop_size == RECIPE.crop_size and cfg.scale == RECIPE.scale
    assert cfg.batch_size == RECIPE.batch_size_per_gpu
    assert (cfg.val_interval, cfg.ckpt_interval) == (RECIPE.val_interval, RECIPE.ckpt_interval)
    # --data synthetic is a quick-start preset; an explicit flag still wins.
    syn = _parse(["--data", "synthetic", "--lr", "0.02"])
    assert syn.lr == 0.02 and syn.iters == SYNTHETIC_PRESET["iters"]
    assert syn.crop_size == SYNTHETIC_PRESET["crop_size"]
    assert train_cli.get_args_parser().parse_args(["--resume"]).resume == "latest"
    assert train_cli.get_args_parser().parse_args(["--no-amp"]).amp is False
    text = train_cli.get_args_parser().format_help()
    for flag in ("--crop-size", "--scale", "--resume", "--amp", "--ckpt-interval", "--workers"):
        assert flag in text
    assert "(default: 160000; synthetic: 800)" in text and "(default: 0.0005)" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--crop-size", "600", "1024", "--scale", "512", "1024"], "--crop-size"),
        (["--iters", "0"], "--iters"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--ohem", "0.7", "inf"], "--ohem"),
        (["--ohem", "nan", "100000"], "--ohem"),
        (["--seed", str(2**80)], "--seed"),
        (["--batch-size", "1", "--crop-size", "8", "8"], "one value per channel"),
        (["--resume", "--restart"], "give one of them"),
    ],
)
def test_bad_flag_values_are_rejected(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*argv, "--work-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_root_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(["--data-root", str(missing), "--work-dir", str(tmp_path / "w")])
    msg = str(exc.value.code)
    assert msg.startswith("error:") and str(missing) in msg and "does not exist" in msg


def test_incompatible_checkpoints_are_clear_errors(
    synthetic_root: Path, tmp_path: Path, full_run: Path, tiny_args
):
    base = [
        *tiny_args,
        "--data-root",
        str(synthetic_root),
        "--workers",
        "0",
        "--work-dir",
        str(tmp_path / "w"),
    ]
    other = tmp_path / "other.pth"
    save_checkpoint(
        other, ERFNet(num_classes=5), optimizer={}, scheduler={}, iteration=1, sampler={}
    )
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*base, "--resume", str(other)])
    assert "does not match" in str(exc.value.code) and "num_classes" in str(exc.value.code)
    # best.pth holds weights only: not resumable.
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*base, "--resume", str(full_run / "best.pth")])
    assert "not a training checkpoint" in str(exc.value.code)
    # --resume without a path and nothing in the work dir.
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*base, "--resume"])
    assert "no latest.pth" in str(exc.value.code)


def test_persistent_nonfinite_loss_stops_and_keeps_last_good(
    synthetic_root: Path, tmp_path: Path, monkeypatch, one_thread, tiny_args
):
    real_criterion = train_cli.get_criterion

    def nan_from_the_second_iteration(args, class_names, ignore_index: int):
        criterion, calls = real_criterion(args, class_names, ignore_index), []

        def nan_criterion(logits, labels):
            calls.append(1)
            loss = criterion(logits, labels)
            return loss * float("nan") if len(calls) >= 2 else loss

        return nan_criterion

    # The loss is NaN from the 2nd iteration on.
    monkeypatch.setattr(train_cli, "get_criterion", nan_from_the_second_iteration)
    work = tmp_path / "w"
    args = [
        *tiny_args,
        "--data-root",
        str(synthetic_root),
        "--workers",
        "0",
        "--work-dir",
        str(work),
        "--ckpt-interval",
        "1",
        "--val-interval",
        "100",
        "--max-nonfinite",
        "2",
    ]
    with pytest.raises(SystemExit) as exc:
        train_cli.cli(args)
    assert "non-finite" in str(exc.value.code)
    ckpt = torch.load(work / "latest.pth", weights_only=True)
    assert ckpt["iteration"] == 1  # the last good state, not overwritten by the NaN steps


# ---------------------------------------------------------------- end to end (subprocesses)


def test_end_to_end_outputs(full_run: Path):
    for name in ("latest.pth", "best.pth", "iter_2.pth", "iter_4.pth", "args.json", "train.log"):
        assert (full_run / name).is_file(), name
    assert any((full_run / "tensorboard").iterdir())
    model = load_model(full_run / "best.pth")
    assert model.num_classes == 19 and not model.training
    latest = torch.load(full_run / "latest.pth", weights_only=True)  # weights_only-safe
    assert latest["iteration"] == 4
    assert {"optimizer", "scheduler", "rng", "sampler", "best_miou"} <= set(latest)
    assert latest["sampler"]["consumed"] == 8 and latest["sampler"]["epoch"] == 2
    args = json.loads((full_run / "args.json").read_text())
    assert args["iters"] == 4 and args["crop_size"] == [32, 64]
    # The checkpoint records the size it was validated at: predict's default.
    assert model.meta["test_size"] == {"rule": "keep_ratio", "scale": args["scale"]}
    log = (full_run / "train.log").read_text()
    assert "val at iteration 2" in log and "val at iteration 4" in log


@pytest.mark.parametrize("fault, workers", [("sigterm@2", "1"), ("sigkill@3", "0")])
def test_kill_and_resume_gives_identical_weights(
    fault, workers, synthetic_root: Path, tmp_path: Path, full_run: Path, tiny_args, run_train
):
    """Interrupted (SIGTERM: saves and exits 143; SIGKILL: dies, latest.pth is from iteration 2)
    then resumed to the end: the same weights, bit for bit, as the uninterrupted run."""
    args = [*tiny_args, "--data-root", str(synthetic_root), "--work-dir", str(tmp_path)]
    r = run_train([*args, "--workers", workers], fault=fault)
    if fault.startswith("sigterm"):
        assert r.returncode == 143, r.stderr[-3000:]
        assert "stopped by SIGTERM at iteration 2" in r.stderr
    else:
        assert r.returncode == -9
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["iteration"] == 2
    assert not _same_weights(tmp_path / "latest.pth", full_run / "latest.pth")
    r = run_train([*args, "--workers", "0", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert _same_weights(tmp_path / "latest.pth", full_run / "latest.pth")
    a = torch.load(tmp_path / "latest.pth", weights_only=True)
    b = torch.load(full_run / "latest.pth", weights_only=True)
    assert a["best_miou"] == b["best_miou"]
    for x, y in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])


def test_kill_and_resume_with_accumulation_gives_identical_weights(
    synthetic_root: Path, tmp_path: Path, tiny_args, run_train
):
    """--accum-steps 2: killed (SIGKILL after optimizer step 3; latest.pth is from step 2) and
    resumed, the run ends with the same weights as an uninterrupted one. Resume lands on an
    optimizer-step boundary and the sampler's position counts the micro-batches' images."""
    args = [*tiny_args, "--data-root", str(synthetic_root), "--workers", "0"]
    args[args.index("--batch-size") + 1] = "1"
    args += ["--accum-steps", "2"]
    r = run_train([*args, "--work-dir", str(tmp_path / "full")])
    assert r.returncode == 0, r.stderr[-3000:]
    full = torch.load(tmp_path / "full" / "latest.pth", weights_only=True)
    assert full["iteration"] == 4 and full["sampler"]["consumed"] == 8  # 4 steps x 2 x 1 image

    killed = tmp_path / "killed"
    r = run_train([*args, "--work-dir", str(killed)], fault="sigkill@3")
    assert r.returncode == -9
    part = torch.load(killed / "latest.pth", weights_only=True)
    assert part["iteration"] == 2 and part["sampler"]["consumed"] == 4
    r = run_train([*args, "--work-dir", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _same_weights(killed / "latest.pth", tmp_path / "full" / "latest.pth")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_args(tiny_args) -> list[str]:
    """A 2-iteration DDP run with one image per process: 2 processes, gloo, on the CPU."""
    return [*tiny_args, "--iters", "2", "--batch-size", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def ddp_single_node(
    synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory, ddp_args, train_env_of
) -> Path:
    """`torchrun --nproc_per_node=2` on one node: the reference for the multi-node test."""
    work = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        TRAIN,
        *ddp_args,
        "--data-root",
        str(synthetic_root),
        "--work-dir",
        str(work),
    ]
    r = subprocess.run(
        cmd, cwd=REPO, env=train_env_of(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_two_process_ddp_on_cpu(ddp_single_node: Path):
    ckpt = torch.load(ddp_single_node / "latest.pth", weights_only=True)
    assert ckpt["iteration"] == 2 and ckpt["sampler"]["world_size"] == 2
    args = json.loads((ddp_single_node / "args.json").read_text())
    assert args["world_size"] == 2 and args["total_batch_size"] == 2
    load_model(ddp_single_node / "best.pth")
    # Rank 0 alone logs: one line per logged iteration.
    assert (ddp_single_node / "train.log").read_text().count("iter 2/2") == 1


def test_two_nodes_with_c10d_rendezvous_equal_one_node(
    ddp_single_node: Path, synthetic_root: Path, tmp_path: Path, ddp_args, train_env_of
):
    """`torchrun --nnodes 2 --nproc-per-node 1` twice, meeting through a c10d rendezvous on
    127.0.0.1 (two local processes acting as two nodes, gloo): the same weights, bit for bit, as
    the 2-process single-node run (same ranks, same data shards, same all-reduce)."""
    endpoint = f"127.0.0.1:{_free_port()}"
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=erfnet-two-nodes",
        TRAIN,
        *ddp_args,
        "--data-root",
        str(synthetic_root),
        "--work-dir",
    ]
    procs = [
        subprocess.Popen(
            [*node, str(tmp_path / f"node{i}")],
            cwd=REPO,
            env=train_env_of(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    # Rank 0 (whichever node the rendezvous made node 0) alone writes its work dir.
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if (d / "latest.pth").is_file()]
    assert len(written) == 1
    ckpt = torch.load(written[0] / "latest.pth", weights_only=True)
    assert ckpt["iteration"] == 2 and ckpt["sampler"]["world_size"] == 2
    assert _same_weights(written[0] / "latest.pth", ddp_single_node / "latest.pth")


def test_bad_device_work_dir_and_synthetic_root_are_clear_errors(tmp_path: Path, capsys, tiny_args):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = [*tiny_args, "--data", "synthetic", "--workers", "0"]
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*base, "--device", "foo", "--work-dir", str(tmp_path / "w")])
    assert "--device 'foo'" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*base, "--work-dir", str(a_file)])
    assert exc.value.code == 2 and f"--work-dir '{a_file}'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*base, "--data-root", str(a_file), "--work-dir", str(tmp_path / "w")])
    msg = str(exc.value.code)
    assert msg.startswith("error:") and f"--data-root '{a_file}'" in msg


def test_second_interrupt_is_one_message_not_a_traceback(monkeypatch, capsys):
    def abort(args):
        raise KeyboardInterrupt("second SIGINT: aborting")

    monkeypatch.setattr(train_cli, "main", abort)
    assert train_cli.cli(["--data", "synthetic"]) == 130
    assert capsys.readouterr().err.startswith("error: aborted by a second SIGINT")


def test_resume_with_changed_settings_says_which_apply(
    full_run: Path, synthetic_root: Path, tmp_path: Path, tiny_args, run_train
):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(full_run, work)
    args = [*tiny_args, "--data-root", str(synthetic_root), "--workers", "0"]
    args[args.index("--iters") + 1] = "5"
    r = run_train([*args, "--work-dir", str(work), "--resume", "--lr", "0.5", "--seed", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    log_text = (work / "train.log").read_text()
    assert "--lr 0.1 -> 0.5" in log_text and "checkpoint's values are kept" in log_text
    assert "--seed 0 -> 3" in log_text and "new values apply" in log_text
    assert "--batch-size" not in log_text  # unchanged settings are not reported


def test_a_failing_rank_ends_every_rank_with_one_line(
    synthetic_root: Path, tmp_path: Path, ddp_args, train_env_of
):
    """torchrun, 2 processes: rank 1 is killed after iteration 1. Rank 0 saves latest.pth of
    iteration 1 and stops with one line, no traceback, instead of waiting or a traceback."""
    logs = tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        str(REPO / "tests" / "fault_launcher.py"),
        "sigkill@1:rank1",
        *ddp_args,
        "--iters",
        "4",
        "--data-root",
        str(synthetic_root),
        "--work-dir",
        str(tmp_path / "w"),
    ]
    r = subprocess.run(
        cmd, cwd=REPO, env=train_env_of(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0
    (rank0,) = logs.glob("*/attempt_0/0/stderr.log")
    text = rank0.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert errors[0] == (
        "error: training at iteration 1 failed: another process of this torchrun job failed or"
        " was killed (its output says why); latest.pth of iteration 1 saved. Fix what stopped"
        " it, then continue with --resume"
    )
    assert torch.load(tmp_path / "w" / "latest.pth", weights_only=True)["iteration"] == 1


def test_the_quick_start_set_is_made_in_the_cache_folder_not_home(cache_outside_home: Path):
    """`--data synthetic` without --data-root uses $XDG_CACHE_HOME, which the tests point at a
    temporary folder: no test writes into the user's ~/.cache/erfnet."""
    root = data_root_from_args(_parse(["--data", "synthetic"]))
    assert root.is_relative_to(cache_outside_home) and root.name.startswith("synthetic-")


def test_the_trained_model_carries_the_datas_meta_for_validation():
    """Validation normalises with the model's meta: the model train.py builds carries the
    dataset's (a folder dataset's own mean / std), not the defaults of a network built in code."""
    from types import SimpleNamespace

    from erfnet.checkpoint import complete_meta
    from erfnet.evaluation.inference import model_normalization

    meta = complete_meta({"class_names": ["a", "b"], "mean": [1.0, 2.0, 3.0]}, 2)
    args = SimpleNamespace(seed=0, head="fcn", init_from=None, sync_bn="none")
    start = SimpleNamespace(path=None, ckpt=None)
    proc = SimpleNamespace(dist=SimpleNamespace(distributed=False), device=torch.device("cpu"))
    model = train_cli.build_model(args, meta, start, proc)
    assert model.meta == meta and model_normalization(model)[0] == (1.0, 2.0, 3.0)
