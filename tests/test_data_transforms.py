"""Joint transforms of the mmseg recipe: contract, resize rules, crop, flip, photometric."""

from __future__ import annotations

import colorsys
from pathlib import Path

import pytest
import torch

import erfnet.data.transforms as T
from erfnet.config import MEAN_RGB, STD_RGB
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.data.transforms import (
    EvalTransform,
    PhotoMetricDistortion,
    TrainTransform,
    crop_ok,
    denormalize,
    normalize,
    rescale_size,
    resize_crop_bilinear,
    resize_crop_nearest,
    resize_image,
    resize_label,
)

VALID = set(range(19)) | {255}


def random_pair(h: int = 48, w: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    # Blocky labels with a few ignored pixels, like real label maps.
    small = torch.randint(0, 19, (h // 8, w // 8), dtype=torch.uint8, generator=g)
    label = small.repeat_interleave(8, 0).repeat_interleave(8, 1)
    label[:2] = 255
    return image, label


# ---------------------------------------------------------------- resize rules


@pytest.mark.parametrize(
    "size,scale,expected",
    [
        ((1024, 2048), (1024, 2048), (1024, 2048)),  # real Cityscapes at the test scale: no-op
        ((64, 128), (1024, 2048), (1024, 2048)),
        ((512, 1024), (600, 1000), (500, 1000)),  # factor min(1000/1024, 600/512)
        ((2, 3), (3, 6), (3, 5)),  # 3 * 1.5 = 4.5 rounds half up (int(x + 0.5)), not to even
        ((1024, 2048), (768, 1536), (768, 1536)),
        ((1024, 2048), (1433, 2867), (1433, 2866)),  # int(2048 * 1433/1024 + 0.5) = 2866
        ((100, 100), (1024, 2048), (1024, 1024)),
    ],
)
def test_rescale_size_is_mmcv_rule(size, scale, expected):
    assert rescale_size(size, scale) == expected


@pytest.mark.parametrize("size", [(24, 40), (96, 160), (70, 117), (48, 80), (150, 301)])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_window_resize_equals_full_resize_then_crop(size, flip):
    image, label = random_pair()
    box = (3, min(size[0], 3 + 20), 5, min(size[1], 5 + 33))
    full_img = resize_image(image, size)[:, box[0] : box[1], box[2] : box[3]]
    full_lab = resize_label(label, size)[box[0] : box[1], box[2] : box[3]]
    if flip:
        full_img, full_lab = full_img.flip(-1), full_lab.flip(-1)
    got_img = resize_crop_bilinear(image, size, box, flip)
    got_lab = resize_crop_nearest(label, size, box, flip)
    assert torch.equal(got_lab, full_lab)
    # Same sampling positions and weights; only float rounding order differs.
    assert (got_img - full_img).abs().max() <= 1
    assert (got_img != full_img).float().mean() < 0.01
    assert torch.equal(got_img, got_img.round())


def test_resize_image_matches_torch_bilinear_without_antialias():
    image, _ = random_pair()
    ref = torch.nn.functional.interpolate(
        image[None].float(), size=(100, 170), mode="bilinear", align_corners=False
    )[0]
    assert torch.equal(resize_image(image, (100, 170)), ref.round().clamp(0, 255))


def test_nearest_resize_creates_no_new_label_values():
    _, label = random_pair()
    for size in [(31, 53), (96, 160), (200, 333)]:
        out = resize_label(label, size)
        assert out.dtype == torch.uint8 and out.shape == size
        assert set(out.unique().tolist()) <= set(label.unique().tolist())
    assert torch.equal(resize_label(label, (96, 160))[::2, ::2], label)  # exact 2x


# ---------------------------------------------------------------- TrainTransform contract


def test_train_transform_contract():
    image, label = random_pair(64, 128)
    tf = TrainTransform(crop_size=(32, 48), scale=(64, 128))
    in_values = set(label.unique().tolist())
    for seed in range(8):
        torch.manual_seed(seed)
        img, lab = tf(image, label)
        assert img.dtype == torch.float32 and img.shape == (3, 32, 48)
        assert lab.dtype == torch.int64 and lab.shape == (32, 48)
        assert set(lab.unique().tolist()) <= in_values | {255}
        assert set(lab.unique().tolist()) <= VALID
        raw = denormalize(img, MEAN_RGB, STD_RGB)
        inside = lab != 255
        assert raw.min() > -1e-3 and raw.max() < 255 + 1e-3
        assert torch.allclose(raw, raw.round(), atol=1e-3) or not inside.any()


def test_train_transform_is_deterministic_under_the_global_seed():
    image, label = random_pair(64, 128)
    tf = TrainTransform(crop_size=(32, 48), scale=(64, 128))
    torch.manual_seed(3)
    a = tf(image, label)
    torch.manual_seed(3)
    b = tf(image, label)
    c = tf(image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_train_transform_in_the_dataset(synthetic_root: Path):
    ds = CityscapesDataset(synthetic_root, "train", TrainTransform(crop_size=(32, 64)))
    torch.manual_seed(0)
    item = ds[2]
    assert item["image"].shape == (3, 32, 64) and item["label"].shape == (32, 64)
    assert set(item["label"].unique().tolist()) <= VALID


def test_random_resize_ratio_range():
    # 64x128 image, scale (64, 128): the resized size is the ratio times the scale, so a
    # crop as large as the image at ratio 0.5 shows padding and at ratio 2 none.
    image, label = random_pair(64, 128)
    tf = TrainTransform(
        crop_size=(64, 128),
        scale=(64, 128),
        ratio_range=(0.5, 0.5),
        cat_max_ratio=1.0,
        photometric=False,
    )
    img, lab = tf(image, label)
    assert (lab[32:] == 255).all() and (lab[:, 64:] == 255).all() and (lab[:32, :64] != 255).any()
    sizes = set()
    tf = TrainTransform(crop_size=(8, 8), scale=(64, 128), ratio_range=(0.5, 2.0))
    for seed in range(30):
        torch.manual_seed(seed)
        sizes.add(tf.sample_size((64, 128)))
    assert all(32 <= h <= 128 and w == 2 * h for h, w in sizes) and len(sizes) > 10


def test_pad_values():
    image, label = random_pair(16, 32)
    tf = TrainTransform(
        crop_size=(24, 40), scale=(16, 32), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False
    )
    img, lab = tf(image, label)
    assert img.shape == (3, 24, 40) and lab.shape == (24, 40)
    assert (img[:, 16:] == 0).all() and (img[:, :, 32:] == 0).all()
    assert (lab[16:] == 255).all() and (lab[:, 32:] == 255).all()
    assert torch.equal(lab[:16, :32], label.long())
    assert torch.allclose(img[:, :16, :32], normalize(image, MEAN_RGB, STD_RGB), atol=1e-5)


def test_flip_is_applied_to_image_and_label_together():
    # The image encodes its label (red = 10 * label), so any mismatch between them shows up.
    _, label = random_pair(32, 64)
    label[label == 255] = 18
    image = torch.stack([label * 10, label * 3, 255 - label * 10]).to(torch.uint8)
    kw = dict(crop_size=(32, 64), scale=(32, 64), ratio_range=(1.0, 1.0), photometric=False)
    img, lab = TrainTransform(flip_prob=1.0, cat_max_ratio=1.0, **kw)(image, label)
    assert torch.equal(lab, label.flip(-1).long())
    img, lab = TrainTransform(flip_prob=0.0, cat_max_ratio=1.0, **kw)(image, label)
    assert torch.equal(lab, label.long())
    flips = 0
    tf = TrainTransform(
        flip_prob=0.5, crop_size=(16, 24), scale=(32, 64), ratio_range=(1.0, 1.0), photometric=False
    )
    for seed in range(20):
        torch.manual_seed(seed)
        img, lab = tf(image, label)
        assert torch.allclose(denormalize(img, MEAN_RGB, STD_RGB)[0], lab.float() * 10, atol=1e-3)
        flips += int(not any(torch.equal(lab, w) for w in _windows(label.long(), (16, 24))))
    assert 3 <= flips <= 17


def _windows(label: torch.Tensor, size: tuple[int, int]):
    for y in range(label.shape[0] - size[0] + 1):
        for x in range(label.shape[1] - size[1] + 1):
            yield label[y : y + size[0], x : x + size[1]]


def test_train_transform_needs_a_label():
    image, _ = random_pair()
    with pytest.raises(ValueError, match="needs a label"):
        TrainTransform()(image, None)


# ---------------------------------------------------------------- cat_max_ratio crop


def test_crop_ok_rules():
    def lab(*counts):
        values = [torch.full((n,), c, dtype=torch.uint8) for c, n in counts]
        return torch.cat(values).view(1, -1)

    assert not crop_ok(lab((3, 100)), 0.75)  # one class
    assert not crop_ok(lab((3, 100), (255, 900)), 0.75)  # one class plus ignore
    assert not crop_ok(lab((3, 80), (4, 20)), 0.75)
    assert not crop_ok(lab((3, 75), (4, 25)), 0.75)  # strictly below
    assert crop_ok(lab((3, 74), (4, 26)), 0.75)
    assert crop_ok(lab((3, 50), (4, 50), (255, 10_000)), 0.75)  # ignore is not counted
    assert not crop_ok(lab((255, 100)), 0.75)


def test_sample_crop_retries_like_mmseg(monkeypatch: pytest.MonkeyPatch):
    # Left half class 1, right half class 2: a 4-wide crop is ok only across the border.
    label = torch.ones(4, 16, dtype=torch.uint8)
    label[:, 8:] = 2
    bad, good = (0, 4, 0, 4), (0, 4, 6, 10)
    tf = TrainTransform(crop_size=(4, 4), scale=(4, 16), ratio_range=(1.0, 1.0))

    def scripted(boxes):
        it = iter(boxes)
        monkeypatch.setattr(T, "random_crop_box", lambda size, crop: next(it))

    scripted([bad, bad, bad, good, bad])
    assert tf.sample_crop(label, (4, 16)) == good
    # Ten failed checks: the eleventh box is taken unchecked, as in mmseg.
    last = (0, 4, 12, 16)
    scripted([bad] * 10 + [last, good])
    assert tf.sample_crop(label, (4, 16)) == last
    scripted([bad, good])
    assert TrainTransform(crop_size=(4, 4), cat_max_ratio=1.0).sample_crop(label, (4, 16)) == bad


def test_cat_max_ratio_is_honoured_statistically():
    # Class 0 with 16-wide columns of class 5 every 64 columns: only ~22% of random 16x16
    # crops hold both classes in a ratio below 0.75, so one try rarely succeeds and ten
    # tries usually do (1 - 0.78 ** 10 = 0.92).
    label = torch.zeros(32, 256, dtype=torch.uint8)
    for x in range(24, 256, 64):
        label[:, x : x + 16] = 5
    image = torch.zeros(3, 32, 256, dtype=torch.uint8)

    def ok_fraction(ratio: float) -> float:
        tf = TrainTransform(
            crop_size=(16, 16),
            scale=(32, 256),
            ratio_range=(1.0, 1.0),
            cat_max_ratio=ratio,
            photometric=False,
            flip_prob=0.0,
        )
        torch.manual_seed(0)
        return sum(crop_ok(tf(image, label)[1], 0.75) for _ in range(60)) / 60

    plain, checked = ok_fraction(1.0), ok_fraction(0.75)
    assert plain < 0.4  # most crops violate the ratio ...
    assert checked > 0.75  # ... but the retries find good ones


# ---------------------------------------------------------------- photometric distortion


def test_hsv_conversion_matches_opencv_8bit_convention():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 1, 300), generator=g).float()
    h, s, v = T._rgb_to_hsv8(img)
    for i in range(300):
        r, gg, b = (img[c, 0, i].item() / 255 for c in range(3))
        hh, ss, vv = colorsys.rgb_to_hsv(r, gg, b)
        assert abs(h[0, i].item() - round(hh * 180) % 180) <= 1 or {h[0, i].item(), 0.0} == {
            179.0,
            0.0,
        }
        assert abs(s[0, i].item() - round(ss * 255)) <= 1
        assert v[0, i].item() == round(vv * 255)
    back = T._hsv8_to_rgb(h, s, v)
    assert (back - img).abs().max() <= 4  # 8-bit HSV round trip, like cv2
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    h, s, v = T._rgb_to_hsv8(red)
    assert T._hsv8_to_rgb(h + 30, s, v).flatten().tolist() == [255.0, 255.0, 0.0]  # +60 deg
    assert T._hsv8_to_rgb(h + 60, s, v).flatten().tolist() == [0.0, 255.0, 0.0]  # +120 deg


def test_photometric_keeps_integer_range_and_uses_each_step():
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 16, 16), generator=g).float()
    pm = PhotoMetricDistortion()
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = pm(img)
        assert out.shape == img.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())
        changed += int(not torch.equal(out, img))
    assert changed >= 15  # 1/16 of the draws apply none of the four steps


def test_photometric_grey_stays_grey():
    # Saturation and hue cannot colour a grey image; brightness and contrast keep it grey.
    img = torch.arange(0, 256, dtype=torch.float32).view(1, 16, 16).expand(3, 16, 16)
    for seed in range(10):
        torch.manual_seed(seed)
        out = PhotoMetricDistortion()(img.clone())
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_photometric_contrast_position_follows_mode(monkeypatch: pytest.MonkeyPatch):
    # Script the draws: brightness on (+20), mode, contrast on (x1.5), saturation off, hue off.
    img = torch.full((3, 2, 2), 100.0)

    def run(mode: int) -> torch.Tensor:
        coins = iter([1, 1, 0, 0] if mode == 1 else [1, 0, 0, 1])
        values = iter([20.0, 1.5])
        monkeypatch.setattr(T, "_coin", lambda: bool(next(coins)))
        monkeypatch.setattr(T, "_uniform", lambda lo, hi: next(values))
        monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor(mode))
        return PhotoMetricDistortion()(img)

    assert run(1).unique().tolist() == [180.0]  # (100 + 20) * 1.5
    assert run(0).unique().tolist() == [180.0]  # same here: no HSV step in between
    img = torch.full((3, 2, 2), 200.0)
    assert run(1).unique().tolist() == [255.0]  # clipped


# ---------------------------------------------------------------- EvalTransform


def test_eval_transform_resizes_only_the_image():
    image, label = random_pair(32, 64)
    img, lab = EvalTransform(scale=(128, 256))(image, label)
    # 0-255, not normalised: the uint8 image mmseg resizes (the evaluator normalises it).
    assert img.shape == (3, 128, 256) and img.dtype == torch.uint8
    assert torch.equal(img, resize_image(image, (128, 256)).to(torch.uint8))
    assert lab.dtype == torch.int64 and torch.equal(lab, label.long())
    img, lab = EvalTransform(scale=None)(image, None)
    assert lab is None and torch.equal(img, image)
    img, _ = EvalTransform()(torch.zeros(3, 1024, 2048, dtype=torch.uint8))
    assert img.shape == (3, 1024, 2048)  # the recipe's test scale is a no-op on Cityscapes


def test_normalize_uses_the_given_statistics():
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1).expand(3, 2, 2)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    assert torch.allclose(normalize(mean, MEAN_RGB, STD_RGB), torch.zeros(3, 2, 2), atol=1e-6)
    assert torch.allclose(normalize(mean + std, MEAN_RGB, STD_RGB), torch.ones(3, 2, 2), atol=1e-6)
    # Batches too; denormalize is the inverse; erfnet_pytorch's statistics are x / 255.
    image, _ = random_pair(8, 8)
    batch = image[None].expand(2, 3, 8, 8)
    assert torch.equal(normalize(batch, MEAN_RGB, STD_RGB)[1], normalize(image, MEAN_RGB, STD_RGB))
    back = denormalize(normalize(image, MEAN_RGB, STD_RGB), MEAN_RGB, STD_RGB)
    assert torch.allclose(back, image.float(), atol=1e-4)
    torch.testing.assert_close(normalize(image, [0.0] * 3, [255.0] * 3), image.float() / 255)


def test_train_transform_normalises_with_its_mean_and_std():
    image, label = random_pair(16, 32)
    kw = dict(
        crop_size=(16, 32),
        scale=(16, 32),
        ratio_range=(1.0, 1.0),
        flip_prob=0.0,
        photometric=False,
        cat_max_ratio=1.0,
    )
    assert TrainTransform(**kw).mean == MEAN_RGB and TrainTransform(**kw).std == STD_RGB
    img, _ = TrainTransform(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0), **kw)(image, label)
    torch.testing.assert_close(img, image.float() / 255)
    with pytest.raises(ValueError, match="std"):
        TrainTransform(std=(1.0, 0.0, 1.0))
