"""The loss as mmseg computes it (normalisation, class weights, OHEM), gradient accumulation and
the SyncBatchNorm scope, each checked against a hand computation of mmseg's behaviour."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train as train_cli
from erfnet.data.cityscapes import CityscapesDataset
from erfnet.model import ERFNet
from erfnet.training.loss import (
    LossConfigError,
    load_class_weights,
    make_criterion,
    ohem_keep_mask,
    segmentation_loss,
)
from erfnet.training.step import convert_sync_batchnorm, train_step


def _batch_with_ignored_pixels(n=2, h=16, w=32, classes=19, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, h, w, generator=g)
    labels = torch.randint(0, classes, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < ignored] = 255
    return images, labels


def _hand_ce_map(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[true class] at labelled pixels, 0 at ignored ones (by hand)."""
    valid = labels != 255
    logp = logits - logits.logsumexp(dim=1, keepdim=True)
    picked = logp.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, -picked, torch.zeros_like(picked))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_train_step_loss_and_gradients_are_mmseg_normalised(avg_non_ignore):
    """train_step's loss is sum(CE over labelled) / (N*H*W) (default) or / labelled pixels
    (--avg-non-ignore), and its gradients are those of that hand-computed loss."""
    torch.manual_seed(0)
    model = ERFNet(dropout=0.0, head_dropout=0.0)
    reference = copy.deepcopy(model)
    images, labels = _batch_with_ignored_pixels()
    n_all, n_labelled = labels.numel(), int((labels != 255).sum())
    assert 0.2 < 1 - n_labelled / n_all < 0.4  # the batch really has ignored pixels

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights alone
    if avg_non_ignore:
        criterion = train_cli.get_criterion(
            train_cli.parse_args(train_cli.get_args_parser(), ["--avg-non-ignore"]),
            [str(i) for i in range(19)],
            255,
        )
        loss = train_step(model, images, labels, opt, criterion=criterion)
    else:
        loss = train_step(model, images, labels, opt)  # the default criterion: mmseg's

    ce = _hand_ce_map(reference(images), labels)
    hand = ce.sum() / (n_labelled if avg_non_ignore else n_all)
    hand.backward()
    assert loss == pytest.approx(hand.item(), rel=1e-6)
    got, want = _grads(model), _grads(reference)
    assert got.keys() == want.keys() and len(got) > 0
    # float32 summation order differs (channels_last, fused kernels): compare on the scale of the
    # largest gradient; the biases before a BatchNorm have a true gradient of 0 (noise only).
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_all_pixel_mean_differs_from_pytorch_default_by_the_ignored_share():
    """The figure in the README: PyTorch's labelled-pixel mean is N*H*W / labelled times mmseg's."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 19, 128, 256, generator=g)
    labels = torch.randint(0, 19, (2, 128, 256), generator=g)
    labels[torch.rand(2, 128, 256, generator=g) < 0.299] = 255
    ours = segmentation_loss(logits, labels)
    pytorch_default = F.cross_entropy(logits, labels, ignore_index=255)
    share_labelled = (labels != 255).float().mean()
    assert ours.item() == pytest.approx(_hand_ce_map(logits, labels).mean().item(), rel=1e-6)
    assert (pytorch_default / ours).item() == pytest.approx(1 / share_labelled.item(), rel=1e-5)
    assert 1.40 < (pytorch_default / ours).item() < 1.45


# ---------------------------------------------------------------- class weights


def _three_class_example():
    # 1 image of 2x2 pixels, 3 classes; labels 0, 1, 2 and one ignored pixel.
    logits = torch.tensor(
        [[[[2.0, 0.0], [1.0, 3.0]], [[0.5, 1.0], [0.0, -1.0]], [[-1.0, 2.0], [1.0, 0.0]]]]
    )
    labels = torch.tensor([[[0, 1], [2, 255]]])
    weights = [1.0, 2.0, 0.5]
    pixels = [((0, 0), 0), ((0, 1), 1), ((1, 0), 2)]  # (pixel, true class) of the labelled ones
    weighted_sum = 0.0
    for (y, x), c in pixels:
        scores = [float(logits[0, k, y, x]) for k in range(3)]
        ce = -(scores[c] - math.log(sum(math.exp(s) for s in scores)))
        weighted_sum += weights[c] * ce
    return logits, labels, weights, weighted_sum


def test_class_weights_multiply_each_pixel_and_the_mean_stays_over_all_pixels():
    logits, labels, weights, weighted_sum = _three_class_example()
    by_all = make_criterion(class_weights=weights)(logits, labels)
    by_labelled = make_criterion(class_weights=weights, avg_non_ignore=True)(logits, labels)
    assert by_all.item() == pytest.approx(weighted_sum / 4, rel=1e-6)  # 4 pixels, 1 ignored
    # mmseg 1.x with avg_non_ignore: / the count of labelled pixels (3), not the weights' sum.
    assert by_labelled.item() == pytest.approx(weighted_sum / 3, rel=1e-6)
    pytorch_weighted_mean = F.cross_entropy(
        logits, labels, weight=torch.tensor(weights), ignore_index=255
    )
    assert pytorch_weighted_mean.item() == pytest.approx(weighted_sum / 3.5, rel=1e-6)
    assert by_labelled.item() != pytest.approx(pytorch_weighted_mean.item(), rel=1e-3)


def _weights_file(tmp_path: Path, content) -> Path:
    path = tmp_path / "weights.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_class_weights_file_is_checked_against_the_dataset(tmp_path: Path):
    names = ["road", "car", "sky"]
    good = _weights_file(tmp_path, {"names": names, "weights": [1, 2.5, 0.5], "method": "x"})
    assert load_class_weights(good, names) == [1.0, 2.5, 0.5]
    no_names = _weights_file(tmp_path, {"weights": [1, 2, 3]})
    assert load_class_weights(no_names, names) == [1.0, 2.0, 3.0]
    bad = [
        ({"names": names, "weights": [1, 2]}, "2 weights, but the dataset has 3 classes"),
        ({"names": ["road", "sky", "car"], "weights": [1, 2, 3]}, "not the dataset's classes"),
        ({"weights": [1, "2", 3]}, "finite numbers >= 0"),
        ({"weights": [1, -2, 3]}, "finite numbers >= 0"),
        ([1, 2, 3], "expected a JSON object"),
        ("{not json", "not a JSON file"),
    ]
    for content, message in bad:
        path = _weights_file(tmp_path, content)
        with pytest.raises(LossConfigError, match=message) as exc:
            load_class_weights(path, names)
        assert str(path) in str(exc.value)
    with pytest.raises(LossConfigError, match="no such file"):
        load_class_weights(tmp_path / "missing.json", names)


def test_bad_class_weights_file_is_one_error_line(synthetic_root: Path, tmp_path: Path, capsys):
    classes = CityscapesDataset(synthetic_root, "train").classes
    path = _weights_file(tmp_path, {"names": list(classes), "weights": [1.0] * (len(classes) - 1)})
    argv = ["--data", "synthetic", "--data-root", str(synthetic_root), "--workers", "0"]
    with pytest.raises(SystemExit) as exc:
        train_cli.cli([*argv, "--work-dir", str(tmp_path / "w"), "--class-weights", str(path)])
    msg = str(exc.value.code)
    assert msg.startswith(f"error: --class-weights {path}: ") and "\n" not in msg
    assert f"{len(classes) - 1} weights, but the dataset has {len(classes)} classes" in msg


# ---------------------------------------------------------------- OHEM


def _ohem_example():
    """2 classes, 1 image of 1x6 pixels, all of true class 1, with chosen probabilities of it;
    the last pixel is ignored (and would be the hardest)."""
    probs = torch.tensor([0.5, 0.1, 0.95, 0.65, 0.8, 0.01])
    logits = torch.stack([torch.zeros(6), torch.log(probs / (1 - probs))]).reshape(1, 2, 1, 6)
    labels = torch.tensor([[[1, 1, 1, 1, 1, 255]]])
    return logits, labels


def test_ohem_keeps_the_pixels_mmseg_keeps():
    logits, labels = _ohem_example()
    # sorted labelled probabilities: 0.1 0.5 0.65 0.8 0.95
    # min_kept 2: max(0.7, sorted[2] = 0.65) = 0.7 -> keep p < 0.7
    keep = ohem_keep_mask(logits, labels, thresh=0.7, min_kept=2)
    assert keep.tolist() == [[[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]]]
    # min_kept 3: max(0.7, 0.8) = 0.8 -> p < 0.8 (strictly: the 0.8 pixel itself is dropped)
    keep = ohem_keep_mask(logits, labels, thresh=0.7, min_kept=3)
    assert keep.tolist() == [[[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]]]
    # min_kept 4: max(0.7, 0.95) -> all labelled pixels but the 0.95 one; never the ignored one
    keep = ohem_keep_mask(logits, labels, thresh=0.7, min_kept=4)
    assert keep.tolist() == [[[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]]]
    # min_kept beyond the labelled count: the index is clamped to the last (n - 1)
    keep = ohem_keep_mask(logits, labels, thresh=0.3, min_kept=100)
    assert keep.tolist() == [[[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]]]
    # a low threshold and min_kept 2: max(0.3, 0.65) = 0.65 -> only 0.1 and 0.5
    keep = ohem_keep_mask(logits, labels, thresh=0.3, min_kept=2)
    assert keep.tolist() == [[[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]]


def test_ohem_min_kept_is_per_image_and_the_loss_stays_over_all_pixels():
    logits, labels = _ohem_example()
    two = torch.cat([logits, logits]), torch.cat([labels, labels])
    # 2 images: min_kept 2 means index 4 of the 10 sorted labelled probabilities
    # (0.1 0.1 0.5 0.5 0.65 0.65 0.8 0.8 0.95 0.95) -> max(0.3, 0.65) -> p < 0.65
    keep = ohem_keep_mask(*two, thresh=0.3, min_kept=2)
    assert keep.tolist() == [[[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]] * 2
    # The loss: kept pixels' CE summed, over all 6 pixels (mmseg's seg_weight, avg_non_ignore off)
    loss = make_criterion(ohem=(0.7, 2))(logits, labels)
    ce = _hand_ce_map(logits, labels)[0, 0]
    assert loss.item() == pytest.approx((ce[0] + ce[1] + ce[3]).item() / 6, rel=1e-6)
    # ... and over the labelled pixels with --avg-non-ignore (5, not the 3 kept)
    loss = make_criterion(ohem=(0.7, 2), avg_non_ignore=True)(logits, labels)
    assert loss.item() == pytest.approx((ce[0] + ce[1] + ce[3]).item() / 5, rel=1e-6)


def test_ohem_flag_is_checked():
    parser = train_cli.get_args_parser()
    args = train_cli.parse_args(parser, ["--ohem", "0.7", "100000"])
    assert args.ohem == (0.7, 100000) and isinstance(args.ohem[1], int)
    for bad in (["0", "100"], ["1.5", "100"], ["0.7", "1"], ["0.7", "2.5"]):
        with pytest.raises(SystemExit):
            train_cli.parse_args(parser, ["--ohem", *bad])


# ---------------------------------------------------------------- accumulation


def _train(model, images, labels, steps, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = [train_step(model, images[i], labels[i], opt, **kw) for i in range(steps)]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_accumulating_two_micro_batches_of_two_equals_a_batch_of_four():
    """--accum-steps 2 --batch-size 2 takes the same steps as --batch-size 4 when the network
    treats every image on its own: BN in eval mode (running statistics, not the micro-batch's)
    and no dropout. In train mode BN normalises each micro-batch by its own statistics, so the
    two runs differ (checked too): that difference is the one the README's table describes."""
    steps = 3
    data = [_batch_with_ignored_pixels(n=4, seed=s) for s in range(steps)]
    images, labels = [d[0] for d in data], [d[1] for d in data]
    torch.manual_seed(0)
    base = ERFNet(dropout=0.0, head_dropout=0.0)

    def run(accum_steps, train_mode):
        model = copy.deepcopy(base)
        model.train(train_mode)
        return _train(model, images, labels, steps, accum_steps=accum_steps)

    losses4, weights4 = run(1, False)
    losses22, weights22 = run(2, False)
    assert losses22 == pytest.approx(losses4, rel=1e-5)
    for k in weights4:
        torch.testing.assert_close(weights22[k], weights4[k], rtol=1e-4, atol=1e-6, msg=k)
    changed = [k for k in weights4 if not torch.equal(weights4[k], base.state_dict()[k])]
    assert len(changed) > 10  # the steps did move the weights

    _, train4 = run(1, True)
    _, train22 = run(2, True)
    assert not all(torch.allclose(train22[k].float(), train4[k].float()) for k in train4)


def test_accum_steps_must_divide_the_batch():
    model = ERFNet(dropout=0.0, head_dropout=0.0)
    images, labels = _batch_with_ignored_pixels(n=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="accum_steps 2"):
        train_step(model, images, labels, opt, accum_steps=2)


# ---------------------------------------------------------------- SyncBatchNorm scope


def _norm_layers(model: nn.Module) -> dict[str, type]:
    return {
        n: type(m)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def test_sync_bn_head_converts_only_the_fcn_heads_bn():
    plain = _norm_layers(ERFNet())
    assert len(plain) > 20 and set(plain.values()) == {nn.BatchNorm2d}
    keys = ERFNet().state_dict().keys()

    head = convert_sync_batchnorm(ERFNet(), "head")
    assert {n for n, t in _norm_layers(head).items() if t is nn.SyncBatchNorm} == {"head.bn"}
    assert _norm_layers(head).keys() == plain.keys() and head.state_dict().keys() == keys

    everything = convert_sync_batchnorm(ERFNet(), "all")
    assert set(_norm_layers(everything).values()) == {nn.SyncBatchNorm}
    assert _norm_layers(everything).keys() == plain.keys()

    assert _norm_layers(convert_sync_batchnorm(ERFNet(), "none")) == plain
    # The paper's deconv head has no BN: "head" then converts nothing.
    deconv = convert_sync_batchnorm(ERFNet(head="deconv"), "head")
    assert nn.SyncBatchNorm not in set(_norm_layers(deconv).values())

    assert train_cli.parse_args(train_cli.get_args_parser(), []).sync_bn == "head"
