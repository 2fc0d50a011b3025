"""The CUDA paths (fp16 autocast + GradScaler, channels_last, cudnn.benchmark, the fast inference
path, training end to end). Skipped on machines without a GPU; run them where one is available."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erfnet import ERFNet, load_model, save_checkpoint
from erfnet.fuse import optimize_for_inference
from erfnet.training.step import train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[1]


def test_amp_train_step_with_grad_scaler_and_channels_last():
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = ERFNet().cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda")
    images = torch.randn(2, 3, 128, 256, device="cuda").contiguous(
        memory_format=torch.channels_last
    )
    labels = (images[:, 0] > 0).long() * 13  # learnable: car where channel 0 is positive
    labels[:, :8] = 255
    before = model.head.classifier.weight.detach().clone()
    losses = [
        train_step(model, images, labels, opt, scaler, autocast_dtype=torch.float16)
        for _ in range(15)
    ]
    assert all(torch.isfinite(torch.tensor(losses)))
    # The same batch again and again (the scaler may skip its first overflowing steps).
    assert losses[-1] < 0.9 * losses[0]
    assert not torch.equal(before, model.head.classifier.weight)
    assert model.head.classifier.weight.dtype == torch.float32  # master weights stay fp32
    assert scaler.get_scale() > 0


def test_fast_path_matches_eager_on_cuda(tmp_path, random_bn):
    torch.manual_seed(0)
    model = random_bn(ERFNet())  # non-trivial BN statistics: folding really folds
    save_checkpoint(tmp_path / "m.pth", model)
    eager = load_model(tmp_path / "m.pth", device="cuda")
    fast = load_model(tmp_path / "m.pth", device="cuda", fast=True)
    fused = optimize_for_inference(eager)
    x = torch.randn(1, 3, 256, 512, device="cuda")
    with torch.no_grad():
        ref = eager(x)
        torch.testing.assert_close(fast(x), ref, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(fused(x), ref, rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.float16):
            half = fast(x)
    agree = (half.float().argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree > 0.99


def test_train_script_on_cuda_with_amp(tmp_path):
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data",
        "synthetic",
        "--data-root",
        str(tmp_path / "syn"),
        "--iters",
        "6",
        "--batch-size",
        "2",
        "--val-interval",
        "3",
        "--ckpt-interval",
        "3",
        "--workers",
        "2",
        "--device",
        "cuda",
        "--amp",
        "--work-dir",
        str(work),
        "--no-progress",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model = load_model(work / "best.pth", device="cuda")
    assert next(model.parameters()).is_cuda
    assert (work / "latest.pth").is_file() and (work / "args.json").is_file()


def test_device_augmentation_on_cuda_matches_the_worker_path(synthetic_root: Path):
    """--gpu-aug on CUDA: the batch of the CPU worker path for the same seed; float rounding
    (FMA) may move a pixel at a rounding tie (by a level, a few after the HSV steps), rarely."""
    from erfnet.data.cityscapes import CityscapesDataset
    from erfnet.data.fast.device_aug import DeviceAugDataset, DeviceAugment, collate
    from erfnet.data.transforms import TrainTransform
    from erfnet.training.resume import build_train_loader

    tf = TrainTransform(crop_size=(40, 96), scale=(48, 96))
    ds = CityscapesDataset(synthetic_root, "train", transform=tf)
    ref, _ = build_train_loader(ds, batch_size=4, workers=0, seed=3)
    dev, _ = build_train_loader(
        DeviceAugDataset(ds), batch_size=4, workers=0, seed=3, pin_memory=True, collate_fn=collate
    )
    for r, g, _ in zip(ref, dev, range(3), strict=False):
        img, lab = DeviceAugment(tf)(g, torch.device("cuda"))
        assert img.is_cuda and lab.is_cuda and torch.equal(lab.cpu(), r["label"])
        step = 1.0 / min(tf.std)  # one intensity level after normalisation
        diff = (img.cpu() - r["image"]).abs()
        assert diff.max() <= 8 * step and (diff > 1e-5).float().mean() < 1e-3
