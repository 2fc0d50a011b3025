"""Inference modes on stub networks whose outputs are known, and evaluate() on a tiny loader.

Images go in on the 0-255 scale; every view is resized there and normalised with the model's
mean / std (ImageNet's for a model without ``meta``), as mmseg resizes the uint8 image. The
test-time settings are one ``TestSettings``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from erfnet.config import IGNORE_INDEX, MEAN_RGB, STD_RGB
from erfnet.data.transforms import normalize
from erfnet.evaluation.evaluate import ShardSampler, evaluate
from erfnet.evaluation.inference import (
    TestSettings,
    infer_logits,
    infer_probs_ms_flip,
    model_normalization,
    predict,
    ratio_scale,
    rescale_size,
    resize_image,
    slide_logits,
)
from erfnet.evaluation.metrics import ConfusionMatrix
from erfnet.evaluation.visualize import ColorWriter

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # the network sees the 0-255 image


def at(scale, **kw) -> TestSettings:
    """Settings at the test scale ``scale`` (H, W), other fields as given."""
    return TestSettings(scale=scale, **kw)


def with_meta(net: nn.Module, stats: dict) -> nn.Module:
    """``net`` carrying ``stats`` (mean / std) as a loaded checkpoint's meta would."""
    net.meta = dict(stats)
    return net


def rgb_batch(*shape: int, seed: int = 0) -> torch.Tensor:
    """A float 0-255 image batch with integer grey levels, like a decoded uint8 image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float()


def imagenet(rgb: torch.Tensor) -> torch.Tensor:
    return normalize(rgb, MEAN_RGB, STD_RGB)


class Pointwise(nn.Module):
    """A 1x1 conv: fully convolutional and flip-equivariant."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CoordNet(nn.Module):
    """Class 0's logit is a ramp over the input's absolute x position, class 1's is the input's
    channel 0: flipping the input flips only class 1's logit."""

    def __init__(self, slope: float = 3.0) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        ramp = (torch.arange(w, dtype=x.dtype) + 0.5) / w * self.slope
        return torch.stack([ramp.expand_as(x[:, 0]), x[:, 0]], dim=1)


class Recorder(nn.Module):
    """Records every input's size and its top-left values; outputs zeros for 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, int], torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape[-2:]), x[0, :, 0, 0].clone()))
        return x.new_zeros((x.shape[0], 2, *x.shape[-2:]))


def test_rescale_size_mmcv_rule():
    assert rescale_size((1024, 2048), (1024, 2048)) == (1024, 2048)
    assert rescale_size((512, 1024), (1024, 2048)) == (1024, 2048)
    assert rescale_size((1024, 2048), (512, 1024)) == (512, 1024)
    # factor = min(128 / 150, 64 / 100) = 0.64 -> (64, int(96.0 + 0.5))
    assert rescale_size((100, 150), (64, 128)) == (64, 96)
    # The long bound binds: factor = min(2048 / 3000, 1024 / 1000) -> round half up.
    assert rescale_size((1000, 3000), (1024, 2048)) == (683, 2048)
    assert [ratio_scale((1024, 2048), r) for r in (0.5, 0.75, 1.75)] == [
        (512, 1024),
        (768, 1536),
        (1792, 3584),
    ]


def test_whole_resizes_to_test_scale_and_back():
    net = Recorder()
    image = rgb_batch(1, 3, 24, 40)
    logits = infer_logits(net, image, (30, 50), at((64, 128)))
    # (30, 50) rescaled into (64, 128): factor min(128 / 50, 64 / 30) = 2.1333 -> (64, 107)
    assert [c[0] for c in net.calls] == [(64, 107)]
    assert logits.shape == (1, 2, 30, 50)
    # An image already at the test scale is not resized.
    net.calls.clear()
    image = rgb_batch(1, 3, 32, 64)
    infer_logits(net, image, (32, 64), at((32, 64)))
    assert torch.equal(net.calls[0][1], imagenet(image)[0, :, 0, 0])
    # uint8 in, the same network input.
    infer_logits(net, image.to(torch.uint8), (32, 64), at((32, 64)))
    assert torch.equal(net.calls[1][1], net.calls[0][1])


def test_whole_logits_bilinear_to_label_size():
    net = Pointwise()
    image = rgb_batch(2, 3, 16, 32)
    logits = infer_logits(net, image, (24, 48), at((16, 32)))
    expected = F.interpolate(
        net(imagenet(image)), size=(24, 48), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(logits, expected)


def test_ms_flip_view_sizes_and_flips():
    net = with_meta(Recorder(), IDENTITY)
    image = torch.arange(3 * 32 * 64, dtype=torch.float32).view(1, 3, 32, 64)
    probs = infer_probs_ms_flip(
        net, image, (32, 64), at((32, 64), ms_flip=True, ratios=(0.5, 1.0, 1.5))
    )
    sizes = [c[0] for c in net.calls]
    assert sizes == [(16, 32), (16, 32), (32, 64), (32, 64), (48, 96), (48, 96)]
    # Ratio 1.0 is the unresized image; its flipped view starts with the last column.
    assert torch.equal(net.calls[2][1], image[0, :, 0, 0])
    assert torch.equal(net.calls[3][1], image[0, :, 0, -1])
    assert probs.shape == (1, 2, 32, 64)
    torch.testing.assert_close(probs, torch.full_like(probs, 0.5))


def test_ms_flip_undoes_the_flip():
    # Statistics that give the network inputs of order 1, comparable to the ramp.
    net = with_meta(CoordNet(slope=3.0), {"mean": (127.5,) * 3, "std": (64.0,) * 3})
    image = rgb_batch(1, 3, 8, 16)
    probs = infer_probs_ms_flip(net, image, (8, 16), at((8, 16), ms_flip=True, ratios=(1.0,)))
    # Independent expectation: the unflipped view sees the ramp r(j), the flipped view's output
    # flipped back sees r(W - 1 - j); the pointwise channel is un-flipped back in place.
    w = 16
    ramp = (np.arange(w) + 0.5) / w * 3.0
    img0 = (image[0, 0].numpy().astype(np.float64) - 127.5) / 64.0

    def softmax2(a, b):
        m = np.maximum(a, b)
        ea, eb = np.exp(a - m), np.exp(b - m)
        return np.stack([ea, eb]) / (ea + eb)

    expected = 0.5 * (softmax2(ramp[None, :], img0) + softmax2(ramp[::-1][None, :], img0))
    np.testing.assert_allclose(probs[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    # Without the flip the result is just the first view.
    single = infer_probs_ms_flip(
        net, image, (8, 16), at((8, 16), ms_flip=True, ratios=(1.0,), flip=False)
    )
    np.testing.assert_allclose(single[0].numpy(), softmax2(ramp[None, :], img0), rtol=1e-5)


def _uint8_resize(rgb, size):
    """mmseg resizes the uint8 image, then normalises: bilinear, rounded, ImageNet statistics."""
    out = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB).view(1, 3, 1, 1)
    return (out.round().clamp(0, 255) - mean) / std


def test_ms_flip_averages_resized_softmax():
    net = Pointwise()
    image = rgb_batch(1, 3, 16, 32, seed=1)
    probs = infer_probs_ms_flip(net, image, (16, 32), at((16, 32), ms_flip=True, ratios=(0.5, 1.0)))

    def up(logits):
        return F.interpolate(logits, size=(16, 32), mode="bilinear", align_corners=False)

    half = _uint8_resize(image, (8, 16))
    full = _uint8_resize(image, (16, 32))  # ratio 1: no resize, only normalised
    views = [
        up(net(half)).softmax(1),
        up(net(half.flip(-1))).flip(-1).softmax(1),
        net(full).softmax(1),
        net(full.flip(-1)).flip(-1).softmax(1),
    ]
    expected = sum(views) / 4
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    pred = predict(net, image, None, at((16, 32), ms_flip=True, ratios=(0.5, 1.0)))
    assert torch.equal(pred, expected.argmax(1))


def test_resize_image_rounds_like_uint8():
    rgb = rgb_batch(1, 3, 10, 14)
    out = resize_image(rgb, (15, 21))
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    exact = F.interpolate(rgb, size=(15, 21), mode="bilinear", align_corners=False)
    assert (out - exact).abs().max() <= 0.5
    assert torch.equal(resize_image(rgb.to(torch.uint8), (15, 21)), out)  # any dtype
    same = rgb_batch(1, 3, 4, 4)
    assert resize_image(same, (4, 4)) is same


def test_views_use_the_model_normalisation():
    """A model with its own mean / std (erfnet_pytorch: 0 / 255) sees the 0-255 image resized
    and then normalised with them, once; another meta's statistics replace them."""
    net = Recorder()
    image = rgb_batch(1, 3, 10, 14, seed=4)
    assert model_normalization(net) == (MEAN_RGB, STD_RGB)
    net.meta = {"mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]}
    infer_logits(net, image, (10, 14), at((10, 14)))
    torch.testing.assert_close(net.calls[-1][1], image[0, :, 0, 0] / 255, rtol=0, atol=1e-7)
    infer_probs_ms_flip(net, image, (10, 14), at((10, 14), ms_flip=True, ratios=(2.0,), flip=False))
    resized = F.interpolate(image, size=(20, 28), mode="bilinear", align_corners=False).round()
    torch.testing.assert_close(net.calls[-1][1], resized[0, :, 0, 0] / 255, rtol=0, atol=1e-7)
    net.meta = {"mean": MEAN_RGB, "std": STD_RGB}
    infer_logits(net, image, (10, 14), at((10, 14)))
    assert torch.equal(net.calls[-1][1], imagenet(image)[0, :, 0, 0])
    with pytest.raises(ValueError, match="0-255"):
        predict(net, imagenet(image))  # an already normalised image is refused


def test_slide_equals_whole_for_pointwise_net():
    net = Pointwise()
    image = rgb_batch(1, 3, 50, 75, seed=2)
    whole = net(imagenet(image))
    slid = slide_logits(net, imagenet(image), crop=(20, 30), stride=(13, 17))
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)
    a = predict(
        net, image, None, at((50, 75), mode="slide", slide_crop=(20, 30), slide_stride=(13, 17))
    )
    assert torch.equal(a, whole.argmax(1))
    with pytest.raises(ValueError, match="uncovered"):
        TestSettings(mode="slide", slide_crop=(20, 30), slide_stride=(21, 30))


def test_slide_grid_matches_mmseg():
    net = Recorder()
    rows = torch.arange(50, dtype=torch.float32).view(50, 1).expand(50, 150)
    cols = torch.arange(150, dtype=torch.float32).view(1, 150).expand(50, 150)
    image = torch.stack([rows, cols, rows]).unsqueeze(0)
    slide_logits(net, image, crop=(40, 60), stride=(30, 45))
    origins = [(int(v[0]), int(v[1])) for _, v in net.calls]
    # h_grids = (50 - 40 + 29) // 30 + 1 = 2: rows 0 and min(30 + 40, 50) - 40 = 10.
    # w_grids = (150 - 60 + 44) // 45 + 1 = 3: cols 0, 45, 90.
    assert origins == [(0, 0), (0, 45), (0, 90), (10, 0), (10, 45), (10, 90)]
    assert all(size == (40, 60) for size, _ in net.calls)
    net.calls.clear()
    slide_logits(net, image[:, :, :20, :30], crop=(40, 60), stride=(30, 45))
    assert [size for size, _ in net.calls] == [(20, 30)]  # smaller than one crop


def test_slide_averages_overlaps():
    class Ones(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 1, *x.shape[-2:]) * x[:, :1, :1, :1]

    image = torch.zeros(1, 3, 10, 10)
    image[0, 0, 0, 5] = 4.0  # the second column crop's top-left value
    out = slide_logits(Ones(), image, crop=(10, 5), stride=(10, 3))
    # w_grids = (10 - 5 + 2) // 3 + 1 = 3: crops x 0-4, 3-7, 5-9 (clamped from 6); only the
    # last one adds 4, and columns 5-7 are covered twice.
    assert out[0, 0, 0].tolist() == [0, 0, 0, 0, 0, 2, 2, 2, 4, 4]


def test_predict_flag_errors():
    net = Pointwise()
    image = rgb_batch(1, 3, 8, 8)
    with pytest.raises(ValueError, match="ms_flip"):
        predict(net, image, None, TestSettings(ratios=(1.0,)))
    with pytest.raises(ValueError, match="mode"):
        predict(net, image, None, TestSettings(mode="tiles"))
    with pytest.raises(ValueError, match="positive"):
        predict(net, image, None, TestSettings(ms_flip=True, ratios=(0.0,)))


def _dataset(n: int, labelled: bool = True):
    g = torch.Generator().manual_seed(3)
    items = []
    for i in range(n):
        item = {
            "image": torch.randint(0, 256, (3, 12, 20), generator=g, dtype=torch.uint8),
            "name": f"city_{i:06d}_000019",
            "city": "city",
        }
        if labelled:
            label = torch.randint(0, 4, (12, 20), generator=g)
            label[torch.rand(12, 20, generator=g) < 0.1] = IGNORE_INDEX
            item["label"] = label
        items.append(item)
    return items


def test_evaluate_matches_manual_confusion(tmp_path):
    net = Pointwise(4).train()
    data = _dataset(5)
    loader = DataLoader(data, batch_size=2)
    r = evaluate(net, loader, "cpu", at((12, 20)), num_classes=4, progress=False)
    assert net.training  # restored
    cm = ConfusionMatrix(4)
    with torch.no_grad():
        net.eval()
        for item in data:
            cm.update(net(imagenet(item["image"][None])).argmax(1)[0], item["label"])
    expected = cm.compute()
    assert r["IoU"] == pytest.approx(expected["IoU"], nan_ok=True)
    assert r["mIoU"] == pytest.approx(expected["mIoU"])
    assert r["num_images"] == 5
    # Unlabelled data: nothing to score, predictions still handed to on_prediction.
    seen: list[tuple[tuple[int, ...], list[str]]] = []
    assert (
        evaluate(
            net,
            DataLoader(_dataset(2, False)),
            "cpu",
            at((12, 20)),
            num_classes=4,
            on_prediction=lambda preds, batch: seen.append((tuple(preds.shape), batch["name"])),
            progress=False,
        )
        is None
    )
    assert seen == [((1, 12, 20), ["city_000000_000019"]), ((1, 12, 20), ["city_000001_000019"])]
    with pytest.raises(ValueError, match="predicts 4 classes, expected 19"):
        evaluate(net, loader, "cpu", num_classes=19, progress=False)


def test_shard_sampler_covers_each_index_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(ShardSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]
    assert list(ShardSampler(1, 1, 2)) == []
    with pytest.raises(ValueError):
        ShardSampler(3, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda_close_to_fp32():
    net = Pointwise().cuda().eval()
    image = rgb_batch(1, 3, 64, 128).cuda()
    a = infer_logits(net, image, None, at((64, 128), amp=True))
    b = infer_logits(net, image, None, at((64, 128), amp=False))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    cl = net.to(memory_format=torch.channels_last)
    c = infer_logits(cl, image, None, at((64, 128)))
    torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)


class _Listed(torch.utils.data.Dataset):
    """A list of items that, like CityscapesDataset, owns its classes and palette."""

    classes = ("a", "b", "c", "d")
    palette = ((10, 0, 0), (0, 20, 0), (0, 0, 30), (40, 40, 40))
    ignore_index = IGNORE_INDEX

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_evaluate_takes_classes_palette_and_statistics_from_the_data(tmp_path):
    net = Pointwise(4).eval()
    data = _Listed(_dataset(3))
    loader = DataLoader(data, batch_size=1)
    writer = ColorWriter(tmp_path, _Listed.palette)
    r = evaluate(net, loader, "cpu", at((12, 20)), progress=False, on_prediction=writer)
    assert len(r["IoU"]) == 4  # num_classes = len(dataset.classes)
    colors = {
        tuple(c)
        for p in tmp_path.rglob("*_color.png")
        for c in np.asarray(Image.open(p)).reshape(-1, 3).tolist()
    }
    assert colors <= set(_Listed.palette) and len(colors) >= 2
    assert len(list(tmp_path.rglob("*_blend.png"))) == 3
    # The model's own statistics are used: here the network sees the 0-255 image.
    cm = ConfusionMatrix(4)
    with torch.no_grad():
        for item in data:
            cm.update(net(item["image"][None].float()).argmax(1)[0], item["label"])
    raw = evaluate(with_meta(net, IDENTITY), loader, "cpu", at((12, 20)), progress=False)
    assert raw["mIoU"] == pytest.approx(cm.compute()["mIoU"])
    with pytest.raises(ValueError, match="predicts 4 classes, expected 3"):
        evaluate(net, loader, "cpu", num_classes=3, progress=False)


class LabelNet(nn.Module):
    """An exported graph ending in an argmax: labels [N, H, W] (int64), here the column index
    modulo 3, so that a nearest resize is visible."""

    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(x.shape[-1]) % 3
        return cols.expand(x.shape[0], x.shape[-2], -1).clone()


def test_a_model_that_outputs_labels_is_resized_nearest_in_whole_mode_only():
    net = LabelNet()
    image = rgb_batch(1, 3, 8, 12)
    pred = predict(net, image, (16, 24), at((8, 12)))
    assert pred.dtype == torch.int64 and pred.shape == (1, 16, 24)
    expected = (torch.arange(12) % 3).repeat_interleave(2)  # each column doubled, never blended
    assert torch.equal(pred[0, 5], expected)
    with pytest.raises(ValueError, match="only whole-image single-scale"):
        predict(net, image, None, at((8, 12), mode="slide", slide_crop=(8, 8), slide_stride=(4, 4)))
    with pytest.raises(ValueError, match="only whole-image single-scale"):
        predict(net, image, None, at((8, 12), ms_flip=True, ratios=(1.0,)))


def test_views_under_the_network_minimum_are_one_clear_error():
    net = Pointwise()
    with pytest.raises(ValueError, match=r"1x5000 image .* is 0x\d+ pixels, under the 8x8"):
        predict(net, rgb_batch(1, 3, 1, 5000), None, at((1024, 2048)))
    with pytest.raises(ValueError, match=r"test scale 64x128 x 1e-06 is 0x0 pixels"):
        predict(net, rgb_batch(1, 3, 64, 128), None, at((64, 128), ms_flip=True, ratios=(1e-6,)))
    for bad in ((float("inf"),), (float("nan"),), ()):
        with pytest.raises(ValueError, match="ratios must be positive finite"):
            TestSettings(ms_flip=True, ratios=bad)
    with pytest.raises(ValueError, match="scale must be two positive integers"):
        TestSettings(scale=(0, 64))


def test_one_palette_rule_for_a_palette_shorter_than_its_classes(capsys):
    from erfnet.evaluation.visualize import blend, class_colors, colorize, palette_lut
    from erfnet.labels import PALETTE

    short = [[1, 2, 3], [4, 5, 6]]
    colors = class_colors(short, 30, "the test palette")
    err = capsys.readouterr().err
    assert "the test palette has 2 colours for 30 classes; classes 2-29" in err
    assert err.count("\n") == 1  # one line
    assert colors[:2].tolist() == short and colors[2:19].tolist() == [list(c) for c in PALETTE[2:]]
    assert len({tuple(c) for c in colors[19:].tolist()}) == 11 and colors[19:].any(axis=1).all()
    lut = palette_lut(short, 30)
    assert lut[:30].tolist() == colors.tolist() and not lut[30:].any()  # ignore etc.: black
    pred = np.array([[0, 1, 25, 255]])
    assert colorize(pred, short, 30)[0, 2].tolist() == colors[25].tolist()
    assert not colorize(pred, short, 30)[0, 3].any()
    capsys.readouterr()
    class_colors(short, 2)  # a complete palette: no warning
    assert capsys.readouterr().err == ""
    rgb, color = np.full((1, 2, 3), 100, np.uint8), np.full((1, 2, 3), 200, np.uint8)
    assert int(blend(rgb, color, 0.25)[0, 0, 0]) == 125 and blend(rgb, color, 1.0) is color
