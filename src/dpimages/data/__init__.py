"""Data layer: `ImageData` and the loaders behind data specs."""

from dpimages.data.imagedata import ImageData, to_uint8, to_unit_range
from dpimages.data.loaders import load, split_train_val

__all__ = ["ImageData", "load", "split_train_val", "to_uint8", "to_unit_range"]
