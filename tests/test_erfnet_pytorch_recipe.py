"""--recipe erfnet_pytorch and eval.py --protocol erfnet_pytorch, against hand computations of
what erfnet_pytorch's train/main.py and eval_iou.py do, as issue 29 describes them (plain torch
ops and PIL here; the reference network is conftest's ``EPNet``, its module tree)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import eval as eval_script
import train as train_cli
from erfnet import load_model
from erfnet.checkpoint import (
    IntermediateCheckpointError,
    build_model_from_checkpoint,
    load_checkpoint,
    make_checkpoint,
)
from erfnet.config import PAPER_RECIPE
from erfnet.convert import convert_state_dict
from erfnet.data.paper_transforms import PaperTrainTransform, ShorterSideEvalTransform
from erfnet.errors import UserError
from erfnet.model import ERFNet
from erfnet.training.finetune import init_from
from erfnet.training.paper_recipe import EpochPolyLR, build_stage, model_config
from erfnet.training.step import train_step

# The issue's numbers, typed from its text: train ids 0..18, then void.
ENCODER_WEIGHTS = """2.3653597831726 4.4237880706787 2.9691488742828 5.3442072868347
5.2983593940735 5.2275490760803 5.4394111633301 5.3659925460815 3.4170460700989 5.2414722442627
4.7376127243042 5.2286224365234 5.455126285553 4.3019247055054 5.4264230728149 5.4331531524658
5.433765411377 5.4631009101868 5.3947434425354 0"""
DECODER_WEIGHTS = """2.8149201869965 6.9850029945374 3.7890393733978 9.9428062438965
9.7702074050903 9.5110931396484 10.311357498169 10.026463508606 4.6323022842407 9.5608062744141
7.8698215484619 9.5168733596802 10.373730659485 6.6616044044495 10.260489463806 10.287888526917
10.289801597595 10.405355453491 10.138095855713 0"""


def issue_weights(stage: str) -> torch.Tensor:
    text = ENCODER_WEIGHTS if stage == "encoder" else DECODER_WEIGHTS
    return torch.tensor([float(v) for v in text.split()])


# --- hand computations -------------------------------------------------------------------------


def pil_resize(array: np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    return np.array(Image.fromarray(array).resize((size_hw[1], size_hw[0]), resample))


def expand_and_crop(x: torch.Tensor, tx: int, ty: int, fill: int) -> torch.Tensor:
    """PIL's ImageOps.expand(border=(tx, ty, 0, 0), fill) then crop((0, 0, W, H)) of a [C, H, W]
    tensor, as the issue describes it: an expanded canvas of (H + ty, W + tx) holding the fill,
    the image pasted at (tx, ty) (parts off the canvas dropped), then the top-left H x W window,
    0 where it leaves the canvas."""
    c, h, w = x.shape
    canvas = torch.full((c, h + ty, w + tx), fill, dtype=x.dtype)
    for y in range(h):
        for col in range(w):
            cy, cx = y + ty, col + tx
            if 0 <= cy < h + ty and 0 <= cx < w + tx:
                canvas[:, cy, cx] = x[:, y, col]
    out = torch.zeros_like(x)
    kh, kw = min(h, h + ty), min(w, w + tx)
    out[:, :kh, :kw] = canvas[:, :kh, :kw]
    return out


def reference_augment(image: np.ndarray, label: np.ndarray, flip: bool, tx: int, ty: int):
    """erfnet_pytorch's MyCoTransform for one draw: PIL resize to the shorter side 12 (the
    inputs here are 24x40), flip, translate, ToTensor."""
    img = torch.from_numpy(pil_resize(image, (12, 20), Image.BILINEAR).copy()).permute(2, 0, 1)
    lab = torch.from_numpy(pil_resize(label, (12, 20), Image.NEAREST).copy())[None]
    if flip:
        img, lab = img.flip(-1), lab.flip(-1)
    img, lab = expand_and_crop(img, tx, ty, 0), expand_and_crop(lab, tx, ty, 255)
    return img.float() / 255, lab[0].long()


def weighted_nll_by_hand(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor):
    logp = logits.log_softmax(1).gather(1, labels[:, None])[:, 0]
    return -(w[labels] * logp).sum() / w[labels].sum()


def adam_by_hand(p, g, m, v, t, lr, betas, eps, wd):
    """torch's Adam (L2 decay: added to the gradient), one step t (1-based)."""
    g = g + wd * p
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    mhat, vhat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return p - lr * mhat / (vhat.sqrt() + eps), m, v


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def epoch_lr(base: float, iteration: int, per_epoch: int, epochs: int) -> float:
    """LambdaLR(lambda epoch: (1 - (epoch - 1) / epochs) ** 0.9) at 1-based epoch starts."""
    epoch = iteration // per_epoch + 1
    return base * (1 - (epoch - 1) / epochs) ** 0.9


# --- tests -------------------------------------------------------------------------------------


def test_recipe_numbers_are_the_issues():
    r = PAPER_RECIPE
    assert torch.equal(torch.tensor(r.encoder_class_weights), issue_weights("encoder"))
    assert torch.equal(torch.tensor(r.decoder_class_weights), issue_weights("decoder"))
    assert (r.lr, r.betas, r.eps, r.weight_decay) == (5e-4, (0.9, 0.999), 1e-8, 1e-4)
    assert (r.epochs, r.batch_size, r.shorter_side, r.max_shift) == (150, 6, 512, 2)
    parts = build_stage(r, "decoder", 19, iters_per_epoch=1)
    blocks = [m for m in parts.model.encoder if hasattr(m, "dropout")]
    rates = [(m.conv3x1_1.in_channels, type(m.dropout).__name__, m.dropout.p) for m in blocks]
    assert rates == [(64, "Dropout2d", 0.03)] * 5 + [(128, "Dropout2d", 0.3)] * 8
    assert parts.model.num_classes == 20 and parts.model.config["head"] == "deconv"
    # the model config round-trips; mmseg's rates stay the default of a file without them
    assert ERFNet(**parts.model.config).config == parts.model.config
    old_file = make_checkpoint(ERFNet(20, head="deconv"))
    for key in ("dropout_64", "dropout2d"):
        del old_file["model_args"][key]  # a checkpoint written before these arguments
    old = build_model_from_checkpoint(old_file)
    assert old.encoder[2].dropout.p == 0.1 and type(old.encoder[2].dropout) is nn.Dropout
    new = build_model_from_checkpoint(make_checkpoint(parts.model))
    assert new.config == parts.model.config and type(new.encoder[2].dropout) is nn.Dropout2d


def test_augmentation_outputs_are_draws_of_flip_and_translation():
    gen = np.random.default_rng(0)
    image = gen.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    label = gen.integers(0, 19, (24, 40), dtype=np.uint8)
    label[:3] = 255
    candidates = {
        (f, tx, ty): reference_augment(image, label, f, tx, ty)
        for f in (False, True)
        for tx in range(-2, 3)
        for ty in range(-2, 3)
    }
    transform = PaperTrainTransform(shorter_side=12)
    img_t, lab_t = torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label)
    torch.manual_seed(0)
    seen = set()
    for _ in range(600):
        img, lab = transform(img_t, lab_t)
        hits = [k for k, (ri, rl) in candidates.items() if torch.equal(img, ri)]
        hits = [k for k in hits if torch.equal(lab, candidates[k][1])]
        assert hits, "an output no flip / translation draw produces"
        seen.update(hits)
    assert seen == set(candidates)  # every draw occurs: flip both ways, shifts -2..2


def test_stage_labels_and_eval_resize_are_pil_nearest():
    gen = np.random.default_rng(1)
    for h, w in ((64, 128), (60, 100)):
        label = gen.integers(0, 19, (h, w), dtype=np.uint8)
        label[gen.random((h, w)) < 0.2] = 255
        parts = build_stage(PAPER_RECIPE, "encoder", 19, iters_per_epoch=1)
        out = parts.label_transform(torch.from_numpy(label).long()[None])[0]
        size = (math.ceil(h / 8), math.ceil(w / 8))
        expected = torch.from_numpy(pil_resize(label, size, Image.NEAREST).astype(np.int64))
        expected[expected == 255] = 19  # Relabel(255, 19)
        assert torch.equal(out, expected)
    decoder = build_stage(PAPER_RECIPE, "decoder", 19, iters_per_epoch=1)
    full = torch.from_numpy(label.astype(np.int64))[None]
    assert torch.equal(decoder.label_transform(full), full.masked_fill(full == 255, 19))
    # eval: image by PIL BILINEAR (uint8), label by PIL NEAREST, shorter side 32
    image = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img, lab = ShorterSideEvalTransform(32)(
        torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label)
    )
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(pil_resize(image, (32, 53), 2)))
    assert torch.equal(lab, torch.from_numpy(pil_resize(label, (32, 53), 0).astype(np.int64)))


def test_per_epoch_lr_and_resume():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=5e-4)
    sched = EpochPolyLR(opt, iters_per_epoch=3, epochs=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([epoch_lr(5e-4, i, 3, 4) for i in range(12)], rel=1e-12)
    assert len(set(lrs)) == 4  # constant within each epoch
    # torch's own LambdaLR stepped with the 1-based epoch, as train/main.py does
    opt2 = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=5e-4)
    lam = torch.optim.lr_scheduler.LambdaLR(opt2, lambda e: (1 - (e - 1) / 4) ** 0.9)
    for epoch in range(1, 5):
        with pytest.warns(UserWarning):
            lam.step(epoch)
        assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[(epoch - 1) * 3], rel=1e-12)
    opt3 = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=5e-4)
    resumed = EpochPolyLR(opt3, iters_per_epoch=3, epochs=4)
    resumed.load_state_dict(EpochPolyLR(opt, 3, 4, last_epoch=-1).state_dict() | {"last_epoch": 7})
    assert opt3.param_groups[0]["lr"] == pytest.approx(lrs[7], rel=1e-12)


def reference_net(ep_net_class, randomize) -> nn.Module:
    ref = randomize(ep_net_class(20), seed=3).train()
    for m in ref.modules():
        if isinstance(m, nn.Dropout2d):
            m.p = 0.0  # dropout off: both sides deterministic
    return ref


@pytest.mark.parametrize("stage", ["encoder", "decoder"])
def test_one_step_equals_erfnet_pytorch(stage, reference_nets):
    torch.manual_seed(0)
    ref = reference_net(reference_nets.EPNet, reference_nets.randomize)
    recipe = dataclasses.replace(PAPER_RECIPE, dropout_64=0.0, dropout_128=0.0)
    # A large weight decay and two steps across an epoch boundary: Adam's L2 form (not AdamW),
    # both moments and the per-epoch lr all show in the weights.
    lr, wd = 1e-2, 0.5
    parts = build_stage(recipe, stage, 19, iters_per_epoch=1, epochs=4, lr=lr, weight_decay=wd)
    ours = parts.model
    state = convert_state_dict(ref.state_dict(), "erfnet_pytorch")
    if stage == "encoder":
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
        state["output_conv.weight"] = ref.encoder.output_conv.weight.detach().clone()
        state["output_conv.bias"] = ref.encoder.output_conv.bias.detach().clone()
    ours.load_state_dict(state)
    images = torch.rand(2, 3, 16, 32)
    labels = torch.randint(0, 19, (2, 16, 32))
    labels[:, :3] = 255
    weights = issue_weights(stage)
    ref_params = dict(ref.named_parameters())
    pairs = [(p, ref_params[our_to_ref_key(k, stage)]) for k, p in ours.named_parameters()]
    m = v = torch.zeros(sum(p.numel() for p, _ in pairs))
    for t in (1, 2):
        # erfnet_pytorch's step, by hand
        ref_labels = labels.clone()
        if stage == "encoder":
            small = [pil_resize(x.numpy().astype(np.uint8), (2, 4), Image.NEAREST) for x in labels]
            ref_labels = torch.from_numpy(np.stack(small).astype(np.int64))
        ref_labels[ref_labels == 255] = 19
        ref.zero_grad()
        logits = ref.encoder(images, predict=True) if stage == "encoder" else ref(images)
        ref_loss = weighted_nll_by_hand(logits, ref_labels, weights)
        ref_loss.backward()
        before = flat(p.detach() for p, _ in pairs)
        loss = train_step(
            ours, images, parts.label_transform(labels), parts.optimizer, criterion=parts.criterion
        )
        parts.scheduler.step()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
        grads, ref_grads = flat(p.grad for p, _ in pairs), flat(r.grad for _, r in pairs)
        # To float rounding of the largest gradient (a conv bias before a BatchNorm has a true
        # gradient of 0: rounding noise on either side).
        atol = 1e-5 * float(ref_grads.abs().max())
        assert torch.allclose(grads, ref_grads, rtol=1e-4, atol=atol)
        step_lr = lr * (1 - (t - 1) / 4) ** 0.9  # epoch t of 4, one iteration each
        expected, m, v = adam_by_hand(before, grads, m, v, t, step_lr, recipe.betas, recipe.eps, wd)
        assert torch.allclose(flat(p.detach() for p, _ in pairs), expected, rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            for p, r in pairs:
                r.copy_(p)  # both continue from the same weights
    ref_buffers = dict(ref.named_buffers())
    for k, b in ours.named_buffers():
        assert torch.allclose(b.float(), ref_buffers[our_to_ref_key(k, stage)].float(), atol=1e-5)


def our_to_ref_key(key: str, stage: str) -> str:
    """Our parameter name -> EPNet's (the converter's table, inverted for these blocks)."""
    if key.startswith("output_conv."):
        return "encoder." + key
    if key.startswith("head.output_conv."):
        return "decoder." + key[len("head.") :]
    part, index, rest = key.split(".", 2)
    i = int(index)
    if part == "encoder":
        return f"encoder.initial_block.{rest}" if i == 0 else f"encoder.layers.{i - 1}.{rest}"
    return f"decoder.layers.{i}.{rest}"


@pytest.fixture()
def keep_threads():
    """train.py run in this process sets torch's thread count (--threads 1): restored after."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_train_both_stages_resume_and_eval(synthetic_root, tmp_path, keep_threads):
    """One tiny run through both stages (2 epochs of 2 iterations each), then the protocol."""
    work = tmp_path / "run"
    data = ["--data", "synthetic", "--data-root", str(synthetic_root)]
    size = ["--scale", "32", "64", "--epochs", "2", "--batch-size", "2"]
    quiet = ["--log-interval", "1", "--num-vis", "0", "--no-progress", "--threads", "1"]
    args = ["--recipe", "erfnet_pytorch", *data, *size, *quiet, "--work-dir", str(work)]
    assert train_cli.cli([*args, "--workers", "0"]) == 0  # in this process: no second start-up
    log = (work / "train.log").read_text()
    lrs = [float(x) for x in re.findall(r"iter \d+/4 \| loss [\d.]+ \| lr ([\d.e+-]+)", log)]
    base = train_cli.paper_recipe.SYNTHETIC_DEFAULTS["lr"]
    assert lrs == pytest.approx([epoch_lr(base, i % 4, 2, 2) for i in range(8)], rel=1e-3)
    model = load_model(work / "latest.pth")
    assert model.meta["test_size"] == {"rule": "shorter_side", "size": 32}
    assert model.config["dropout2d"] and model.meta["void_class"] == 19
    with pytest.raises(IntermediateCheckpointError, match="--stage decoder") as e:
        load_model(work / "encoder" / "latest.pth")
    assert isinstance(e.value, UserError)
    encoder_ckpt = load_checkpoint(work / "encoder" / "latest.pth")
    assert encoder_ckpt["iteration"] == 4
    # --stage decoder --init-from <the encoder stage>: its encoder, not its 1/8 classifier
    fresh = ERFNet(**model_config(20))
    report = init_from(fresh, work / "encoder" / "latest.pth")
    assert "encoder-only start" in " ".join(report.describe("x"))
    assert set(report.loaded) == {k for k in encoder_ckpt["model"] if k.startswith("encoder.")}
    assert all(torch.equal(fresh.state_dict()[k], encoder_ckpt["model"][k]) for k in report.loaded)
    # --resume across the stage boundary: without the decoder stage's files, the run continues
    # from the finished encoder stage and ends with the same weights (one thread: bit for bit).
    first = load_checkpoint(work / "latest.pth")["model"]
    for name in ("latest.pth", "best.pth"):
        (work / name).unlink()
    assert train_cli.cli([*args, "--workers", "0", "--resume"]) == 0
    again = load_checkpoint(work / "latest.pth")["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    out = tmp_path / "m.json"
    protocol = ["--protocol", "erfnet_pytorch", "--scale", "32", "64", "--json", str(out)]
    eval_script.main(["--checkpoint", str(work / "latest.pth"), *data, *protocol, "--workers", "0"])
    scores = json.loads(out.read_text())
    assert 0 <= scores["mIoU"] <= 100 and scores["shorter_side"] == 32
    with pytest.raises(SystemExit, match="--stage decoder"):
        eval_script.main(["--checkpoint", str(work / "encoder" / "best.pth"), *data])


def test_flags_under_the_recipe(tmp_path):
    parse = train_cli.parse_args
    parser = train_cli.get_args_parser
    args = parse(parser(), ["--recipe", "erfnet_pytorch", "--work-dir", str(tmp_path)])
    assert (args.lr, args.batch_size, args.epochs, args.stage) == (5e-4, 6, 150, "both")
    assert args.head == "deconv" and args.scale[0] == 512 and not args.photometric
    args = parse(parser(), ["--recipe", "erfnet_pytorch", "--lr", "1e-3", "--epochs", "3"])
    assert (args.lr, args.epochs) == (1e-3, 3)
    assert Path(args.work_dir).name == "erfnet_pytorch_cityscapes"
    refused = (["--iters", "10"], ["--crop-size", "8", "8"], ["--head", "fcn"], ["--momentum", "0"])
    for bad in refused:
        with pytest.raises(SystemExit) as e:
            parse(parser(), ["--recipe", "erfnet_pytorch", *bad])
        assert e.value.code == 2
    for bad in (
        ["--recipe", "erfnet_pytorch", "--stage", "encoder", "--init-from", "x.pth"],
        ["--recipe", "erfnet_pytorch", "--stage", "decoder"],
        ["--epochs", "3"],
    ):
        with pytest.raises(SystemExit) as e:
            parse(parser(), bad)
        assert e.value.code == 2


def test_weighted_nll_is_the_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 20, 5, 7)
    labels = torch.randint(0, 20, (2, 5, 7))
    for stage in ("encoder", "decoder"):
        crit = build_stage(PAPER_RECIPE, stage, 19, iters_per_epoch=1).criterion
        w = issue_weights(stage)
        assert crit(logits, labels).item() == pytest.approx(
            weighted_nll_by_hand(logits, labels, w).item(), rel=1e-6
        )
