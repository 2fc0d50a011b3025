"""Inference-only copies of an ERFNet that keep its outputs (to float rounding).

``fuse_bn(model)`` folds every BatchNorm into the convolution before it and drops dropout, on a
copy that still runs model.py's own ``forward`` (the folded BatchNorms and the dropouts become
``nn.Identity``); ``optimize_for_inference(model)`` is the fastest exact path for the model's
device (what ``erfnet.load_model(path, fast=True)`` and scripts/predict.py use);

Folding BN into a conv: ``bn(conv(x)) = s * (W x + b - mean) + beta`` with
``s = gamma / sqrt(var + eps)``, i.e. a conv with weights ``s * W`` and bias
``s * (b - mean) + beta``. For a ConvTranspose2d the output channel is dim 1 of the weight.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from erfnet.model import DownsamplerBlock, ERFNet, FCNHead, unwrap_model

BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
CONVS = (nn.Conv2d, nn.ConvTranspose2d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    # Fold in float64 (on the CPU: not every device has it) so folding adds no rounding error.
    var = _f64(bn.running_var)
    mean = _f64(bn.running_mean)
    gamma = _f64(bn.weight) if bn.weight is not None else torch.ones_like(var)
    beta = _f64(bn.bias) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_bn_into_conv(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> nn.Module:
    """A new conv equal to ``bn(conv(x))`` in eval mode (a bias is created when missing)."""
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} outputs but BN {bn.num_features}")
    return _scale_conv(conv, *bn_scale_shift(bn))


@torch.no_grad()
def _scale_conv(
    conv: nn.Conv2d | nn.ConvTranspose2d, scale: torch.Tensor, shift: torch.Tensor
) -> nn.Module:
    """A new conv equal to ``conv(x) * scale + shift`` (per output channel)."""
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


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: what remains of the DownsamplerBlock's BatchNorm.

    That BN normalises ``cat([conv(x), maxpool(x)])``: its conv channels fold into the conv
    (their scale here is 1 and shift 0, which is exact), its pool channels cannot (max-pool does
    not commute with a negative scale) and keep their scale and shift here.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, like: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.to(like.device, like.dtype).view(1, -1, 1, 1))
        self.register_buffer("shift", shift.to(like.device, like.dtype).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))


def _fuse_children(module: nn.Module) -> None:
    """Fold, in place and depth first, each BatchNorm into the conv registered just before it.

    model.py's blocks and ``nn.Sequential`` register a BN right after the conv it normalises,
    which is what makes this walk generic: a head built from those blocks, or a Sequential of
    conv / BN / ReLU layers, fuses too. A BN after anything else stays (it is exact in eval).
    """
    previous_name, previous = "", None
    for name, child in list(module.named_children()):
        if isinstance(module, DownsamplerBlock) and isinstance(child, BATCHNORMS):
            n = module.conv.out_channels
            scale, shift = bn_scale_shift(child)
            module.conv = _scale_conv(module.conv, scale[:n], shift[:n])
            scale[:n], shift[:n] = 1.0, 0.0
            module.bn = ChannelAffine(scale, shift, like=module.conv.weight)
        elif isinstance(child, BATCHNORMS) and isinstance(previous, CONVS):
            setattr(module, previous_name, fold_bn_into_conv(previous, child))
            setattr(module, name, nn.Identity())
        elif isinstance(child, DROPOUTS):
            setattr(module, name, nn.Identity())
        else:
            _fuse_children(child)
        previous_name, previous = name, child


@torch.no_grad()
def fuse_bn(model: nn.Module) -> ERFNet:
    """An eval-mode inference copy of ``model`` (an ERFNet) with every BatchNorm folded away.

    The copy is the same ERFNet class running the same ``forward``; it returns the same logits
    as ``model.eval()`` up to float rounding, for any input size, on the same device and dtype.
    It is for inference only: no parameter requires grad.
    """
    src = unwrap_model(model)
    if not isinstance(src, ERFNet):
        raise TypeError(f"fuse_bn expects an ERFNet, got {type(src).__name__}")
    fused = copy.deepcopy(src).eval()
    _fuse_children(fused)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


class HeadInStrips(nn.Module):
    """Runs ``head`` on horizontal strips of ``rows`` rows (0: whole) and returns NCHW logits.

    On the CPU the FCN head's 128-channel hidden map (67 MB at 512x1024) then never leaves the
    cache. Each strip carries the rows of context its 3x3 conv needs (``halo``), so each output
    pixel sees exactly the inputs and weights it sees in the whole-image head.
    """

    def __init__(self, head: nn.Module, rows: int = 0) -> None:
        super().__init__()
        self.head = head
        self.rows = rows
        if isinstance(head, FCNHead):
            self.halo = head.conv.dilation[0] * (head.conv.kernel_size[0] - 1) // 2
        elif rows > 0:
            raise ValueError(f"strips need an FCNHead, got {type(head).__name__}")
        else:
            self.halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        if self.rows <= 0 or h <= self.rows:
            # Contiguous NCHW: bilinear resizing is faster so, and callers expect it.
            return self.head(x).contiguous()
        out = None
        for r0 in range(0, h, self.rows):
            r1 = min(h, r0 + self.rows)
            a, b = max(0, r0 - self.halo), min(h, r1 + self.halo)
            strip = self.head(x[:, :, a:b])[:, :, r0 - a : r1 - a]
            if out is None:
                out = strip.new_empty((x.shape[0], strip.shape[1], h, x.shape[3]))
            out[:, :, r0:r1] = strip
        return out


# Strip height of the FCN head on CPU (see HeadInStrips); measured best among 16 / 32 / 64.
CPU_HEAD_ROWS = 32


def optimize_for_inference(model: nn.Module) -> ERFNet:
    """The fastest exact inference path for ``model`` on its device: ``fuse_bn(model)`` with
    channels_last weights (oneDNN / cuDNN's fast layout) and, on CPU, the FCN head
    run in cache-sized strips.

    Outputs equal the eval-mode model to float rounding, as a contiguous NCHW tensor, for any
    input size. Lower precision and ``torch.compile`` are not applied here (not exact /
    compiles per input size); ``scripts/benchmark.py`` measures them.
    """
    fast = fuse_bn(model)
    cpu = next(fast.parameters()).device.type == "cpu"
    rows = CPU_HEAD_ROWS if cpu and isinstance(fast.head, FCNHead) else 0
    fast.head = HeadInStrips(fast.head, rows)
    # channels_last weights are enough: convolutions then compute in channels_last whatever the
    # input's layout (converting the input as well measured no faster).
    fast.to(memory_format=torch.channels_last)
    return fast
