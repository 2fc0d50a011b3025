"""erfnet.fuse: BatchNorm folding and the fast inference path give the eval model's logits."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from erfnet.checkpoint import load_model, save_checkpoint
from erfnet.fuse import (
    ChannelAffine,
    HeadInStrips,
    fold_bn_into_conv,
    fuse_bn,
    optimize_for_inference,
)
from erfnet.model import DownsamplerBlock, ERFNet, NonBottleneck1d, UpsamplerBlock


@pytest.fixture(scope="module")
def make_model(random_bn):
    """``make_model(head, seed)``: an eval-mode ERFNet with random BN, some gammas negative."""
    return partial(_make_model, random_bn)


def _make_model(random_bn, head: str = "fcn", seed: int = 0) -> ERFNet:
    torch.manual_seed(seed)
    return random_bn(ERFNet(head=head), seed, negative=True).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("head", ["fcn", "deconv"])
@pytest.mark.parametrize("size", [(64, 128), (37, 53)])
def test_fuse_bn_matches_eval_model(head: str, size: tuple[int, int], make_model) -> None:
    model = make_model(head)
    fused = fuse_bn(model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert out.shape == ref.shape == (2, model.num_classes, *size)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.999


def test_fuse_bn_removes_bn_and_dropout_and_keeps_source(make_model) -> None:
    model = make_model()
    model.train()  # the copy must be in eval mode whatever the source's mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_bn(model)
    kinds = {type(m) for m in fused.modules()}
    assert not kinds & {nn.BatchNorm2d, nn.Dropout, nn.Dropout2d}
    # Identity stands exactly where a BN or a dropout was (or already stood); the downsamplers'
    # BNs, after a concat, leave a per-channel affine for their pool channels.
    src = dict(model.named_modules())
    identity = {n for n, m in fused.named_modules() if isinstance(m, nn.Identity)}
    downsampler_bns = {f"{n}.bn" for n, m in src.items() if isinstance(m, DownsamplerBlock)}
    replaced = {
        n
        for n, m in src.items()
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d, nn.Identity))
    }
    assert identity == replaced - downsampler_bns
    assert {n for n, m in fused.named_modules() if isinstance(m, ChannelAffine)} == downsampler_bns
    assert not fused.training
    assert all(not p.requires_grad for p in fused.parameters())
    # The same class running model.py's forward, not a re-implementation.
    assert type(fused) is ERFNet and type(fused.encoder[2]) is NonBottleneck1d
    assert fused.num_classes == model.num_classes and fused.config == model.config
    # The source is untouched (still trainable, same weights and statistics).
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # The FCN head's conv had no bias: folding created one.
    assert fused.head.conv.bias is not None and model.head.conv.bias is None


def test_fuse_bn_rejects_other_modules_and_is_idempotent(make_model) -> None:
    with pytest.raises(TypeError, match="ERFNet"):
        fuse_bn(nn.Conv2d(3, 3, 1))
    model = make_model()
    fused = fuse_bn(model)
    again = fuse_bn(fused)
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fold_bn_into_conv(transposed: bool, bias: bool, random_bn) -> None:
    torch.manual_seed(0)
    if transposed:
        # Different in/out channels: the output channel is dim 1 of the weight.
        conv = nn.ConvTranspose2d(5, 7, 3, stride=2, padding=1, output_padding=1, bias=bias)
    else:
        conv = nn.Conv2d(5, 7, (3, 1), padding=(2, 0), dilation=(2, 1), bias=bias)
    bn = random_bn(nn.BatchNorm2d(7, eps=1e-3), negative=True).eval()
    fused = fold_bn_into_conv(conv, bn)
    x = torch.randn(2, 5, 9, 11)
    with torch.no_grad():
        assert rel_err(fused(x), bn(conv(x))) < 1e-5
    assert fused.bias is not None
    with pytest.raises(ValueError, match="outputs"):
        fold_bn_into_conv(conv, nn.BatchNorm2d(4))


@pytest.mark.parametrize("size", [(16, 16), (15, 21)])
def test_fused_downsampler_with_negative_pool_scale(size: tuple[int, int], make_model) -> None:
    model = make_model()
    block = model.encoder[1]  # DownsamplerBlock(16, 64): 48 conv channels, 16 pool channels
    assert isinstance(block, DownsamplerBlock)
    with torch.no_grad():
        block.bn.weight[48:] = -block.bn.weight[48:].abs()  # every pool channel negative
        fused_block = fuse_bn(model).encoder[1]
        assert isinstance(fused_block.bn, ChannelAffine)
        x = torch.randn(2, 16, *size)
        assert rel_err(fused_block(x), block(x)) < 1e-5


@pytest.mark.parametrize("size", [(64, 128), (75, 141)])
def test_optimize_for_inference_matches(size: tuple[int, int], make_model) -> None:
    model = make_model()
    fast = optimize_for_inference(model)
    fast.head.rows = 8  # small strips so that the strip path runs (several strips, a short one)
    w = fast.encoder[2].conv3x1_1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    # The layers compute in channels_last, even for an NCHW input.
    layouts = []
    fast.encoder[2].register_forward_hook(
        lambda m, a, out: layouts.append(
            out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        )
    )
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    assert layouts == [True]
    assert out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.999


def test_head_strips_equal_whole_head(make_model) -> None:
    model = make_model()
    fused = fuse_bn(model)
    feats = torch.randn(1, 16, 45, 30)
    with torch.no_grad():
        whole = fused.head(feats)
        strips = HeadInStrips(fused.head, rows=7)(feats)
    assert strips.is_contiguous()
    assert torch.allclose(strips, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FCNHead"):
        HeadInStrips(make_model("deconv").head, rows=7)


def head_from_blocks() -> nn.Module:
    """A head model.py does not offer, built from its blocks and plain layers."""
    return nn.Sequential(
        NonBottleneck1d(16, dropout=0.2),
        UpsamplerBlock(16, 32),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(32),  # after a ReLU: nothing to fold into, so it stays
        nn.Conv2d(32, 19, 1),
    )


@pytest.mark.parametrize("size", [(64, 128), (37, 53)])
def test_other_head_from_blocks_fuses(size: tuple[int, int], random_bn) -> None:
    torch.manual_seed(0)
    model = ERFNet()
    model.head = head_from_blocks()
    random_bn(model, negative=True).eval()
    fused, fast = fuse_bn(model), optimize_for_inference(model)
    bns = [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == ["head.5"]
    assert fused.head[2].bias is not None and isinstance(fused.head[3], nn.Identity)
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        ref = model(x)
        for out in (fused(x), fast(x)):
            assert out.shape == ref.shape
            assert rel_err(out, ref) < 1e-4
            assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.999


def test_load_model_fast(tmp_path, make_model) -> None:
    model = make_model()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model)
    plain = load_model(path)
    fast = load_model(path, fast=True)
    assert isinstance(fast, ERFNet) and fast.meta == plain.meta
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(1, 3, 48, 80)
    with torch.inference_mode():
        ref, out = plain(x), fast(x)
    assert rel_err(out, ref) < 1e-4
    assert torch.equal(out.argmax(1), model(x).argmax(1))


def test_tune_cpu_allocator_keeps_results() -> None:
    # In a child process: the allocator setting is process-wide.
    code = (
        "import platform, sys, torch\n"
        "from erfnet.fuse import optimize_for_inference\n"
        "from erfnet.runtime import tune_cpu_allocator\n"
        "from erfnet.model import ERFNet\n"
        "torch.manual_seed(0)\n"
        "fast = optimize_for_inference(ERFNet().eval())\n"
        "x = torch.randn(1, 3, 32, 64)\n"
        "with torch.inference_mode():\n"
        "    before = fast(x)\n"
        "    applied = tune_cpu_allocator()\n"
        "    after = fast(x)\n"
        "glibc = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'\n"
        "assert applied == glibc, (applied, glibc)\n"
        "assert torch.equal(before, after)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_gates_class_maps_leave_autograd_on_between_images() -> None:
    """A generator suspended between two images (``zip`` stops at the shorter iterable) must not
    hold the caller in inference mode: autograd stays on for whatever runs next."""
    from erfnet.checkpoint import complete_meta
    from erfnet.deploy import gate

    class TwoImages:
        def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.full((3, 16, 32), 100 + i, dtype=torch.uint8), torch.zeros(16, 32)

    model = ERFNet(num_classes=3).eval()
    maps = gate.class_maps(
        model, gate.Picks(TwoImages(), [0, 1]), complete_meta(None, 3), None, False
    )
    labels, _ = next(maps)
    assert labels.shape == (16, 32) and torch.is_grad_enabled()
    maps.close()
