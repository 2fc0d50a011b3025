"""scripts/benchmark.py: FLOP counting against a hand count, and a quick end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erfnet.bench import measure
from erfnet.fuse import fuse_bn
from erfnet.model import ERFNet
from scripts import benchmark

ROOT = Path(__file__).resolve().parents[1]


# Hand count, one formula per layer type (a multiply-add counts 2 FLOPs; bias adds not counted):
#   Conv2d            2 * C_out * C_in / groups * kH * kW * H_out * W_out
#   ConvTranspose2d   2 * C_in * C_out / groups * kH * kW * H_in * W_in  (each input pixel is
#                     scattered into a kH x kW window of every output channel)
#   NonBottleneck1d(C) at H x W: four convs (3x1, 1x3, 3x1 dilated, 1x3 dilated), each
#                     2 * C * C * 3 * H * W (padding keeps H x W; dilation adds no work)
#   BN, ReLU, max-pool, concat, add, dropout, bilinear resize: 0 (not multiply-adds)
def conv_flops(c_in: int, c_out: int, k: int, h_out: int, w_out: int) -> int:
    return 2 * c_out * c_in * k * h_out * w_out


def deconv_flops(c_in: int, c_out: int, k: int, h_in: int, w_in: int) -> int:
    return 2 * c_in * c_out * k * h_in * w_in


def nb_flops(c: int, h: int, w: int) -> int:
    return 4 * conv_flops(c, c, 3, h, w)


def erfnet_hand_flops(h: int, w: int, head: str = "fcn", num_classes: int = 19) -> int:
    """ERFNet FLOPs for H and W divisible by 8 (every stride-2 layer halves exactly)."""
    h2, w2, h4, w4, h8, w8 = h // 2, w // 2, h // 4, w // 4, h // 8, w // 8
    total = conv_flops(3, 13, 9, h2, w2)  # encoder.0 Downsampler 3 -> 16 (conv 3 -> 13)
    total += conv_flops(16, 48, 9, h4, w4)  # encoder.1 Downsampler 16 -> 64
    total += 5 * nb_flops(64, h4, w4)  # encoder.2-6
    total += conv_flops(64, 64, 9, h8, w8)  # encoder.7 Downsampler 64 -> 128
    total += 8 * nb_flops(128, h8, w8)  # encoder.8-15
    total += deconv_flops(128, 64, 9, h8, w8)  # decoder.0 Upsampler
    total += 2 * nb_flops(64, h4, w4)  # decoder.1-2
    total += deconv_flops(64, 16, 9, h4, w4)  # decoder.3 Upsampler
    total += 2 * nb_flops(16, h2, w2)  # decoder.4-5
    if head == "fcn":
        total += conv_flops(16, 128, 9, h2, w2) + conv_flops(128, num_classes, 1, h2, w2)
    else:
        total += deconv_flops(16, num_classes, 4, h2, w2)  # 2x2 transposed conv, stride 2
    return total


def test_hand_count_matches_reference_figure() -> None:
    # REFERENCE: 29.18 GMAC = 58.4 GFLOP at 512x1024, 116.7 GMAC at 1024x2048.
    assert abs(erfnet_hand_flops(512, 1024) / 2e9 - 29.18) < 0.01
    assert abs(erfnet_hand_flops(1024, 2048) / 2e9 - 116.7) < 0.05


@pytest.mark.parametrize("head", ["fcn", "deconv"])
def test_flop_counter_matches_hand_count(head: str) -> None:
    model = ERFNet(head=head).eval()
    for h, w in [(32, 64), (48, 80)]:
        assert measure.count_flops(model, (h, w)) == erfnet_hand_flops(h, w, head)
    assert measure.count_flops(model, (32, 64), batch=3) == 3 * erfnet_hand_flops(32, 64, head)
    # Folding BN changes no convolution.
    assert measure.count_flops(fuse_bn(model), (32, 64)) == erfnet_hand_flops(32, 64, head)


def test_parse_size_and_bad_flags() -> None:
    assert benchmark.parse_size("512x1024") == (512, 1024)
    for argv in (["--sizes", "5x5"], ["--sizes", "512"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as e:  # argparse's usage and error line: exit 2
            benchmark.main(argv)
        assert e.value.code == 2
    with pytest.raises(SystemExit, match="--device meta: expected auto, cpu, cuda"):
        benchmark.main(["--device", "meta"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            benchmark.main(["--device", "cuda"])


def test_cpu_isa_reads_the_flags() -> None:
    isa = measure.cpu_isa()
    assert set(isa) == set(measure.ISA_FLAGS) and all(isinstance(v, bool) for v in isa.values())
    assert measure.format_isa({"AVX2": True, "AMX-INT8": False}) == "AVX2"
    assert measure.format_isa({"AVX2": False}) == "none of AVX2"


def test_interleaved_runs_every_function_each_round() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = measure.interleaved(fns, torch.device("cpu"), repeats=4, warmup=1)
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}


def test_quick_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # As a module from the root: works with or without `pip install -e .`.
    cmd = [
        sys.executable,
        "-m",
        "scripts.benchmark",
        "--quick",
        "--device",
        "cpu",
        "--sizes",
        "32x64",
        "--batch",
        "2",
        "--repeats",
        "2",
        "--json",
        str(out),
        "--sections",
        "flops",
        "infer",
        "malloc",
        "train",
        "data",
        "video",
        "deploy",
        "--data-workers",
        "1",
        "--qat-iters",
        "2",
    ]
    # A hang guard only: on two workers beside other load this run can take minutes.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Inference 32x64, batch 2" in proc.stdout
    res = json.loads(out.read_text())
    assert res["model"]["params"] == 2_084_095
    assert res["model"]["flops"]["32x64"] == erfnet_hand_flops(32, 64)
    assert res["peak_gflops"]["fp32"] > 0
    infer = res["infer"]
    variants = {r["variant"] for r in infer}
    assert {"eager fp32 NCHW", "channels_last", "fused BN", "fast"} <= variants
    assert {(r["size"], r["batch"]) for r in infer} == {("32x64", 1), ("32x64", 2)}
    for r in infer:
        assert r["median_ms"] > 0 and r["images_per_s"] > 0 and r["runs"] == 2
        if "autocast" not in r["variant"]:  # the fp32 variants are exact
            assert r["max_abs_diff"] < 1e-3 and r["argmax_agreement"] > 0.999
    base = [r for r in infer if r["variant"] == "eager fp32 NCHW"]
    assert all(r["speedup"] == 1.0 for r in base)
    train = {r["variant"]: r for r in res["train"]}
    assert set(train) >= {"eager fp32 NCHW", "channels_last"}
    assert all(r["median_s"] > 0 and r["peak_memory_mb"] > 0 for r in train.values())
    data = {r["split"]: r for r in res["data"]}
    assert set(data) == {"train", "val"} and all(r["images_per_s"] > 0 for r in data.values())
    # The train data path: every stage timed, each path's worker and loader rates, projection.
    stages = {r["stage"]: r for r in res["data_stages"]}
    assert {
        "seeding",
        "decode image",
        "decode label",
        "read cache",
        "draw",
        "photometric",
        "resize/crop image",
        "collate",
        "draw + taps",
        "device aug",
    } <= set(stages)
    assert all(r["ms_per_image"] > 0 for r in stages.values())
    paths = {"PNG + worker aug", "cache + worker aug", "PNG + gpu-aug", "cache + gpu-aug"}
    assert {r["path"] for r in res["data_paths"]} == paths
    assert {(r["path"], r["workers"]) for r in res["data_loader"]} == {(p, 1) for p in paths}
    assert all(r["worker_images_per_s"] > 0 for r in res["data_paths"])
    proj = res["recipe_projection"]
    assert proj["step_s"] > 0 and {r["path"] for r in proj["rows"]} == paths
    for r in proj["rows"]:
        assert r["iteration_s"] == max(r["step_s"], r["data_s"])
        assert r["bound"] == ("data" if r["data_s"] > r["step_s"] else "step")
        assert abs(r["recipe_hours"] - 160_000 * r["iteration_s"] / 3600) < 1e-6
    # The allocator comparison: one child process per malloc setting, each timing every variant.
    malloc = {(r["allocator"], r["variant"]): r for r in res["malloc"]}
    for allocator in ("default", "tuned"):
        for variant in ("eager fp32 NCHW", "fast"):
            r = malloc[(allocator, variant)]
            assert r["median_ms"] > 0 and r["runs"] == 2 and r["size"] == "32x64"
            assert r["max_abs_diff"] < 1e-3
    assert malloc[("default", "eager fp32 NCHW")]["speedup"] == 1.0
    # The video path: both modes' per-stage tables and FPS.
    video = res["video"]
    for mode in ("sequential", "pipelined"):
        assert video[mode]["frames"] == video["clip"]["frames"] and video[mode]["fps"] > 0
        assert set(video[mode]["stages"]) == {
            "decode",
            "preprocess",
            "network",
            "postprocess",
            "encode",
        }
    assert video["speedup"] == video["pipelined"]["fps"] / video["sequential"]["fps"]
    assert "Video path" in proc.stdout
    # The deploy paths in one interleaved run, with the CPU's ISA features beside them.
    assert set(res["isa"]) == {"AVX2", "AVX-512", "VNNI", "AVX512-BF16", "AMX-BF16", "AMX-INT8"}
    assert res["machine"]["isa"] == res["isa"] and "ISA: " in proc.stdout
    deploy = {r["path"]: r for r in res["deploy"]}
    expected = {"plain eager fp32", "ours fast=True", "torch bf16 autocast(fast)"}
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        expected |= {"onnxruntime fp32", "onnxruntime int8"}
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("onnx"):
        expected |= {"OpenVINO f32 hint", "OpenVINO default hint"}
        if importlib.util.find_spec("nncf"):
            expected |= {"OpenVINO int8", "OpenVINO int8 QAT"}
    assert expected <= set(deploy), sorted(deploy)
    assert deploy["plain eager fp32"]["speedup"] == 1.0
    for name, r in deploy.items():
        assert r["median_ms"] > 0 and r["size"] == "32x64" and r["threads"] == 2, name
        assert 0 < r["agreement"] <= 100, name
    for exact in {"ours fast=True", "onnxruntime fp32", "OpenVINO f32 hint"} & set(deploy):
        assert deploy[exact]["agreement"] > 99.9, exact
        assert deploy[exact]["gate"].startswith("passes"), exact  # the fp32 thresholds
    assert deploy["plain eager fp32"]["gate"] == "reference"
    assert res["deploy_skipped"]["AOTInductor .pt2"] == "--compile off"  # --quick compiles none
    if importlib.util.find_spec("matplotlib"):  # speed vs agreement, beside the JSON
        assert res["deploy_plot"] == str(out.with_name(out.stem + "_deploy.png"))
        assert Path(res["deploy_plot"]).read_bytes()[:4] == b"\x89PNG"
