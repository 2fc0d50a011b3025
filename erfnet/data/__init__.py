"""Cityscapes data: the dataset, the mmseg-recipe transforms and a synthetic generator."""

from erfnet.data.cityscapes import CityscapesDataset, DatasetError, resolve_data_root
from erfnet.data.synthetic import make_synthetic_cityscapes
from erfnet.data.transforms import EvalTransform, TrainTransform, normalize, resize_image

# fmt: off
__all__ = ["CityscapesDataset", "DatasetError", "EvalTransform", "TrainTransform",
           "make_synthetic_cityscapes", "normalize", "resize_image", "resolve_data_root"]
# fmt: on
