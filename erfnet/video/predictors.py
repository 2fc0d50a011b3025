"""The network stage of the video path: a predictor preprocesses a frame (in the reader
thread) and predicts its class map (in the main thread). ``TorchPredictor`` runs our model
(CUDA: uint8 upload, GPU preprocessing, fp16, a CUDA graph), ``ExportedPredictor`` an ONNX /
OpenVINO export on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from erfnet.data.transforms import normalize, resize_image
from erfnet.deploy.exported import ExportedModel, ExportError, load_exported
from erfnet.test_size import rule_and_scale, rule_size
from erfnet.video.io import Size, VideoError


def _mean_std(meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def preprocess_frame(
    rgb: torch.Tensor, size: Size | None, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, h, w] float32: resized in 0-255 space and rounded (as mmseg
    resizes the uint8 image), then ``(x - mean) / std``."""
    x = rgb.permute(2, 0, 1)[None]
    if size is not None:
        x = resize_image(x, size)
    return normalize(x, mean, std)


def network_size_for(
    frame_size: Sequence[int], network_size: Size | None, test_size: dict | None
) -> Size | None:
    """The network input size of a frame: ``network_size`` (``--resize``, or an export's fixed
    size) when set, else the frame resized by ``test_size``'s rule (a checkpoint's
    ``meta["test_size"]``), else None (the frame's own size)."""
    if network_size is not None or test_size is None:
        return network_size
    rule, scale = rule_and_scale(test_size)
    return rule_size((int(frame_size[0]), int(frame_size[1])), rule, scale)


def _labels(logits: torch.Tensor, frame_size: Size) -> torch.Tensor:
    """Logits resized bilinearly to the frame (if needed), argmax, uint8 [H, W]."""
    if tuple(logits.shape[-2:]) != tuple(frame_size):
        logits = F.interpolate(
            logits.float(), size=frame_size, mode="bilinear", align_corners=False
        )
    return logits.argmax(1)[0].to(torch.uint8)


class TorchPredictor:
    """A PyTorch ERFNet (ideally ``erfnet.load_model(path, device, fast=True)``) on its device. On
    CUDA the frame goes up as uint8 from a pinned buffer, preprocessing runs on the GPU, the network
    under fp16 autocast, and with ``cuda_graph`` (the frame size is then fixed) the whole frame ->
    labels computation is captured once in a CUDA graph and replayed."""

    backend = "torch"

    def __init__(
        self,
        model: nn.Module,
        network_size: Size | None = None,
        amp: bool = True,
        cuda_graph: bool = True,
        test_size: dict | None = None,
    ) -> None:
        self.model = model.eval()
        self.meta = model.meta  # a loaded checkpoint's complete meta: mean / std, palette
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.network_size = tuple(network_size) if network_size else None
        self.test_size = test_size
        self.amp = amp and self.cuda
        mean, std = _mean_std(self.meta)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.use_graph = cuda_graph and self.cuda
        self._graph: Any = None
        self._graph_size: Size | None = None
        self.notes: list[str] = []

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        frame = torch.from_numpy(np.ascontiguousarray(rgb))
        if self.cuda:  # pinned (cached by PyTorch's host allocator): an async copy in predict
            return frame.pin_memory()
        size = network_size_for(frame.shape[:2], self.network_size, self.test_size)
        return preprocess_frame(frame, size, self.mean, self.std).contiguous(
            memory_format=torch.channels_last
        )

    @torch.inference_mode()
    def _frame_to_labels(self, x: torch.Tensor, frame_size: Size) -> torch.Tensor:
        if self.cuda:
            size = network_size_for(x.shape[:2], self.network_size, self.test_size)
            x = preprocess_frame(x, size, self.mean, self.std)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.float16, enabled=self.amp, cache_enabled=False):
            logits = self.model(x)
        return _labels(logits, frame_size)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, frame_size: Size) -> np.ndarray:
        if not self.cuda:
            return self._frame_to_labels(x, frame_size).numpy()
        frame = x.to(self.device, non_blocking=True)
        if self.use_graph and self._graph is None:
            self._capture(frame, frame_size)
        if self._graph is not None and self._graph_size == tuple(frame.shape):
            self._static_in.copy_(frame)
            self._graph.replay()
            labels = self._static_out
        else:
            labels = self._frame_to_labels(frame, frame_size)
        return labels.cpu().numpy()  # waits for the GPU: the network stage ends here

    def _capture(self, frame: torch.Tensor, frame_size: Size) -> None:
        """Record frame -> labels once for this frame size; eager mode if capture fails."""
        try:
            self._static_in = frame.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: cuDNN picks its kernels outside the capture
                    self._frame_to_labels(self._static_in, frame_size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_out = self._frame_to_labels(self._static_in, frame_size)
            self._graph, self._graph_size = graph, tuple(frame.shape)
            self.notes.append(f"CUDA graph captured for {frame_size[0]}x{frame_size[1]} frames")
        except RuntimeError as e:  # e.g. an op that cannot be captured: stay eager
            self.use_graph = False
            self.notes.append(f"CUDA graph not used ({str(e).splitlines()[0]}); eager mode")


class ExportedPredictor:
    """An exported model (.onnx through onnxruntime, OpenVINO .xml, AOTInductor .pt2) on the
    CPU, run through ``erfnet.deploy.exported.load_exported``: normalisation and palette come
    from the meta the exporter wrote into the file; a graph exported for a fixed size sets the
    network size.
    ``model`` is a loaded ``ExportedModel`` or the path of one."""

    def __init__(
        self,
        model: ExportedModel | str | Path,
        network_size: Size | None = None,
        threads: int = 0,
        test_size: dict | None = None,
    ):
        if not isinstance(model, ExportedModel):
            try:
                model = load_exported(model, threads)
            except ExportError as e:
                raise VideoError(f"--model {e}") from None
        self.model, path = model, model.path
        self.meta = self.model.meta
        backends = {"onnx": "onnxruntime", "openvino": "openvino", "pt2": "aotinductor"}
        self.backend = backends[self.model.format]
        fixed = self.model.input_size
        if network_size and fixed and tuple(network_size) != fixed:
            raise VideoError(
                f"--model {path} was exported for {fixed[0]}x{fixed[1]} inputs; --resize"
                f" {network_size[0]} {network_size[1]} cannot be used with it"
            )
        self.network_size = tuple(network_size) if network_size else fixed
        self.test_size = test_size
        self.mean, self.std = _mean_std(self.meta)
        self.device = torch.device("cpu")
        self.notes: list[str] = []

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        frame = torch.from_numpy(np.ascontiguousarray(rgb))
        size = network_size_for(frame.shape[:2], self.network_size, self.test_size)
        return preprocess_frame(frame, size, self.mean, self.std)

    def predict(self, x: torch.Tensor, frame_size: Size) -> np.ndarray:
        out = self.model(x)
        if self.model.output == "labels":  # argmax inside the graph: resize the labels
            if tuple(out.shape[-2:]) != tuple(frame_size):
                out = F.interpolate(out[:, None].float(), size=frame_size, mode="nearest")[:, 0]
            return out[0].to(torch.uint8).numpy()
        return _labels(out, frame_size).numpy()


OnnxPredictor = ExportedPredictor  # the name before OpenVINO files were accepted
