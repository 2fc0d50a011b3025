"""Road-anomaly evaluation: exact metrics (against scikit-learn and by hand), each score's formula,
each layout's mask rule, the checkpoint's normalisation, the published resize, bad input, and
scripts/anomaly.py end to end over a pack of two sets, equal to ``erfnet.anomaly_scores``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import erfnet
from erfnet.checkpoint import save_checkpoint
from erfnet.data.synthetic import make_synthetic_anomaly
from erfnet.errors import FlagError, UserError, run_cli
from erfnet.evaluation import anomaly
from erfnet.evaluation.anomaly_metrics import anomaly_metrics
from erfnet.model import ERFNet
from scripts import anomaly as anomaly_cli

SIZE = (32, 64)


def sklearn_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    metrics = pytest.importorskip(
        "sklearn.metrics", reason="scikit-learn (a test-only extra) gives the reference metrics"
    )
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    return (
        metrics.average_precision_score(labels, scores),
        float(np.interp(0.95, tpr, fpr)),
        metrics.roc_auc_score(labels, scores),
    )


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 400))
    scores = rng.integers(0, 1 + seed * 3, n).astype(np.float32)  # few values: many ties
    if seed >= 4:
        scores = np.round(rng.normal(size=n), 1).astype(np.float32)
    labels = rng.random(n) < 0.2
    labels[:2] = [True, False]
    if seed == 3:  # 0.95 x positives is a whole number: the interpolation lands on a flat run
        labels = np.zeros(n, bool)
        labels[rng.choice(n, 20, replace=False)] = True
    m = anomaly_metrics(scores, labels)
    np.testing.assert_allclose(
        (m.auprc, m.fpr95, m.auroc), sklearn_metrics(scores, labels), 0, 1e-12
    )
    assert (m.anomaly_pixels, m.known_pixels) == (labels.sum(), (~labels).sum())


def test_metrics_by_hand_on_a_tiny_case() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.3, 0.1], np.float32)
    labels = np.array([1, 0, 1, 1, 0, 0], bool)
    m = anomaly_metrics(scores, labels)
    # thresholds 0.9 / 0.8 / 0.3 / 0.1: (tp, fp) = (1, 0), (2, 1), (3, 2), (3, 3)
    assert m.auprc == pytest.approx((1 * 1 + 1 * 2 / 3 + 1 * 3 / 5) / 3)
    # ROC (0,0) (0,1/3) (1/3,2/3) (2/3,1) (1,1): 95 % TPR lies 0.85 of the way from 2/3 to 1
    assert m.fpr95 == pytest.approx(1 / 3 + 0.85 / 3)
    assert m.fpr95_step == pytest.approx(2 / 3)
    # anomaly > known pairs: 3 + 2.5 + 1.5 of 9 (a tie counts a half)
    assert m.auroc == pytest.approx(7 / 9)


def test_each_score_follows_its_formula() -> None:
    torch.manual_seed(0)
    z = torch.randn(1, 20, 3, 4) * 3
    t = 1.7
    got = anomaly.scores_from_logits(z, anomaly.SCORES, temperature=t, void=19)
    p = torch.softmax(z.double() / t, 1)
    expected = {
        "msp": 1 - p.max(1).values,
        "maxlogit": -z.double().max(1).values,
        "maxentropy": -(p * p.log()).sum(1),
        "energy": -t * (z.double() / t).exp().sum(1).log(),
        "void": p[:, 19],
    }
    for name in anomaly.SCORES:
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-5, atol=1e-5)
    known = anomaly.scores_from_logits(z, ["msp"], void=19, known_only=True)["msp"]
    torch.testing.assert_close(known, 1 - torch.softmax(z[:, :19], 1).max(1).values)
    with pytest.raises(ValueError):
        anomaly.scores_from_logits(z, ["void"], void=19, known_only=True)


RAW = np.array([[0, 1, 2, 3], [5, 200, 201, 255]], np.uint8)
EXPECTED = {  # 0 known, 1 anomaly, 255 ignored
    "RoadAnomaly21": [[0, 1, 255, 255], [255, 255, 255, 255]],
    "RoadObsticle21": [[0, 1, 255, 255], [255, 255, 255, 255]],
    "FS_LostFound_full": [[0, 1, 255, 255], [255, 255, 255, 255]],
    "fs_static": [[0, 1, 255, 255], [255, 255, 255, 255]],
    "RoadAnomaly": [[0, 255, 1, 255], [255, 255, 255, 255]],
    "LostAndFound": [[255, 0, 1, 1], [1, 1, 255, 255]],
}


def write_set(root: Path, masks: list[np.ndarray], suffix: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels_masks").mkdir()
    for i, mask in enumerate(masks):
        rgb = np.full((*mask.shape, 3), 100, np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"im{i}{suffix}")
        Image.fromarray(mask).save(root / "labels_masks" / f"im{i}.png")
    return root


@pytest.mark.parametrize("folder", list(EXPECTED))
def test_each_layouts_mask_rule(tmp_path: Path, folder: str) -> None:
    bench = anomaly.BY_FOLDER[folder]
    block = np.ones((4, 4), np.uint8)  # 8x16 masks: the network's minimum is 8 pixels a side
    raw, no_anomaly = np.kron(RAW, block), np.zeros((8, 16), np.uint8)
    root = write_set(tmp_path / folder, [raw, no_anomaly], "." + bench.image_type)
    (aset,) = anomaly.find_sets(root)
    assert aset.benchmark is bench
    anomaly.check_set(aset, None)
    assert [e.image.name for e in aset.kept] == [f"im0.{bench.image_type}"]
    assert [p.name for p in aset.skipped] == [f"im1.{bench.image_type}"]  # skipped, counted
    labels = anomaly.read_labels(aset.kept[0].mask, bench.rule, None)
    np.testing.assert_array_equal(labels, np.kron(np.array(EXPECTED[folder], np.uint8), block))
    assert aset.anomaly_pixels == (labels == 1).sum() and aset.known_pixels == (labels == 0).sum()


def test_mask_resize_takes_pixel_centres(tmp_path: Path) -> None:
    raw = np.arange(16, dtype=np.uint8).reshape(4, 4) % 2  # 1 in odd columns
    path = tmp_path / "m.png"
    Image.fromarray(raw).save(path)
    # PIL nearest samples at (i + 0.5) * 2: columns 1 and 3, all anomaly (0 and 2 would be known)
    np.testing.assert_array_equal(anomaly.read_labels(path, "pack", (2, 2)), [[1, 1], [1, 1]])


def test_image_resize_is_torchvisions_on_a_pil_image() -> None:
    from torchvision.transforms import InterpolationMode, Resize

    rgb = (np.random.default_rng(0).random((50, 90, 3)) * 255).astype(np.uint8)
    ours = anomaly.resize_rgb(rgb, (20, 44))
    theirs = np.asarray(Resize((20, 44), InterpolationMode.BILINEAR)(Image.fromarray(rgb)))
    np.testing.assert_array_equal(ours, theirs)


class Spy(nn.Module):
    """Returns constant logits; keeps the input it was given."""

    def __init__(self, meta: dict) -> None:
        super().__init__()
        self.meta, self.seen = meta, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return torch.zeros(x.shape[0], 20, *x.shape[-2:])


@pytest.mark.parametrize(
    "mean,std", [([0.0] * 3, [255.0] * 3), ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])]
)
def test_inputs_are_normalised_with_the_checkpoints_mean_std(mean, std) -> None:
    rgb = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    model = Spy({"mean": mean, "std": std, "class_names": ["c"] * 20})
    anomaly.anomaly_scores(model, rgb, size=None)
    expected = (
        torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - torch.tensor(mean).view(1, 3, 1, 1)
    ) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.seen, expected)
    if std[0] == 255.0:  # erfnet_pytorch: exactly ToTensor's 0-1 scale
        assert float(model.seen.min()) >= 0.0 and float(model.seen.max()) <= 1.0


@pytest.fixture(scope="module")
def void_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An erfnet_pytorch-like checkpoint: 20 outputs, void 19, 0-1 inputs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("anomaly") / "ep.pth"
    meta = {"mean": [0.0] * 3, "std": [255.0] * 3, "void_class": 19}
    save_checkpoint(path, ERFNet(num_classes=20, head="deconv").eval(), meta=meta)
    return path


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pack")
    make_synthetic_anomaly(root / "RoadAnomaly21", 2, (48, 96), seed=0)
    make_synthetic_anomaly(root / "fs_static", 2, (40, 80), seed=1)
    for p in (root / "fs_static" / "images").iterdir():  # the pack's fs_static images are jpg
        Image.open(p).save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    return root


def cli(*argv: object) -> int:
    parser = anomaly_cli.get_args_parser()
    args = parser.parse_args([str(a) for a in argv])
    return run_cli(parser, lambda: anomaly_cli.main(args))


def test_script_over_a_pack_equals_the_notebook_function(pack, void_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        cli("--checkpoint", void_checkpoint, "--data-root", pack, "--size", *SIZE, "--json", out)
        == 0
    )
    printed = capsys.readouterr().out
    assert "protocol: images resized to 32x64" in printed and "'std'" not in printed
    data = json.loads(out.read_text())
    assert set(data["sets"]) == {"RoadAnomaly21", "fs_static"}
    assert data["protocol"]["std"] == [255.0] * 3 and data["protocol"]["size"] == list(SIZE)
    model = erfnet.load_model(void_checkpoint)
    for name, result in data["sets"].items():
        assert set(result["scores"]) == set(anomaly.SCORES)  # "all" with a void output
        images = sorted((pack / name / "images").iterdir())
        for score in ("msp", "void"):
            maps, labels = [], []
            for image in images:
                m = erfnet.anomaly_scores(model, image, score, size=SIZE)
                mask = anomaly.read_labels(
                    pack / name / "labels_masks" / f"{image.stem}.png", "pack", SIZE
                )
                maps.append(m.numpy()[mask != 255])
                labels.append(mask[mask != 255] == 1)
            m = anomaly_metrics(np.concatenate(maps), np.concatenate(labels))
            assert result["scores"][score]["auprc"] == pytest.approx(100 * m.auprc, abs=1e-9)
            assert result["scores"][score]["fpr95"] == pytest.approx(100 * m.fpr95, abs=1e-9)
            assert result["anomaly_pixels"] == m.anomaly_pixels


def test_every_input_form_gives_the_same_map(pack, void_checkpoint) -> None:
    model = erfnet.load_model(void_checkpoint)
    image = sorted((pack / "RoadAnomaly21" / "images").iterdir())[0]
    rgb = np.asarray(Image.open(image).convert("RGB"))
    chw = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    expected = erfnet.anomaly_scores(model, image, size=SIZE)
    assert expected.shape == SIZE and expected.dtype == torch.float32
    for x in (str(image), rgb, Image.open(image), chw, chw[None].float()):
        torch.testing.assert_close(erfnet.anomaly_scores(model, x, size=SIZE), expected)


def test_known_only_and_void_need_a_void_output(pack, random_bn_checkpoint, tmp_path, capsys):
    one = pack / "RoadAnomaly21"
    for flags in (["--known-only"], ["--score", "void"]):
        with pytest.raises(SystemExit) as e:
            cli("--checkpoint", random_bn_checkpoint, "--data-root", one, *flags)
        assert (
            e.value.code == f"error: {' '.join(flags)} needs a void output, and this model"
            " has none (no meta['void_class']; erfnet_pytorch conversions have output 19)"
        )


@pytest.mark.parametrize(
    "fault", ["missing mask", "mask size", "unreadable image", "empty", "unknown"]
)
def test_bad_input_is_one_line_before_the_work(fault, pack, void_checkpoint, tmp_path, monkeypatch):
    root = tmp_path / "RoadAnomaly21"
    shutil.copytree(pack / "RoadAnomaly21", root)
    images = sorted((root / "images").iterdir())
    expected = {
        "missing mask": "no mask",
        "mask size": "is 10x10, its image",
        "unreadable image": "cannot read image",
        "empty": "no image",
        "unknown": "unknown layout 'Mine'",
    }[fault]
    if fault == "missing mask":
        (root / "labels_masks" / f"{images[1].stem}.png").unlink()
    elif fault == "mask size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(
            root / "labels_masks" / f"{images[1].stem}.png"
        )
    elif fault == "unreadable image":
        images[1].write_bytes(b"not a png")
    elif fault == "empty":
        for p in images:
            p.unlink()
    else:
        root = root.rename(tmp_path / "Mine")
    monkeypatch.setattr(anomaly_cli, "score_set", lambda *a: pytest.fail("the work started"))
    with pytest.raises(SystemExit) as e:
        cli("--checkpoint", void_checkpoint, "--data-root", root)
    message = str(e.value.code)
    assert message.startswith("error: ") and expected in message and "\n" not in message


def test_exports_without_logits_or_at_reduced_precision_are_refused(monkeypatch, tmp_path) -> None:
    exported = pytest.importorskip("erfnet.deploy.exported")
    for fake, expected in (
        (SimpleNamespace(output="labels", precision="fp32"), "ends in an argmax"),
        (SimpleNamespace(output="logits", precision="int8"), "has int8 precision"),
    ):
        monkeypatch.setattr(exported, "load_exported", lambda *a, fake=fake: fake)
        with pytest.raises(SystemExit, match=expected):
            cli("--model", tmp_path / "m.onnx", "--data-root", tmp_path)


def test_out_dir_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--out-dir's plots need the optional matplotlib")
    from erfnet.evaluation.anomaly_metrics import levels, metrics_from_levels, split_scores
    from erfnet.evaluation.anomaly_plots import write_curves, write_heatmap

    rng = np.random.default_rng(0)
    scores, labels = rng.random(500).astype(np.float32), rng.random(500) < 0.1
    lv = levels(*split_scores(scores, labels))
    written = write_curves(tmp_path, "Set", {"msp": lv}, {"msp": metrics_from_levels(lv)})
    assert [p.name for p in written] == ["Set_roc.png", "Set_pr.png"]
    write_heatmap(tmp_path / "Set" / "a_msp.png", scores.reshape(20, 25))
    assert Image.open(tmp_path / "Set" / "a_msp.png").size == (25, 20)


def test_out_dir_without_matplotlib_is_one_line(monkeypatch, tmp_path, void_checkpoint) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        cli(
            "--checkpoint",
            void_checkpoint,
            "--data-root",
            tmp_path / "d",
            "--out-dir",
            tmp_path / "o",
        )


def test_benchmark_flag_names_one_sets_layout(tmp_path: Path) -> None:
    root = write_set(tmp_path / "pack" / "Mine", [np.kron(RAW, np.ones((4, 4), np.uint8))])
    (aset,) = anomaly.find_sets(root, "roadanomaly")  # any folder name, the rule asked for
    assert aset.benchmark.rule == "roadanomaly"
    with pytest.raises(FlagError, match="--benchmark names the layout of one set"):
        anomaly.find_sets(tmp_path / "pack", "roadanomaly")
    with pytest.raises(UserError, match="unknown set folder"):
        anomaly.find_sets(tmp_path / "pack")


def test_outputs_never_land_on_an_input_or_on_each_other(pack, void_checkpoint, tmp_path):
    """The one output rule, before any work: --json on the checkpoint, --out-dir inside the pack,
    --json inside --out-dir are each one line; the checkpoint and the pack are left unchanged."""
    before = void_checkpoint.read_bytes(), sorted(p.name for p in pack.rglob("*"))
    cases = [("--json", void_checkpoint), ("--out-dir", pack / "plots")]
    for flag, path in cases:
        with pytest.raises(SystemExit) as e:
            cli("--checkpoint", void_checkpoint, "--data-root", pack, flag, path)
        assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        out = tmp_path / "o"
        cli("--checkpoint", void_checkpoint, "--data-root", pack, "--out-dir", out, "--json", out)
    message = str(e.value.code)
    assert message.startswith("error: ") and "--json" in message and "--out-dir" in message
    assert (void_checkpoint.read_bytes(), sorted(p.name for p in pack.rglob("*"))) == before
