"""DPAF (`dpaf`): a conditional GAN with differentially private feature aggregation in the discriminator's forward pass.

See `release` for the schedule, the releases and the privacy argument, `method` for training, and `config` for
the schedule's settings and presets.
"""

from dpimages.methods.dpaf.config import DPAFConfig, DPAFNoAggConfig
from dpimages.methods.dpaf.method import DPAF, DPAFNoAggregation
from dpimages.methods.dpaf.release import release_aggregates

__all__ = ["DPAF", "DPAFConfig", "DPAFNoAggConfig", "DPAFNoAggregation", "release_aggregates"]
