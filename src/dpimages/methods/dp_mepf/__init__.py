"""DP-MEPF (`dp-mepf`): a generator trained on a once-released noisy mean of perceptual features.

See `method` for the steps and `release` for the privacy contract.
"""

from dpimages.methods.dp_mepf.config import DPMEPFConfig
from dpimages.methods.dp_mepf.method import DPMEPF

__all__ = ["DPMEPF", "DPMEPFConfig"]
