"""Refinement (DESIGN 5): shared-set tuning, server and client model inversion, the guard
that refuses inverting what a protection mode hides, and the memorisation check."""

from secfl.refine.guard import teacher_source
from secfl.refine.inversion import InversionSettings, SyntheticSet, invert
from secfl.refine.memorisation import MemorisationReport, memorisation_check
from secfl.refine.moments import ActivationMoments

__all__ = [
    "ActivationMoments",
    "InversionSettings",
    "MemorisationReport",
    "SyntheticSet",
    "invert",
    "memorisation_check",
    "teacher_source",
]
