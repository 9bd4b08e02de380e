"""Neural networks shared by methods, evaluation and benchmarks."""

from dpimages.nets.classifiers import MLP, SmallCNN, num_parameters

__all__ = ["MLP", "SmallCNN", "num_parameters"]
