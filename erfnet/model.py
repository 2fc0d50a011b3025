"""ERFNet (Romera et al., T-ITS 2018), layer for layer as mmsegmentation's backbone + FCNHead.

The blocks carry the paper's names. ``ERFNet(head="fcn")`` is mmseg's
``erfnet_fcn_4x4_512x1024_160k_cityscapes`` model; ``ERFNet(head="deconv")`` is the original
erfnet_pytorch network, whose decoder ends in a 2x2 transposed convolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erfnet.config import NUM_CLASSES
from erfnet.labels import complete_meta

# Backbone BatchNorm eps: mmseg and the paper's code both use 1e-3 (the head uses the default 1e-5).
BACKBONE_BN_EPS = 1e-3
ENCODER_DILATIONS = (2, 4, 8, 16, 2, 4, 8, 16)
HEADS = ("fcn", "deconv")


def _needs_resize(x: torch.Tensor, size: torch.Size) -> bool:
    """True if ``x`` is not ``size`` (H, W) already, and always while tracing for ONNX /
    TorchScript: the shape test would be frozen into the graph, so the resize is recorded (a
    bilinear resize to the same size is exactly the identity)."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    return tracing or x.shape[-2:] != size


class DownsamplerBlock(nn.Module):
    """Strided 3x3 conv beside a 2x2 max-pool, concatenated: halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=BACKBONE_BN_EPS)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv(x)
        pool = self.pool(x)
        if _needs_resize(pool, conv.shape[-2:]):
            # Odd input sizes: the conv rounds up, the pool down. mmseg resizes the pool output
            # bilinearly; for equal sizes that resize is the identity, so it is skipped.
            pool = F.interpolate(pool, size=conv.shape[-2:], mode="bilinear", align_corners=False)
        return self.relu(self.bn(torch.cat([conv, pool], dim=1)))


class NonBottleneck1d(nn.Module):
    """Residual block of two factorised (3x1 then 1x3) conv pairs, the second pair dilated."""

    def __init__(
        self, channels: int, dropout: float = 0.0, dilation: int = 1, dropout2d: bool = False
    ) -> None:
        super().__init__()
        d = dilation
        self.conv3x1_1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))
        self.conv1x3_1 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(channels, eps=BACKBONE_BN_EPS)
        self.conv3x1_2 = nn.Conv2d(channels, channels, (3, 1), padding=(d, 0), dilation=(d, 1))
        self.conv1x3_2 = nn.Conv2d(channels, channels, (1, 3), padding=(0, d), dilation=(1, d))
        self.bn2 = nn.BatchNorm2d(channels, eps=BACKBONE_BN_EPS)
        # mmseg uses element-wise dropout here, the paper's code Dropout2d (whole channels).
        drop = nn.Dropout2d if dropout2d else nn.Dropout
        self.dropout = drop(dropout) if dropout > 0 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv3x1_1(x))
        out = self.relu(self.bn1(self.conv1x3_1(out)))
        out = self.relu(self.conv3x1_2(out))
        out = self.dropout(self.bn2(self.conv1x3_2(out)))
        return self.relu(out + x)


class UpsamplerBlock(nn.Module):
    """3x3 transposed conv with stride 2: doubles the resolution exactly."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, 3, stride=2, padding=1, output_padding=1
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BACKBONE_BN_EPS)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def build_encoder(
    dropout: float = 0.1, dropout_64: float | None = None, dropout2d: bool = False
) -> nn.Sequential:
    """Encoder to 1/8 resolution, 128 channels. Index order equals mmseg's ``encoder.N``.

    ``dropout`` in the eight 128-channel blocks and, unless ``dropout_64`` is given, in the five
    64-channel ones (mmseg: 0.1 everywhere; erfnet_pytorch's training: 0.3 and 0.03, Dropout2d).
    """
    p64 = dropout if dropout_64 is None else dropout_64
    return nn.Sequential(
        DownsamplerBlock(3, 16),
        DownsamplerBlock(16, 64),
        *(NonBottleneck1d(64, p64, 1, dropout2d) for _ in range(5)),
        DownsamplerBlock(64, 128),
        *(NonBottleneck1d(128, dropout, d, dropout2d) for d in ENCODER_DILATIONS),
    )


def build_decoder() -> nn.Sequential:
    """Decoder from 1/8 to 1/2 resolution, 16 channels. Index order equals mmseg's ``decoder.N``."""
    return nn.Sequential(
        UpsamplerBlock(128, 64),
        NonBottleneck1d(64),
        NonBottleneck1d(64),
        UpsamplerBlock(64, 16),
        NonBottleneck1d(16),
        NonBottleneck1d(16),
    )


class FCNHead(nn.Module):
    """mmseg's FCNHead(num_convs=1, concat_input=False): 3x3 conv, BN, ReLU, Dropout2d, 1x1 conv."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 128, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        # mmcv's ConvModule re-initialises its conv (kaiming normal, fan_out, relu); mmseg's
        # BaseDecodeHead draws conv_seg from normal(std 0.01) with zero bias.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.relu(self.bn(self.conv(x)))))


class DeconvHead(nn.Module):
    """The paper's output layer: a 2x2 transposed conv with stride 2 to full resolution."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.output_conv = nn.ConvTranspose2d(in_channels, num_classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_conv(x)


class ERFNet(nn.Module):
    """ERFNet: encoder, decoder and a head; returns logits at the input's height and width.

    Args:
        num_classes: output channels (19 for Cityscapes; erfnet_pytorch's weights have 20).
        head: ``"fcn"`` (mmseg's FCNHead) or ``"deconv"`` (the paper's transposed-conv output).
        dropout: dropout in the encoder's residual blocks (the 128-channel ones only when
            ``dropout_64`` is given).
        head_channels: hidden channels of the FCN head.
        head_dropout: Dropout2d before the FCN head's classifier.
        dropout_64: dropout of the five 64-channel encoder blocks (None: ``dropout``).
        dropout2d: channel-wise Dropout2d in the encoder (erfnet_pytorch) instead of mmseg's
            element-wise dropout.

    The defaults are mmseg's; ``--recipe erfnet_pytorch`` trains with ``dropout=0.3,
    dropout_64=0.03, dropout2d=True``. A checkpoint records every argument (``model_args``), so
    ``load_model`` rebuilds either; files without the last two get the defaults (mmseg's).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        head: str = "fcn",
        dropout: float = 0.1,
        head_channels: int = 128,
        head_dropout: float = 0.1,
        dropout_64: float | None = None,
        dropout2d: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        # Everything needed to rebuild this model from a checkpoint alone.
        self.config: dict[str, Any] = {
            "num_classes": num_classes,
            "head": head,
            "dropout": dropout,
            "head_channels": head_channels,
            "head_dropout": head_dropout,
            "dropout_64": dropout_64,
            "dropout2d": dropout2d,
        }
        self.num_classes = num_classes
        # The complete meta (mean / std, test size, class names, ...) every reader uses; a loaded
        # checkpoint's replaces it (``load_model``).
        self.meta: dict[str, Any] = complete_meta(None, num_classes, head)
        self.encoder = build_encoder(dropout, dropout_64, dropout2d)
        self.decoder = build_decoder()
        if head == "fcn":
            self.head: nn.Module = FCNHead(16, num_classes, head_channels, head_dropout)
        else:
            self.head = DeconvHead(16, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output: 16 channels at 1/2 resolution."""
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.forward_features(x))
        if _needs_resize(logits, x.shape[-2:]):
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class EncoderStage(nn.Module):
    """The paper's first training stage (erfnet_pytorch's ``Net(..., only_encode=True)``): the
    ERFNet encoder and a 1x1 conv from 128 channels to the classes (its
    ``encoder.output_conv``); logits at 1/8 of the input, not resized.

    ``config`` is the full network's (``ERFNet(**config)``): its encoder settings build the
    encoder, and the second stage builds the full network from it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        self.num_classes = int(config["num_classes"])
        self.meta: dict[str, Any] = complete_meta(None, self.num_classes, config.get("head"))
        self.encoder = build_encoder(
            config.get("dropout", 0.1), config.get("dropout_64"), config.get("dropout2d", False)
        )
        self.output_conv = nn.Conv2d(128, self.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_conv(self.encoder(x))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())
