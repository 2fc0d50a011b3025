"""Shared fixtures: a tiny synthetic Cityscapes written once per test session, train.py's tiny
settings and its subprocess runner (with faults injected by tests/fault_launcher.py), and
reference networks of the checkpoints the converters read."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from erfnet.data.synthetic import make_synthetic_cityscapes
from erfnet.labels import CLASS_NAMES, PALETTE

# Scripts run as subprocesses import erfnet from this checkout, installed (`-e .` in
# requirements.txt) or not.
REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)
TRAIN = str(REPO / "train.py")
FAULT_LAUNCHER = str(REPO / "tests" / "fault_launcher.py")

# (H, W) of the synthetic images and how many per split; small so every test stays fast.
SYNTHETIC_SIZE = (64, 128)
SYNTHETIC_COUNTS = {"train": 4, "val": 2, "test": 1}

# A tiny train.py run: 64x128 synthetic images, 32x64 crops, 2 images per step, 4 iterations,
# validation and checkpoints every 2.
TINY_TRAIN_ARGS = (
    "--data",
    "synthetic",
    "--iters",
    "4",
    "--batch-size",
    "2",
    "--crop-size",
    "32",
    "64",
    "--scale",
    "64",
    "128",
    "--val-interval",
    "2",
    "--ckpt-interval",
    "2",
    "--log-interval",
    "1",
    "--num-vis",
    "1",
    "--no-progress",
)


# The core specs: model, loss, metrics, data, inference, checkpoints, fine-tuning, in this process
# (no subprocess, no optional extra). `python -m pytest -q -n 0 -m core` runs them alone.
CORE_SPEC_MODULES = {
    "test_model.py",
    "test_loss.py",
    "test_metrics.py",
    "test_data.py",
    "test_data_transforms.py",
    "test_folder_data.py",
    "test_custom_classes.py",
    "test_class_weights.py",
    "test_inference.py",
    "test_checkpoint.py",
    "test_finetune.py",
    "test_lineage.py",
    "test_reports.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of ``CORE_SPEC_MODULES`` ``core``."""
    for item in items:
        if item.path.name in CORE_SPEC_MODULES:
            item.add_marker(pytest.mark.core)


@pytest.fixture(scope="session", autouse=True)
def cache_outside_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$XDG_CACHE_HOME for the whole session, train.py's subprocesses included: a
    `--data synthetic` run without --data-root makes its dataset here, not in ~/.cache."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a synthetic Cityscapes (4 train / 2 val / 1 test images, 64x128 HxW, seed 0).

    Shared by the whole session: treat it as read-only (copy it to modify files).
    """
    root = tmp_path_factory.mktemp("synthetic") / "cityscapes"
    return make_synthetic_cityscapes(root, size=SYNTHETIC_SIZE, seed=0, **SYNTHETIC_COUNTS)


# --- train.py as a user runs it ---------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_args() -> tuple[str, ...]:
    """train.py's flags of a tiny run (``TINY_TRAIN_ARGS``); copy them to change one."""
    return TINY_TRAIN_ARGS


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a train.py subprocess: one thread per process (faster on a small
    shared CPU, and the same maths in every run), unbuffered output, plus ``extra``."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def train_command(args: list[str], fault: str | None = None) -> list[str]:
    """``python train.py ARGS``; with ``fault`` ("sigterm@K", "sigint@K" or "sigkill@K") run
    through tests/fault_launcher.py, which sends that signal after the K-th training step."""
    if fault is None:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, FAULT_LAUNCHER, fault, *args]


def run_train_process(
    args: list[str], fault: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    """Run train.py to its end in a subprocess (see ``train_command``); output captured."""
    return subprocess.run(
        train_command(args, fault),
        cwd=REPO,
        env=train_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_train_process(
    args: list[str], fault: str | None = None, **popen: object
) -> subprocess.Popen:
    """Start train.py (see ``train_command``) without waiting; ``popen``: Popen's arguments
    (``stdout``, ``stderr``, ``text``, ...)."""
    return subprocess.Popen(train_command(args, fault), cwd=REPO, env=train_env(), **popen)


@pytest.fixture(scope="session")
def run_train() -> Callable[..., subprocess.CompletedProcess]:
    """``run_train(args, fault=None, **env)``: train.py run to its end in a subprocess, its
    output captured (``run_train_process``)."""
    return run_train_process


@pytest.fixture(scope="session")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work dir of one uninterrupted tiny run (``TINY_TRAIN_ARGS`` on ``synthetic_root``,
    ``--workers 0``), run once per session: the reference of the exact-resume tests and the
    outputs the end-to-end checks read. Read-only (copy it to resume or change it)."""
    work = tmp_path_factory.mktemp("tiny_run")
    args = [*TINY_TRAIN_ARGS, "--data-root", str(synthetic_root), "--workers", "0"]
    r = run_train_process([*args, "--work-dir", str(work)])
    assert r.returncode == 0, r.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def start_train() -> Callable[..., subprocess.Popen]:
    """``start_train(args, fault=None, **popen)``: a train.py subprocess, not waited for."""
    return start_train_process


@pytest.fixture(scope="session")
def train_env_of() -> Callable[..., dict[str, str]]:
    """``train_env_of(**extra)``: the environment train.py subprocesses get (``train_env``)."""
    return train_env


# --- reference networks of the checkpoints the converters read --------------------------------
# Built from each source's documented module tree (the keys and shapes its files hold) and its
# forward, so that a converted model can be compared logit for logit.


# --- mmsegmentation's module tree (mmseg/models/backbones/erfnet.py + FCNHead) ---------------


class MMDownsampler(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout - cin, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU()

    def forward(self, x):
        conv = self.conv(x)
        # mmseg always resizes the pool output to the conv output's size.
        pool = F.interpolate(self.pool(x), conv.shape[2:], mode="bilinear", align_corners=False)
        return self.act(self.bn(torch.cat([conv, pool], 1)))


class MMNonBottleneck1d(nn.Module):
    def __init__(self, ch: int, drop: float = 0.0, dilation: int = 1) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.convs_layers = nn.ModuleList()
        for i in range(2):
            d = 1 if i == 0 else dilation
            self.convs_layers.append(nn.Conv2d(ch, ch, (3, 1), padding=(d, 0), dilation=(d, 1)))
            self.convs_layers.append(nn.ReLU())
            self.convs_layers.append(nn.Conv2d(ch, ch, (1, 3), padding=(0, d), dilation=(1, d)))
            self.convs_layers.append(nn.BatchNorm2d(ch, eps=1e-3))
            self.convs_layers.append(nn.ReLU() if i == 0 else nn.Dropout(drop))

    def forward(self, x):
        out = x
        for layer in self.convs_layers:
            out = layer(out)
        return self.act(out + x)


class MMUpsampler(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MMBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([MMDownsampler(3, 16), MMDownsampler(16, 64)])
        self.encoder.extend(MMNonBottleneck1d(64, 0.1) for _ in range(5))
        self.encoder.append(MMDownsampler(64, 128))
        for _ in range(2):
            self.encoder.extend(MMNonBottleneck1d(128, 0.1, d) for d in (2, 4, 8, 16))
        self.decoder = nn.ModuleList(
            [MMUpsampler(128, 64), MMNonBottleneck1d(64), MMNonBottleneck1d(64)]
            + [MMUpsampler(64, 16), MMNonBottleneck1d(16), MMNonBottleneck1d(16)]
        )

    def forward(self, x):
        for m in [*self.encoder, *self.decoder]:
            x = m(x)
        return x


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class MMFCNHead(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(16, 128))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(128, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class MMSegERFNet(nn.Module):
    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        self.backbone = MMBackbone()
        self.decode_head = MMFCNHead(num_classes)

    def forward(self, x):
        out = self.decode_head(self.backbone(x))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=False)


# --- Eromera/erfnet_pytorch's module tree and forward (train/erfnet.py) ----------------------


class EPDownsampler(nn.Module):
    def __init__(self, ninput: int, noutput: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ninput, noutput - ninput, (3, 3), stride=2, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(noutput, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], 1)))


class EPNonBottleneck1d(nn.Module):
    def __init__(self, chann: int, dropprob: float, dilated: int) -> None:
        super().__init__()
        d = dilated
        self.conv3x1_1 = nn.Conv2d(chann, chann, (3, 1), stride=1, padding=(1, 0), bias=True)
        self.conv1x3_1 = nn.Conv2d(chann, chann, (1, 3), stride=1, padding=(0, 1), bias=True)
        self.bn1 = nn.BatchNorm2d(chann, eps=1e-03)
        self.conv3x1_2 = nn.Conv2d(chann, chann, (3, 1), padding=(d, 0), dilation=(d, 1))
        self.conv1x3_2 = nn.Conv2d(chann, chann, (1, 3), padding=(0, d), dilation=(1, d))
        self.bn2 = nn.BatchNorm2d(chann, eps=1e-03)
        self.dropout = nn.Dropout2d(dropprob)

    def forward(self, x):
        out = F.relu(self.conv3x1_1(x))
        out = F.relu(self.bn1(self.conv1x3_1(out)))
        out = F.relu(self.conv3x1_2(out))
        out = self.bn2(self.conv1x3_2(out))
        if self.dropout.p != 0:
            out = self.dropout(out)
        return F.relu(out + x)


class EPUpsampler(nn.Module):
    def __init__(self, ninput: int, noutput: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(ninput, noutput, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(noutput, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class EPEncoder(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.initial_block = EPDownsampler(3, 16)
        self.layers = nn.ModuleList([EPDownsampler(16, 64)])
        self.layers.extend(EPNonBottleneck1d(64, 0.03, 1) for _ in range(5))
        self.layers.append(EPDownsampler(64, 128))
        for _ in range(2):
            self.layers.extend(EPNonBottleneck1d(128, 0.3, d) for d in (2, 4, 8, 16))
        self.output_conv = nn.Conv2d(128, num_classes, 1, stride=1, padding=0, bias=True)

    def forward(self, x, predict=False):
        out = self.initial_block(x)
        for layer in self.layers:
            out = layer(out)
        return self.output_conv(out) if predict else out


class EPDecoder(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [EPUpsampler(128, 64), EPNonBottleneck1d(64, 0, 1), EPNonBottleneck1d(64, 0, 1)]
            + [EPUpsampler(64, 16), EPNonBottleneck1d(16, 0, 1), EPNonBottleneck1d(16, 0, 1)]
        )
        self.output_conv = nn.ConvTranspose2d(
            16, num_classes, 2, stride=2, padding=0, output_padding=0, bias=True
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.output_conv(x)


class EPNet(nn.Module):
    def __init__(self, num_classes: int = 20) -> None:
        super().__init__()
        self.encoder = EPEncoder(num_classes)
        self.decoder = EPDecoder(num_classes)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (seeded default init, random biases) and random BatchNorm statistics."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            m.reset_parameters()
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.2)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.3, 2.0)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
    return model.eval()


def mmseg_file_dict(ref: MMSegERFNet) -> dict:
    """What mmcv's save_checkpoint writes for an mmseg 0.x model."""
    return {
        "meta": {
            "mmseg_version": "0.20.2",
            "mmcv_version": "1.4.0",
            "iter": 160000,
            "epoch": 1,
            "time": "Fri Nov 26 08:20:56 2021",
            "CLASSES": tuple(CLASS_NAMES),
            "PALETTE": [list(c) for c in PALETTE],
            "hook_msgs": {"last_ckpt": "work_dirs/iter_160000.pth", "best_score": np.float64(0.7)},
        },
        "state_dict": OrderedDict(ref.state_dict()),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.9, "params": [0]}]},
    }


@pytest.fixture(scope="session")
def reference_nets() -> SimpleNamespace:
    """The reference networks (``MMSegERFNet``, ``EPNet``, ``EPEncoder``), ``randomize(model,
    seed)`` and ``mmseg_file_dict(model)`` for the converter and fine-tuning tests."""
    return SimpleNamespace(
        MMSegERFNet=MMSegERFNet,
        EPNet=EPNet,
        EPEncoder=EPEncoder,
        randomize=randomize,
        mmseg_file_dict=mmseg_file_dict,
    )


@pytest.fixture()
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nothing can be written into: a read-only tmpfs as root (root ignores file
    modes), else mode 0555; skipped where neither can be made."""
    path = tmp_path / "readonly"
    path.mkdir()
    if os.geteuid() == 0:
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)]
        if subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


def randomise_bn(model: nn.Module, seed: int = 0, negative: bool = False) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (the one copy), so that BN folding is
    not the identity and a lost buffer shows; ``negative`` makes some gammas negative (max-pool
    and a negative scale do not commute). In place; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                gamma = torch.rand(n, generator=g) + 0.5
                if negative:
                    gamma *= torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)
                m.weight.copy_(gamma)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


@pytest.fixture(scope="session")
def random_bn() -> Callable[..., nn.Module]:
    """``random_bn(model, seed=0, negative=False)``: ``randomise_bn``."""
    return randomise_bn


@pytest.fixture(scope="session")
def random_bn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 19-class ERFNet checkpoint (Cityscapes meta) with random weights and random BatchNorm
    statistics, so that BN folding and int8 ranges see real scales. Read-only."""
    import torch

    from erfnet.checkpoint import cityscapes_meta, save_checkpoint
    from erfnet.model import ERFNet

    torch.manual_seed(0)
    model = randomise_bn(ERFNet(num_classes=19))
    path = tmp_path_factory.mktemp("random_bn") / "erfnet19.pth"
    save_checkpoint(path, model.eval(), meta=cityscapes_meta())
    return path
