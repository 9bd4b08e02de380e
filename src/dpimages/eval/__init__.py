"""Evaluation: downstream classifiers, fidelity metrics, memorization, grids.

Works on image arrays only; never imports a method. Entry point:
`evaluate(synthetic, real_spec_or_RealData, artifacts=..., options=EvalOptions(...))`.
"""

from dpimages.eval.evaluate import RESULT_KEYS, EvalOptions, evaluate, validate_synthetic
from dpimages.eval.splits import RealData, load_real

__all__ = ["RESULT_KEYS", "EvalOptions", "RealData", "evaluate", "load_real", "validate_synthetic"]
