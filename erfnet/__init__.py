"""erfnet: a small, readable, fast PyTorch ERFNet for Cityscapes."""

from erfnet.checkpoint import load_model, save_checkpoint
from erfnet.evaluation.anomaly import anomaly_scores
from erfnet.evaluation.inference import predict
from erfnet.fuse import fuse_bn, optimize_for_inference
from erfnet.model import ERFNet

__all__ = [
    "ERFNet",
    "anomaly_scores",
    "fuse_bn",
    "load_model",
    "optimize_for_inference",
    "predict",
    "save_checkpoint",
]
__version__ = "0.1.0"
