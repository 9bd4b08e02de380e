"""Privacy core: ledger, calibration, mechanisms, noise sources and DP-SGD."""

from dpimages.privacy.calibrate import calibrate, calibrate_dpsgd, calibrate_gaussian
from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger, validate_budget
from dpimages.privacy.noise import NoiseSource

__all__ = [
    "NoiseSource",
    "PrivacyEvent",
    "PrivacyLedger",
    "calibrate",
    "calibrate_dpsgd",
    "calibrate_gaussian",
    "validate_budget",
]
