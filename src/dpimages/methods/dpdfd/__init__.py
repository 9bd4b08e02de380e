"""DPDFD (`dpdfd`): differentially private data-free distillation.

A non-private teacher, trained in memory on the private data and never
released, labels synthetic images from a label-conditional generator; a
student learns from it only through distillation gradients normalised to
norm C and noised (one Gaussian event per step, sensitivity 2C, no
subsampling amplification); the generator is trained against the fixed
student. Outputs: a DP student classifier and a generator. The privacy
argument is in `method`'s docstring; the released quantity in `release`.
"""

from dpimages.methods.dpdfd.config import DPDFDConfig
from dpimages.methods.dpdfd.method import DPDFD

__all__ = ["DPDFD", "DPDFDConfig"]
