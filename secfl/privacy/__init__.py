"""Differential privacy: DP events, accountants (libraries), ledgers, DP-SGD, central DP.

See ``docs/privacy.md``. Importable on its own (DESIGN 7).
"""

from secfl.privacy.accountants import (
    ACCOUNTANT_NAMES,
    accountant,
    accountant_for,
    calibrate_noise_multiplier,
    epsilon,
    register_accountant,
)
from secfl.privacy.central import CentralGaussianMechanism, UserLevelMechanism, clip_to_norm
from secfl.privacy.discrete import sample_skellam, skellam_rdp
from secfl.privacy.dpsgd import DpSgdSettings, PerSampleGradients, train_dp_sgd, validate_model
from secfl.privacy.events import DpEvent
from secfl.privacy.ledger import PartyLedger, check_delta

__all__ = [
    "ACCOUNTANT_NAMES",
    "CentralGaussianMechanism",
    "DpEvent",
    "DpSgdSettings",
    "PartyLedger",
    "PerSampleGradients",
    "UserLevelMechanism",
    "accountant",
    "accountant_for",
    "calibrate_noise_multiplier",
    "check_delta",
    "clip_to_norm",
    "epsilon",
    "register_accountant",
    "sample_skellam",
    "skellam_rdp",
    "train_dp_sgd",
    "validate_model",
]
