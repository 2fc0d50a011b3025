"""ERFNet: shapes, parameter counts, block structure (mmseg's), train/eval behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from erfnet import ERFNet
from erfnet.model import (
    DeconvHead,
    DownsamplerBlock,
    FCNHead,
    NonBottleneck1d,
    UpsamplerBlock,
    count_parameters,
)


@pytest.fixture(scope="module")
def model() -> ERFNet:
    torch.manual_seed(0)
    return ERFNet()


def test_full_resolution_shape_eval(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 1024))
    assert out.shape == (1, 19, 512, 1024)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("head,classes", [("fcn", 19), ("deconv", 20)])
@pytest.mark.parametrize("size", [(97, 203), (64, 96)])
def test_output_shapes_odd_and_even(head, classes, size):
    torch.manual_seed(0)
    net = ERFNet(num_classes=classes, head=head).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = net.forward_features(x)
        out = net(x)
    assert out.shape == (2, classes, *size)
    assert feats.shape[:2] == (2, 16)
    h, w = size
    # Three stride-2 convs (ceil-like) then two exact 2x upsamplings.
    expected = [h, w]
    for _ in range(3):
        expected = [(s + 1) // 2 for s in expected]
    assert list(feats.shape[2:]) == [4 * s for s in expected]
    if h % 8 == 0 and w % 8 == 0:
        assert feats.shape[2:] == (h // 2, w // 2)


def test_deconv_head_doubles_resolution():
    head = DeconvHead(16, 20)
    assert head(torch.randn(1, 16, 13, 27)).shape == (1, 20, 26, 54)
    conv = head.output_conv
    assert isinstance(conv, nn.ConvTranspose2d)
    assert conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.padding == (0, 0)
    assert conv.bias is not None


def test_parameter_counts(model):
    assert count_parameters(model) == 2_084_095
    backbone = count_parameters(model.encoder) + count_parameters(model.decoder)
    assert backbone == 2_062_956
    assert count_parameters(ERFNet(num_classes=20, head="deconv")) == 2_062_956 + 16 * 20 * 4 + 20


def test_block_structure(model):
    enc, dec = model.encoder, model.decoder
    kinds = {DownsamplerBlock: "D", NonBottleneck1d: "N", UpsamplerBlock: "U"}
    assert "".join(kinds[type(m)] for m in enc) == "DDNNNNNDNNNNNNNN"
    assert "".join(kinds[type(m)] for m in dec) == "UNNUNN"
    assert [enc[i].conv.out_channels for i in (0, 1, 7)] == [13, 48, 64]
    assert all(b.conv.bias is not None for b in (enc[0], enc[1], enc[7]))
    dilations = [enc[i].conv3x1_2.dilation[0] for i in range(8, 16)]
    assert dilations == [2, 4, 8, 16, 2, 4, 8, 16]
    for i in [*range(2, 7), *range(8, 16)]:
        b = enc[i]
        d = b.conv3x1_2.dilation[0]
        assert b.conv3x1_2.dilation == (d, 1) and b.conv3x1_2.padding == (d, 0)
        assert b.conv1x3_2.dilation == (1, d) and b.conv1x3_2.padding == (0, d)
        assert b.conv3x1_1.padding == (1, 0) and b.conv1x3_1.padding == (0, 1)
        # mmseg: element-wise Dropout, not Dropout2d.
        assert type(b.dropout) is nn.Dropout and b.dropout.p == pytest.approx(0.1)
    assert all(enc[i].conv3x1_2.dilation == (1, 1) for i in range(2, 7))
    assert all(not isinstance(dec[i].dropout, nn.Dropout) for i in (1, 2, 4, 5))
    for i in (0, 3):
        up = dec[i].conv
        assert isinstance(up, nn.ConvTranspose2d) and up.stride == (2, 2)
        assert up.padding == (1, 1) and up.output_padding == (1, 1) and up.kernel_size == (3, 3)
    backbone_bns = [m for m in [*enc.modules(), *dec.modules()] if isinstance(m, nn.BatchNorm2d)]
    assert len(backbone_bns) == 3 + 13 * 2 + 2 + 4 * 2
    assert all(bn.eps == 1e-3 and bn.momentum == 0.1 for bn in backbone_bns)


def test_fcn_head_structure_and_init(model):
    head = model.head
    assert isinstance(head, FCNHead)
    assert head.conv.bias is None and head.conv.weight.shape == (128, 16, 3, 3)
    assert head.bn.eps == 1e-5
    assert type(head.dropout) is nn.Dropout2d and head.dropout.p == pytest.approx(0.1)
    assert head.classifier.weight.shape == (19, 128, 1, 1)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(head.classifier.bias) == 0
    # mmcv ConvModule init: kaiming normal, fan_out, relu -> std sqrt(2 / (128 * 9)).
    w = head.conv.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.05)
    assert w.abs().max().item() > 0.1  # a normal's tails; PyTorch's uniform default stops at 0.083


def test_dropout_active_only_in_train():
    torch.manual_seed(0)
    net = ERFNet()
    x = torch.randn(2, 3, 32, 48)
    net.train()
    a, b = net(x), net(x)
    assert not torch.allclose(a, b)
    net.eval()
    with torch.no_grad():
        c, d = net(x), net(x)
    assert torch.equal(c, d)


def test_without_dropout_train_mode_is_deterministic():
    torch.manual_seed(0)
    net = ERFNet(dropout=0.0, head_dropout=0.0).train()
    x = torch.randn(2, 3, 32, 48)
    assert torch.equal(net(x), net(x))


def test_batchnorm_statistics_update_only_in_train():
    torch.manual_seed(0)
    net = ERFNet()
    x = torch.randn(2, 3, 32, 48)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    net.eval()
    with torch.no_grad():
        net(x)
    assert all(torch.equal(bn.running_mean, m) for bn, m in zip(bns, before, strict=True))
    net.train()
    with torch.no_grad():
        net(x)
    assert all(not torch.equal(bn.running_mean, m) for bn, m in zip(bns, before, strict=True))
    assert all(bn.num_batches_tracked.item() == 1 for bn in bns)


def test_config_and_bad_arguments():
    net = ERFNet(num_classes=7, head="deconv", dropout=0.2)
    assert net.num_classes == 7
    assert net.config == {
        "num_classes": 7,
        "head": "deconv",
        "dropout": 0.2,
        "head_channels": 128,
        "head_dropout": 0.1,
        "dropout_64": None,
        "dropout2d": False,
    }
    assert ERFNet(**net.config).config == net.config
    with pytest.raises(ValueError, match="head must be one of"):
        ERFNet(head="psp")
    with pytest.raises(ValueError, match="num_classes"):
        ERFNet(num_classes=0)
