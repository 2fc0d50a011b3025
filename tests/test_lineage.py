"""Licence lineage: converted checkpoints record where their weights came from and under which
terms, ``train.py --init-from`` carries that into the new checkpoints and says so once in
train.log, exports copy it into their metadata, and weights made here carry the project's
licence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train as train_cli
from erfnet.checkpoint import (
    PROJECT_LICENCE,
    combine_licences,
    lineage_meta,
    load_checkpoint,
    save_checkpoint,
)
from erfnet.convert import ERFNET_PYTORCH_TABLE, MMSEG_TABLE
from erfnet.model import ERFNet
from scripts import convert_checkpoint

NC = "CC BY-NC 4.0"


def foreign_state(head: str, table: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """Our ERFNet's weights under a foreign source's names (the converter's table, reversed)."""
    torch.manual_seed(0)
    ours = ERFNet(num_classes=19 if head == "fcn" else 20, head=head).state_dict()
    reverse = {v: k for k, v in table.items() if v is not None}
    out = {}
    for key, value in ours.items():
        module, _, leaf = key.rpartition(".")
        out[f"{reverse[module]}.{leaf}"] = value
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lineage")
    torch.save({"state_dict": foreign_state("fcn", MMSEG_TABLE)}, tmp / "mmseg_erfnet.pth")
    ep = {"module." + k: v for k, v in foreign_state("deconv", ERFNET_PYTORCH_TABLE).items()}
    torch.save(ep, tmp / "erfnet_pretrained.pth")
    convert_checkpoint.main(["--from", "mmseg", str(tmp / "mmseg_erfnet.pth"), str(tmp / "mm.pth")])
    convert_checkpoint.main(
        ["--from", "erfnet_pytorch", str(tmp / "erfnet_pretrained.pth"), str(tmp / "ep.pth")]
    )
    return {"mmseg": tmp / "mm.pth", "erfnet_pytorch": tmp / "ep.pth", "dir": tmp}


def test_converted_checkpoints_record_source_and_terms(converted: dict[str, Path]) -> None:
    mm = load_checkpoint(converted["mmseg"])["meta"]
    assert mm["licence"] == "Apache-2.0"
    assert mm["lineage"] == [
        {
            "from": "mmseg",
            "file": "mmseg_erfnet.pth",
            "licence": "Apache-2.0",
            "url": "https://github.com/open-mmlab/mmsegmentation",
            "how": "converted",
        }
    ]
    ep = load_checkpoint(converted["erfnet_pytorch"])["meta"]
    assert ep["licence"] == NC
    assert [(s["from"], s["licence"]) for s in ep["lineage"]] == [("erfnet_pytorch", NC)]


def test_weights_made_here_carry_the_project_licence(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.pth", ERFNet(num_classes=3))
    meta = load_checkpoint(tmp_path / "m.pth")["meta"]
    assert meta["licence"] == PROJECT_LICENCE == "Apache-2.0" and meta["lineage"] == []
    # --resume keeps what the checkpoint says; an old file without the keys is our own.
    assert lineage_meta({"licence": NC, "lineage": [{"from": "x"}]}) == {
        "licence": NC,
        "lineage": [{"from": "x"}],
    }
    assert lineage_meta({}) == {"licence": PROJECT_LICENCE, "lineage": []}
    assert combine_licences(PROJECT_LICENCE, NC) == NC == combine_licences(NC, PROJECT_LICENCE)


def test_init_from_carries_the_licence_and_logs_it_once(
    converted: dict[str, Path], synthetic_root: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = train_cli.cli(
            [
                "--data",
                "cityscapes",
                "--data-root",
                str(synthetic_root),
                "--head",
                "deconv",
                "--init-from",
                str(converted["erfnet_pytorch"]),
                "--iters",
                "1",
                "--batch-size",
                "1",
                "--crop-size",
                "32",
                "64",
                "--scale",
                "32",
                "64",
                "--val-interval",
                "1",
                "--ckpt-interval",
                "1",
                "--num-vis",
                "0",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--no-progress",
                "--work-dir",
                str(work),
            ]
        )
    finally:
        torch.set_num_threads(old_threads)
    assert code == 0
    for name in ("latest.pth", "best.pth"):
        meta = load_checkpoint(work / name)["meta"]
        assert meta["licence"] == NC, name
        steps = [(s["from"], s["how"]) for s in meta["lineage"]]
        assert steps == [("erfnet_pytorch", "converted"), ("erfnet", "--init-from")], name
    log = (work / "train.log").read_text()
    licence_lines = [line for line in log.splitlines() if "licence:" in line]
    assert len(licence_lines) == 1
    assert NC in licence_lines[0] and "erfnet_pytorch" in licence_lines[0]


def test_exports_copy_the_lineage(converted: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from erfnet.deploy.exported import load_exported
    from scripts import export

    out = tmp_path / "ep.onnx"
    report = export.main(
        [str(converted["erfnet_pytorch"]), "--out", str(out), "--size", "32", "64"]
    )
    assert report["licence"] == NC
    meta = load_exported(out).meta
    assert meta["licence"] == NC and meta["lineage"][0]["from"] == "erfnet_pytorch"
