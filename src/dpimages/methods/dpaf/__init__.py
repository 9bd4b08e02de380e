"""DPAF (`dpaf`): a conditional GAN with differentially private feature aggregation in the discriminator's forward pass.

See `method` for the privacy argument and `config` for the schedule and presets.
"""

from dpimages.methods.dpaf.config import DPAFConfig, DPAFNoAggConfig
from dpimages.methods.dpaf.method import DPAF, DPAFNoAggregation, release_aggregates

__all__ = ["DPAF", "DPAFConfig", "DPAFNoAggConfig", "DPAFNoAggregation", "release_aggregates"]
