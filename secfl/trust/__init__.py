"""The trust module (DESIGN 4): vote a trusted party, compare, flag, reputation, baselines.

Building blocks are sans-I/O on plain vectors and scalars so every protection mode can use
them; :class:`TrustModule` is the stateful server-side wrapper mode ``none`` calls.
See ``docs/trust.md``.
"""

from secfl.trust.baselines import (
    RobustResult,
    centered_clipping,
    coordinate_median,
    fltrust,
    krum,
    multi_krum,
    trimmed_mean,
)
from secfl.trust.defense import (
    TrustDecision,
    TrustModule,
    build_trust,
    decide_by_baseline,
    decide_by_vote,
)
from secfl.trust.flag import compare_with, cosine_matrix, flag_outliers, robust_thresholds
from secfl.trust.reference import ReferenceTrainer
from secfl.trust.reputation import Reputation
from secfl.trust.vote import (
    VoteEvidence,
    elect_trusted_party,
    find_sybil_clusters,
    register_vote_rule,
    registered_vote_rules,
)

__all__ = [
    "ReferenceTrainer",
    "Reputation",
    "RobustResult",
    "TrustDecision",
    "TrustModule",
    "VoteEvidence",
    "build_trust",
    "centered_clipping",
    "compare_with",
    "coordinate_median",
    "cosine_matrix",
    "decide_by_baseline",
    "decide_by_vote",
    "elect_trusted_party",
    "find_sybil_clusters",
    "flag_outliers",
    "fltrust",
    "krum",
    "multi_krum",
    "register_vote_rule",
    "registered_vote_rules",
    "robust_thresholds",
    "trimmed_mean",
]
