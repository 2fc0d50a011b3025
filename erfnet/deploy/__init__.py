"""Deployment (optional extras, imported lazily): ONNX export, onnxruntime sessions, int8."""
