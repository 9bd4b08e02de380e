"""Data layer: `ImageData` and the loaders behind data specs."""

from dpimages.data.imagedata import ImageData, to_uint8, to_unit_range
from dpimages.data.loaders import held_out_split, load, split_train_val

__all__ = ["ImageData", "held_out_split", "load", "split_train_val", "to_uint8", "to_unit_range"]
