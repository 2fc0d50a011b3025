"""Inference-only rewrites of an ERFNet that keep its outputs (to float rounding).

``fuse_bn(model)`` folds every BatchNorm into the convolution before it and drops dropout;
``optimize_for_inference(model)`` is the fastest exact path for the model's device (what
``erfnet.load_model(path, fast=True)`` and scripts/predict.py use); ``tune_cpu_allocator()`` is
an opt-in, process-wide malloc setting that saves the page faults of large CPU tensors.

Folding BN into a conv: ``bn(conv(x)) = s * (W x + b - mean) + beta`` with
``s = gamma / sqrt(var + eps)``, i.e. a conv with weights ``s * W`` and bias
``s * (b - mean) + beta``. For a ConvTranspose2d the output channel is dim 1 of the weight.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys

import torch
import torch.nn.functional as F
from torch import nn

from erfnet.model import (
    DeconvHead,
    DownsamplerBlock,
    ERFNet,
    FCNHead,
    NonBottleneck1d,
    UpsamplerBlock,
)

__all__ = [
    "FusedDownsampler",
    "FusedERFNet",
    "FusedFCNHead",
    "FusedNonBottleneck1d",
    "FusedUpsampler",
    "bn_scale_shift",
    "fold_bn_into_conv",
    "fuse_bn",
    "optimize_for_inference",
    "tune_cpu_allocator",
]


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    # Fold in float64 (on the CPU: not every device has it) so folding adds no rounding error.
    var = _f64(bn.running_var)
    mean = _f64(bn.running_mean)
    gamma = _f64(bn.weight) if bn.weight is not None else torch.ones_like(var)
    beta = _f64(bn.bias) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> nn.Module:
    """A new conv equal to ``bn(conv(x))`` in eval mode (a bias is created when missing)."""
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} outputs but BN {bn.num_features}")
    scale, shift = bn_scale_shift(bn)
    fused = copy.deepcopy(conv)
    w = _f64(conv.weight)
    if isinstance(conv, nn.ConvTranspose2d):
        w = w * scale.view(1, -1, 1, 1)  # weight is [in, out / groups, kH, kW]
    else:
        w = w * scale.view(-1, 1, 1, 1)
    b = _f64(conv.bias) if conv.bias is not None else torch.zeros_like(scale)
    like = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight = nn.Parameter(w.to(**like), requires_grad=False)
    fused.bias = nn.Parameter((b * scale + shift).to(**like), requires_grad=False)
    return fused


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


class FusedDownsampler(nn.Module):
    """DownsamplerBlock with its BN folded: conv channels into the conv, pool channels affine."""

    def __init__(self, block: DownsamplerBlock) -> None:
        super().__init__()
        n_conv = block.conv.out_channels
        scale, shift = bn_scale_shift(block.bn)
        conv_bn = nn.BatchNorm2d(n_conv, eps=block.bn.eps).to(block.bn.running_mean.device)
        with torch.no_grad():
            conv_bn.weight.copy_(block.bn.weight[:n_conv])
            conv_bn.bias.copy_(block.bn.bias[:n_conv])
            conv_bn.running_mean.copy_(block.bn.running_mean[:n_conv])
            conv_bn.running_var.copy_(block.bn.running_var[:n_conv])
        self.conv = fold_bn_into_conv(block.conv, conv_bn)
        like = dict(device=block.conv.weight.device, dtype=block.conv.weight.dtype)
        self.register_buffer("pool_scale", scale[n_conv:].to(**like).view(1, -1, 1, 1))
        self.register_buffer("pool_shift", shift[n_conv:].to(**like).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv(x)
        pool = F.max_pool2d(x, 2, 2)
        if pool.shape[-2:] != conv.shape[-2:] or _tracing():
            pool = F.interpolate(pool, size=conv.shape[-2:], mode="bilinear", align_corners=False)
        # In the conv's dtype, so that under autocast the concat stays in half precision.
        dt = conv.dtype
        pool = torch.addcmul(self.pool_shift.to(dt), pool.to(dt), self.pool_scale.to(dt))
        return torch.relu_(torch.cat([conv, pool], dim=1))


class FusedNonBottleneck1d(nn.Module):
    """NonBottleneck1d with bn1 / bn2 folded into conv1x3_1 / conv1x3_2 and dropout dropped."""

    def __init__(self, block: NonBottleneck1d) -> None:
        super().__init__()
        self.conv3x1_1 = copy.deepcopy(block.conv3x1_1)
        self.conv1x3_1 = fold_bn_into_conv(block.conv1x3_1, block.bn1)
        self.conv3x1_2 = copy.deepcopy(block.conv3x1_2)
        self.conv1x3_2 = fold_bn_into_conv(block.conv1x3_2, block.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu_(self.conv3x1_1(x))
        out = torch.relu_(self.conv1x3_1(out))
        out = torch.relu_(self.conv3x1_2(out))
        out = self.conv1x3_2(out)
        return torch.relu_(out.add_(x))


class FusedUpsampler(nn.Module):
    """UpsamplerBlock with its BN folded into the transposed conv."""

    def __init__(self, block: UpsamplerBlock) -> None:
        super().__init__()
        self.conv = fold_bn_into_conv(block.conv, block.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x))


class FusedFCNHead(nn.Module):
    """FCNHead with its BN folded into the 3x3 conv (which gains a bias); dropout dropped.

    With ``rows > 0`` the head runs in horizontal strips of that many rows: the 128-channel
    hidden map (67 MB at 512x1024) then never leaves the cache, which makes the head about
    twice as fast on CPU. Each output pixel sees exactly the same inputs and weights.
    """

    def __init__(self, head: FCNHead, rows: int = 0) -> None:
        super().__init__()
        self.conv = fold_bn_into_conv(head.conv, head.bn)
        self.classifier = copy.deepcopy(head.classifier)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        if self.rows <= 0 or h <= self.rows:
            return self.classifier(torch.relu_(self.conv(x)))
        conv, cls = self.conv, self.classifier
        ph, pw = conv.padding
        xp = F.pad(x, (0, 0, ph, ph))  # pad rows once; each strip then takes its halo
        out = torch.empty(
            (x.shape[0], cls.out_channels, h, x.shape[3]),
            dtype=x.dtype,
            device=x.device,
            memory_format=_memory_format(x),
        )
        halo = conv.dilation[0] * (conv.kernel_size[0] - 1)
        for r0 in range(0, h, self.rows):
            r1 = min(h, r0 + self.rows)
            hidden = F.conv2d(
                xp[:, :, r0 : r1 + halo], conv.weight, conv.bias, 1, (0, pw), conv.dilation
            )
            out[:, :, r0:r1] = cls(torch.relu_(hidden))
        return out


def _tracing() -> bool:
    """True while tracing for TorchScript / ONNX: shape tests would be frozen into the graph, so
    the resizes are always recorded (a resize to the same size is exactly the identity)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class FusedERFNet(ERFNet):
    """The inference copy made by ``fuse_bn``: same attributes and outputs as the ERFNet.

    ``memory_format`` is applied to the input, so every layer runs in it (channels_last is
    the fast layout for oneDNN on CPU); the logits come back as a contiguous NCHW tensor.
    """

    def __init__(self, src: ERFNet) -> None:
        nn.Module.__init__(self)  # the layers come from ``src``, not from fresh random init
        self.config = dict(src.config)
        self.num_classes = src.num_classes
        if hasattr(src, "meta"):
            self.meta = src.meta
        self.memory_format = torch.contiguous_format
        self.encoder = nn.Sequential(*(_fuse_module(m) for m in src.encoder))
        self.decoder = nn.Sequential(*(_fuse_module(m) for m in src.decoder))
        self.head = _fuse_module(src.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        logits = self.head(self.forward_features(x.contiguous(memory_format=self.memory_format)))
        # Bilinear resizing is faster in NCHW, and callers expect an ordinary tensor.
        logits = logits.contiguous()
        if logits.shape[-2:] != size or _tracing():
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def _fuse_module(m: nn.Module) -> nn.Module:
    if isinstance(m, DownsamplerBlock):
        return FusedDownsampler(m)
    if isinstance(m, NonBottleneck1d):
        return FusedNonBottleneck1d(m)
    if isinstance(m, UpsamplerBlock):
        return FusedUpsampler(m)
    if isinstance(m, FCNHead):
        return FusedFCNHead(m)
    if isinstance(m, DeconvHead):
        return copy.deepcopy(m)
    raise TypeError(f"fuse_bn does not know how to fold {type(m).__name__}")


@torch.no_grad()
def fuse_bn(model: nn.Module) -> FusedERFNet:
    """An eval-mode inference copy of ``model`` (an ERFNet) with every BatchNorm folded away.

    The copy returns the same logits as ``model.eval()`` up to float rounding, for any input
    size, on the same device and dtype. It is for inference only: no parameter requires grad.
    """
    from erfnet.checkpoint import unwrap_model

    src = unwrap_model(model)
    if isinstance(src, FusedERFNet):
        fused = copy.deepcopy(src)
    elif isinstance(src, ERFNet):
        fused = FusedERFNet(src)
    else:
        raise TypeError(f"fuse_bn expects an ERFNet, got {type(src).__name__}")
    fused.eval()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


# Strip height of the FCN head on CPU (see FusedFCNHead); measured best among 16 / 32 / 64.
CPU_HEAD_ROWS = 32


def optimize_for_inference(model: nn.Module) -> FusedERFNet:
    """The fastest exact inference path for ``model`` on its device.

    BatchNorm folded into the convolutions, dropout and Identity modules gone, in-place ReLU
    and residual adds, channels_last layout (oneDNN / cuDNN's fast path), and on CPU the FCN
    head run in cache-sized strips. Outputs equal the eval-mode model to float rounding; the
    result accepts any input size. Lower precision and ``torch.compile`` are not applied here
    (not exact / compiles per input size); ``scripts/benchmark.py`` measures them.
    """
    fused = fuse_bn(model)
    device = next(fused.parameters()).device
    fused.memory_format = torch.channels_last
    fused.to(memory_format=torch.channels_last)
    if device.type == "cpu" and isinstance(fused.head, FusedFCNHead):
        fused.head.rows = CPU_HEAD_ROWS
    return fused


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide); True if applied.

    By default glibc serves large blocks (a feature map at 512x1024 is 8-40 MB) with fresh
    ``mmap`` pages and returns them on free, so every forward pass page-faults hundreds of MB
    back in: about 0.06 s of the fast path's 0.35 s and 0.1 s of the plain model's on a 2-core
    CPU. With mmap off and trimming off, the pages are faulted once and reused. Results are
    unchanged; the cost is that the process keeps its peak memory. The same as running with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. No-op (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    # The largest int: never give the top of the heap back to the OS.
    return mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
