"""scripts/export.py --format pt2: an AOTInductor package, checked and loaded like every export.

SLOW: the one session-scoped fixture compiles one package (tiny checkpoint, 64x128) with a C++
compiler, which takes about a minute on a quiet 2-core machine (its time is printed with -s);
every other test reuses that package. Skipped where no C++ compiler is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from erfnet import fuse, load_model
from erfnet.deploy import aoti
from erfnet.deploy.exported import ExportError, load_exported
from scripts import export

ROOT = Path(__file__).resolve().parents[1]
SIZE = ("64", "128")  # the synthetic dataset's image size

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="a .pt2 export needs a C++ compiler (g++)"
)


@pytest.fixture(scope="session")
def pt2_package(
    tmp_path_factory: pytest.TempPathFactory, random_bn_checkpoint: Path, synthetic_root: Path
) -> dict:
    """The tiny checkpoint compiled once (portable target, fixed 64x128), gated on the
    synthetic set; its report and how long the export took. The FCN head runs in strips of 8
    rows (4 strips of the 32 rows it sees at 64x128), so every test below checks them too."""
    tmp = tmp_path_factory.mktemp("pt2")
    out, report = tmp / "m.pt2", tmp / "m.json"
    started = time.perf_counter()
    with mock.patch.object(fuse, "CPU_HEAD_ROWS", 8):
        export.main(
            [
                str(random_bn_checkpoint),
                "--out",
                str(out),
                "--size",
                *SIZE,
                "--calib-data",
                str(synthetic_root),
                "--report",
                str(report),
            ]
        )
    seconds = time.perf_counter() - started
    print(f"\n[test_export_pt2] AOTInductor export of the tiny checkpoint: {seconds:.0f} s")
    return {"out": out, "report": json.loads(report.read_text()), "seconds": seconds}


def test_pt2_is_gated_as_fp32_and_carries_the_meta(
    pt2_package: dict, random_bn_checkpoint: Path
) -> None:
    r = pt2_package["report"]
    assert r["accepted"] and r["format"] == "pt2" and r["calibration_files"] == []
    g = r["gate"]
    # The fp32 thresholds: the .pth's mIoU to 0.05 points, 99.99 % of the labels.
    assert g["max_miou_drop"] == 0.05 and g["min_agreement"] == 99.99
    assert g["agreement"] >= 99.99 and abs(g["miou_drop"]) <= 0.05
    model = load_exported(pt2_package["out"])
    assert model.format == "pt2" and model.precision == "fp32" and model.output == "logits"
    assert model.meta == load_model(random_bn_checkpoint).meta
    assert model.input_size == (64, 128)
    metadata = aoti.read_metadata(pt2_package["out"])
    assert metadata[aoti.MARCH_KEY] == "x86-64-v3" and metadata["AOTI_CPU_ISA"] == "AVX2"


def test_pt2_logits_match_the_checkpoint_and_batches_run(
    pt2_package: dict, random_bn_checkpoint: Path
) -> None:
    model = load_exported(pt2_package["out"])
    x = torch.randn(3, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_model(random_bn_checkpoint)(x)
    got = model(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    with pytest.raises(ExportError, match="exported for 64x128"):
        model(torch.randn(1, 3, 32, 64))


def test_eval_scores_the_pt2_with_the_pth_miou(
    pt2_package: dict, random_bn_checkpoint: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    results = {}
    for name, flags in {
        "pt2": ["--model", str(pt2_package["out"])],
        "pth": ["--checkpoint", str(random_bn_checkpoint), "--scale", *SIZE],
    }.items():
        proc = subprocess.run(
            [sys.executable, str(ROOT / "eval.py"), *flags, "--data-root", str(synthetic_root)]
            + ["--workers", "0", "--json", str(tmp_path / f"{name}.json")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["pt2"]["num_images"] == results["pth"]["num_images"] == 2
    assert abs(results["pt2"]["mIoU"] - results["pth"]["mIoU"]) <= 0.05


def test_a_cpu_without_the_packages_instructions_is_refused_in_one_line(
    pt2_package: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the compiled library must not be loaded")

    monkeypatch.setattr(aoti, "cpu_flags", lambda: {"sse2", "sse4_1", "ssse3"})
    monkeypatch.setattr(torch._inductor, "aoti_load_package", never)
    with pytest.raises(ExportError) as e:
        load_exported(pt2_package["out"])
    message = str(e.value)
    assert "\n" not in message and "x86-64-v3" in message and "avx2" in message


def test_a_native_package_records_this_cpus_flags() -> None:
    march, flags = aoti.target_flags("native")
    assert march is None and set(flags) <= aoti.cpu_flags()
    if "avx2" in aoti.cpu_flags():
        assert "avx2" in flags
    assert set(aoti.target_flags("portable")[1]) == set(aoti.MARCH_FLAGS["x86-64-v3"])


def test_a_refused_pt2_leaves_no_file(
    pt2_package: dict,
    random_bn_checkpoint: Path,
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The build's refusal path for a .pt2 (the compile itself replaced by a copy of the
    fixture's package: a second compile would take another minute)."""

    def copy_package(model, out, *args, **kwargs):
        return Path(shutil.copyfile(pt2_package["out"], out))

    monkeypatch.setattr(aoti, "export_pt2", copy_package)
    out, report = tmp_path / "m.pt2", tmp_path / "r.json"
    argv = [str(random_bn_checkpoint), "--out", str(out), "--size", *SIZE]
    argv += ["--calib-data", str(synthetic_root), "--report", str(report)]
    with pytest.raises(SystemExit) as e:
        export.main([*argv, "--max-miou-drop", "-1"])  # no export can pass this
    assert "refused by the accuracy gate" in str(e.value.code) and "\n" not in str(e.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no package, no temp files
    assert json.loads(report.read_text())["accepted"] is False
    # Without --calib-data the package is checked on a random image before it is written.
    done = export.main([str(random_bn_checkpoint), "--out", str(out), "--size", *SIZE])
    assert done["self_check"]["agreement"] >= 99.99 and out.is_file()


def test_pt2_flags_refused_before_any_work(
    random_bn_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:  # a flag bad in itself: argparse's usage + line, exit 2
        export.main(
            [str(random_bn_checkpoint), "--out", str(tmp_path / "m.pt2"), "--precision", "int8"]
        )
    assert e.value.code == 2 and "a .pt2 is fp32" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
