"""DPDM (`dpdm`): a class-conditional EDM diffusion model trained with DP-SGD and noise multiplicity.

See `method` for the privacy contract and `config` for the presets.
"""

from dpimages.methods.dpdm.config import DPDMConfig
from dpimages.methods.dpdm.method import DPDM

__all__ = ["DPDM", "DPDMConfig"]
