"""``evaluate``: a loader through ``erfnet.evaluation.inference.predict``, scored as mmseg does.

The metric is a dataset-wide confusion matrix (``erfnet.evaluation.metrics``). Under torchrun each
rank takes a strided shard of the images (no padding duplicates) and the matrices are summed, so the
result equals a single process's exactly. What to do with each batch's predictions besides scoring
them (the Cityscapes test-server PNGs, colour renderings) is the caller's ``on_prediction``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from erfnet.distributed import all_reduce_sum
from erfnet.evaluation.inference import DEFAULT_SETTINGS, Size, TestSettings, eval_mode, predict
from erfnet.evaluation.metrics import ConfusionMatrix
from erfnet.evaluation.settings import model_meta

# evaluate's per-batch callback: (predictions [N, H, W] int64 at the label size, the batch dict).
OnPrediction = Callable[[torch.Tensor, dict], None]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every image exactly once over all ranks (no padding,
    unlike DistributedSampler), so summed metrics equal a single process's."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_eval_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    workers: int = 2,
    pin_memory: bool | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A loader over this rank's shard of ``dataset`` (the whole dataset when not distributed)."""
    rank, world = rank_and_world()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )


def _sharded(loader: DataLoader) -> DataLoader:
    """Under DDP, a loader that is not already a ShardSampler loader is rebuilt as one, so that
    no image is counted twice (DistributedSampler pads) or on every rank."""
    if rank_and_world()[1] == 1 or isinstance(loader.sampler, ShardSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError(
            "evaluate under torchrun needs a DataLoader with batch_size set (or one built by"
            " erfnet.evaluation.inference.build_eval_loader)"
        )
    return build_eval_loader(
        loader.dataset,
        batch_size=loader.batch_size,
        workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
    )


def _out_size(batch: dict, image: torch.Tensor) -> Size:
    """The original size: the label's, else the batch's ``ori_size``, else the image's."""
    if "label" in batch:
        return tuple(batch["label"].shape[-2:])
    size = batch.get("ori_size")
    if size is not None:
        size = torch.as_tensor(size).reshape(-1, 2)
        if not bool((size == size[0]).all()):
            raise ValueError("images of different original sizes in one batch: use batch size 1")
        return int(size[0, 0]), int(size[0, 1])
    return tuple(image.shape[-2:])


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    # DDP's forward may broadcast buffers, a collective that would hang when ranks hold different
    # image counts; evaluation needs none of it.
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def scored_classes(model: nn.Module, num_classes: int) -> int:
    """The model's output count, checked against the ``num_classes`` scored: equal, or one more
    whose ``meta["void_class"]`` is that last index (erfnet_pytorch's "void", predicted but never
    scored). ValueError (one line) otherwise."""
    outputs = getattr(model, "num_classes", None) or num_classes
    void = outputs == num_classes + 1 and model_meta(model).get("void_class") == num_classes
    if outputs != num_classes and not void:
        raise ValueError(
            f"the model predicts {outputs} classes, expected {num_classes} (this evaluation needs"
            f" {num_classes} for label values 0-{num_classes - 1}, or {num_classes + 1} with"
            f" meta['void_class'] = {num_classes})"
        )
    return outputs


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device,
    settings: TestSettings = DEFAULT_SETTINGS,
    *,
    num_classes: int | None = None,
    on_prediction: OnPrediction | None = None,
    progress: bool = True,
) -> dict | None:
    """Run ``loader`` (batches of dataset dicts) through ``model`` as ``settings`` say and
    return the metrics.

    Batches hold ``image`` on the 0-255 scale (uint8 from ``EvalTransform``; the original image
    for ms+flip) and ``label`` at the original size (or ``ori_size`` when unlabelled).
    ``num_classes`` is the number of scored classes, default ``len(loader.dataset.classes)``,
    else the model's (see ``scored_classes``). ``on_prediction(preds, batch)`` is called with
    every batch's predictions (e.g. a ``SubmissionWriter`` or ``ColorWriter``).

    The returned dict is ``ConfusionMatrix.compute()``'s plus ``confusion_matrix`` and
    ``num_images``; ``None`` when the split has no labels. Under torchrun every rank must call
    this; the loader is sharded per rank if it is not already. An ``nn.Module`` is put in eval
    mode and its previous mode restored afterwards.
    """
    device = torch.device(device)
    net = _unwrap_ddp(model)
    if num_classes is None:
        classes = getattr(getattr(loader, "dataset", None), "classes", None)
        num_classes = len(classes) if classes is not None else getattr(net, "num_classes", None)
        if num_classes is None:
            raise ValueError("pass num_classes: neither the dataset nor the model has classes")
    outputs = scored_classes(net, num_classes)
    with eval_mode(net):
        cm, num_images, num_labelled = _predict_all(
            net, _sharded(loader), device, settings, outputs, on_prediction, progress
        )
    all_reduce_sum(cm.mat)
    seen = torch.tensor([num_images, num_labelled], dtype=torch.int64, device=device)
    num_images, num_labelled = all_reduce_sum(seen).tolist()
    if num_labelled == 0:
        return None
    if num_labelled != num_images:
        raise ValueError(
            f"only {num_labelled} of {num_images} images have labels; cannot score a partly"
            " labelled split"
        )
    results = cm.compute(num_classes)
    results["confusion_matrix"] = cm.mat[:num_classes].cpu()  # label rows x prediction columns
    results["num_images"] = num_images
    return results


@torch.inference_mode()
def _predict_all(
    net: nn.Module,
    loader: DataLoader,
    device: torch.device,
    settings: TestSettings,
    outputs: int,
    on_prediction: OnPrediction | None,
    progress: bool,
) -> tuple[ConfusionMatrix, int, int]:
    """This rank's confusion matrix over the model's outputs, images seen and images labelled."""
    cm = ConfusionMatrix(outputs, device)
    num_images = num_labelled = 0
    batches = loader
    if progress and rank_and_world()[0] == 0:
        batches = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True)
    for batch in batches:
        image = batch["image"].to(device, non_blocking=True)
        pred = predict(net, image, _out_size(batch, image), settings)
        num_images += image.shape[0]
        if "label" in batch:
            cm.update(pred, batch["label"].to(device, non_blocking=True))
            num_labelled += image.shape[0]
        if on_prediction is not None:
            on_prediction(pred, batch)
    return cm, num_images, num_labelled
