"""Shared fixtures: a tiny synthetic Cityscapes written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from erfnet.data.synthetic import make_synthetic_cityscapes

# Scripts run as subprocesses import erfnet from this checkout, installed (`-e .` in
# requirements.txt) or not.
REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

# (H, W) of the synthetic images and how many per split; small so every test stays fast.
SYNTHETIC_SIZE = (64, 128)
SYNTHETIC_COUNTS = {"train": 4, "val": 2, "test": 1}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a synthetic Cityscapes (4 train / 2 val / 1 test images, 64x128 HxW, seed 0).

    Shared by the whole session: treat it as read-only (copy it to modify files).
    """
    root = tmp_path_factory.mktemp("synthetic") / "cityscapes"
    return make_synthetic_cityscapes(root, size=SYNTHETIC_SIZE, seed=0, **SYNTHETIC_COUNTS)


@pytest.fixture(scope="session")
def random_bn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 19-class ERFNet checkpoint (Cityscapes meta) with random weights and random BatchNorm
    statistics, so that BN folding and int8 ranges see real scales. Read-only."""
    import torch

    from erfnet.checkpoint import cityscapes_meta, save_checkpoint
    from erfnet.model import ERFNet

    torch.manual_seed(0)
    model = ERFNet(num_classes=19)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    path = tmp_path_factory.mktemp("random_bn") / "erfnet19.pth"
    save_checkpoint(path, model.eval(), meta=cityscapes_meta())
    return path
