"""erfnet: a small, readable, fast PyTorch ERFNet for Cityscapes."""

from erfnet.checkpoint import load_model, save_checkpoint
from erfnet.model import ERFNet

__all__ = ["ERFNet", "load_model", "save_checkpoint"]
__version__ = "0.1.0"
