"""Neural networks shared by methods, evaluation and benchmarks."""

from dpimages.nets.classifiers import MLP, ScatterCNN, SmallCNN, num_parameters

__all__ = ["MLP", "ScatterCNN", "SmallCNN", "num_parameters"]
