"""Deployment (optional extras, imported lazily): exported models and their checks.

- ``onnx``: the one ONNX exporter (BN folded, fixed or dynamic size, logits or argmax labels).
- ``openvino_ir``: OpenVINO IRs converted from it, bf16 support check, NNCF int8.
- ``int8``: onnxruntime static int8 of an ONNX export.
- ``gate``: the accuracy gate on held-out images for every reduced-precision export.
- ``build``: scripts/export.py's work (checked output path, temp folder, gate, move into place).
- ``exported``: ``load_exported`` runs an .onnx / .xml like an eval-mode ERFNet; the one
  onnxruntime session builder; the metadata keys.
- ``bench``: every CPU deployment path, for scripts/benchmark.py's deploy section.
"""
