"""One training iteration, and what shapes it: ``train_step`` (forward, ``criterion``, backward,
optimizer step, gradient accumulation), the lr schedule, SyncBatchNorm, AMP, the DDP wrap."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from erfnet.config import RECIPE
from erfnet.distributed import all_reduce_sum
from erfnet.errors import FlagError
from erfnet.training.loss import Criterion, segmentation_loss


def poly_lr(
    base_lr: float,
    iteration: int,
    max_iters: int,
    power: float = RECIPE.poly_power,
    min_lr: float = RECIPE.min_lr,
) -> float:
    """mmseg's PolyLR with ``eta_min``: ``(base - min) * (1 - it / max) ** power + min``."""
    progress = min(max(iteration, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


class ClosedFormLR(LRScheduler):
    """A schedule whose lr is a closed-form function of the step, so a resumed one matches
    exactly; its state_dict holds only numbers (safe for ``torch.load(weights_only=True)``)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.apply()

    def apply(self) -> None:
        """Put the lr of the current step in the optimizer's groups."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


class PolyLR(ClosedFormLR):
    """Per-iteration poly decay (``poly_lr``)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        power: float = RECIPE.poly_power,
        min_lr: float = RECIPE.min_lr,
        last_epoch: int = -1,
    ) -> None:
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            poly_lr(base, self.last_epoch, self.max_iters, self.power, self.min_lr)
            for base in self.base_lrs
        ]

    def set_max_iters(self, max_iters: int) -> None:
        """Stretch or shorten the schedule (e.g. ``--iters`` changed on resume)."""
        self.max_iters = int(max_iters)
        self.apply()


SYNC_BN_SCOPES = ("head", "all", "none")


def convert_sync_batchnorm(model: nn.Module, scope: str) -> nn.Module:
    """Turn the BatchNorms of ``scope`` into SyncBatchNorm, in place. ``"head"`` is the recipe
    as mmseg ran it: its ERFNet backbone never received the config's ``norm_cfg``, so only the FCN
    head's BN was SyncBN. SyncBatchNorm runs on CUDA only; the conversion works anywhere."""
    if scope not in SYNC_BN_SCOPES:
        raise ValueError(f"scope must be one of {SYNC_BN_SCOPES}, got {scope!r}")
    if scope == "all":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if scope == "head":
        model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
    return model


def amp_settings(
    device: torch.device, amp: bool | None, amp_dtype: str = "auto"
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler) for ``--amp`` / ``--amp-dtype`` on ``device``:
    by default fp16 + GradScaler on CUDA, off on the CPU, where ``--amp`` is bf16 (no scaler)."""
    enabled = amp if amp is not None else device.type == "cuda"
    if not enabled:
        return None, False
    auto = torch.float16 if device.type == "cuda" else torch.bfloat16
    dtype = auto if amp_dtype == "auto" else getattr(torch, amp_dtype)
    if device.type == "cpu" and dtype == torch.float16:
        raise FlagError("--amp-dtype float16 is for CUDA; use bfloat16 on the CPU")
    return dtype, (device.type == "cuda" and dtype == torch.float16)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    criterion: Criterion = segmentation_loss,
    autocast_dtype: torch.dtype | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    accum_steps: int = 1,
) -> float:
    """One optimizer step over ``images`` / ``labels``: forward, ``criterion(logits, labels)`` on
    float32 logits outside autocast, backward and, if the loss is finite, ``optimizer.step()``;
    returns the loss (a non-finite one skips the step). ``reduce`` (DDP) averages the loss over
    processes first, so that every process takes the same decision.

    ``accum_steps`` K > 1 splits the batch into K equal micro-batches, each one's loss divided by
    K and backpropagated on its own (under DDP the all-reduce runs only in the last one's
    backward): with mmseg's all-pixel mean the whole batch's gradient, but BatchNorm sees each
    micro-batch alone.
    """
    if accum_steps < 1 or images.shape[0] % accum_steps:
        raise ValueError(
            f"accum_steps {accum_steps} must be >= 1 and divide the batch of {images.shape[0]}"
        )
    device_type = images.device.type
    use_scaler = scaler is not None and scaler.is_enabled()
    ddp = _ddp_module(model)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=images.device)
    micro = zip(images.chunk(accum_steps), labels.chunk(accum_steps), strict=True)
    for k, (micro_images, micro_labels) in enumerate(micro):
        last = k == accum_steps - 1
        sync = nullcontext() if last or ddp is None else ddp.no_sync()
        ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with sync:
            with ctx:
                logits = model(micro_images)
            loss = criterion(logits.float(), micro_labels)
            if accum_steps > 1:
                loss = loss / accum_steps
            (scaler.scale(loss) if use_scaler else loss).backward()
        total += loss.detach().float()
    value = total.reshape(1)
    if reduce is not None:
        value = reduce(value)
    loss_value = float(value.item())
    if math.isfinite(loss_value):
        if use_scaler:
            scaler.step(optimizer)  # itself skips steps whose fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss_value


def wrap_for_training(
    model: nn.Module, device: torch.device, distributed: bool, compile_it: bool
) -> nn.Module:
    """The model as the step runs it: DistributedDataParallel under torchrun, then
    torch.compile with --compile (checkpoints and validation keep using ``model``)."""
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(model) if compile_it else model


def _ddp_module(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper of ``model`` (also under torch.compile), if any."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the DDP processes (a copy; ``t`` is left as it is)."""
    t = t.clone()
    all_reduce_sum(t)
    return t / dist.get_world_size()
