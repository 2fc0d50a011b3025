"""Bounded memory for full-size predictions: the resize of view logits back to the image and
the argmax (or ms+flip's softmax mean) in horizontal strips, in mmseg's order and with the same
labels as the whole computation; ``erfnet.evaluation.inference.predict`` uses it above
``STRIP_BYTES``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Full-size float maps (logits, softmax sums) larger than this are made and reduced in
# horizontal strips, all of a strip's maps within this size (the same labels;
# docs/evaluation.md). Cityscapes' 19 x 1024 x 2048 logits (160 MB) stay whole.
STRIP_BYTES = 256 << 20


def _axis_weights(n_in: int, n_out: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of output positions ``start:stop`` of a bilinear resize
    (align_corners=False) from ``n_in`` to ``n_out``, by F.interpolate's formula."""
    if n_in == n_out:  # F.interpolate copies along an axis that keeps its size
        idx = torch.arange(start, stop)
        ones = torch.ones(stop - start)
        return idx, idx, ones, torch.zeros(stop - start)
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = (scale * (torch.arange(start, stop, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(n_in - 1)
    w1 = (src - i0).clamp(0, 1)
    return i0, torch.where(i0 < n_in - 1, i0 + 1, i0), 1 - w1, w1


def resize_rows(x: torch.Tensor, size: Sequence[int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the bilinear resize (align_corners=False) of NCHW ``x`` to
    ``size``, by F.interpolate's sampling positions and weights (rows first, at ``x``'s width,
    then columns): every row is computed alone, so strips put together equal the whole resize
    exactly; it equals ``resize_logits`` to float rounding (a few 1e-7)."""
    h0, h1, a0, a1 = (t.to(x.device) for t in _axis_weights(x.shape[-2], size[0], start, stop))
    w0, w1, b0, b1 = (t.to(x.device) for t in _axis_weights(x.shape[-1], size[1], 0, size[1]))
    rows = x.index_select(2, h0).mul_(a0[:, None]).add_(x.index_select(2, h1).mul_(a1[:, None]))
    out = rows.index_select(3, w0).mul_(b0)
    return out.add_(rows.index_select(3, w1).mul_(b1))


def strip_rows(maps: int, channels: int, width: int, budget: int = STRIP_BYTES) -> int:
    """Rows per strip so that ``maps`` float32 maps [channels, rows, width] fit ``budget``."""
    return max(1, budget // max(1, 4 * maps * channels * width))


@torch.inference_mode()
def labels_in_strips(
    views: Sequence[tuple[torch.Tensor, bool]], out_size: Sequence[int], rows: int
) -> torch.Tensor:
    """Class map [N, *out_size] from view logits, ``rows`` output rows at a time: one view's
    logits resized to the image then argmax, or (several views, ms+flip) the mean of their
    softmax at the image size (flips undone) then argmax; the order of mmseg's whole-image
    computation, never a full-size float map."""
    h, w = int(out_size[0]), int(out_size[1])
    first = views[0][0]
    labels = torch.empty((first.shape[0], h, w), dtype=torch.long, device=first.device)
    for y0 in range(0, h, rows):
        y1 = min(y0 + rows, h)
        if len(views) == 1:
            labels[:, y0:y1] = resize_rows(first, (h, w), y0, y1).argmax(1)
            continue
        acc: torch.Tensor | None = None
        for logits, flipped in views:
            strip = resize_rows(logits, (h, w), y0, y1)
            probs = torch.softmax(strip.flip(-1) if flipped else strip, dim=1)
            acc = probs if acc is None else acc.add_(probs)
        assert acc is not None
        labels[:, y0:y1] = acc.div_(len(views)).argmax(1)
    return labels
