"""Shared fixtures: a tiny synthetic Cityscapes written once per test session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
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
