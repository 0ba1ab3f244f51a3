"""Poisoning attacks: malicious-client behaviours for ``adversary:`` in a run config.

The core is sans-I/O: an :class:`Attack` crafts the malicious updates from the updates the
adversary can see (:mod:`secfl.attacks.base`, :mod:`secfl.attacks.poisoning`), and an
:class:`Adversary` decides who is malicious and when it acts
(:mod:`secfl.attacks.adversary`). :mod:`secfl.attacks.simulation` plugs it into a simulated
run. ``docs/attacks.md`` lists the attacks, their pinned parameters and the plug-in interface.
"""

from __future__ import annotations

from secfl.attacks.adversary import (
    ADAPTED_MODES,
    Adversary,
    CraftedRound,
    malicious_count,
    select_malicious,
)
from secfl.attacks.base import (
    Attack,
    AttackContext,
    DataPoisoningAttack,
    get_attack,
    load_plugin,
    register_attack,
    registered_attacks,
)
from secfl.attacks.poisoning import (
    Alie,
    GaussianNoise,
    InnerProductManipulation,
    LabelFlip,
    MinMax,
    MinSum,
    ModelReplacementBackdoor,
    SignFlip,
    alie_z_max,
    apply_trigger,
    ipm_mean_reversing_epsilon,
    search_gamma,
)

__all__ = [
    "ADAPTED_MODES",
    "Adversary",
    "Alie",
    "Attack",
    "AttackContext",
    "CraftedRound",
    "DataPoisoningAttack",
    "GaussianNoise",
    "InnerProductManipulation",
    "LabelFlip",
    "MinMax",
    "MinSum",
    "ModelReplacementBackdoor",
    "SignFlip",
    "alie_z_max",
    "apply_trigger",
    "get_attack",
    "ipm_mean_reversing_epsilon",
    "load_plugin",
    "malicious_count",
    "register_attack",
    "registered_attacks",
    "search_gamma",
    "select_malicious",
]
