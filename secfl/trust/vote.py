"""Vote a trusted party (DESIGN 4): pluggable rules score every participant.

The source patent (CN119005361B) elects one participant "by a voting rule" and compares the
others with it. A naive nearest-neighbour vote is captured by colluders, who simply agree
with each other. Here every rule maps the round's *evidence* to a score in [0, 1] per
participant, the scores are combined with weights, near-duplicate clusters (Sybils) are
zeroed, and the trusted party is the argmax:

* ``reference`` — cosine with the server's own update on the public shared dataset
  (FLTrust's root update, Cao et al. 2021), clipped at 0. Colluders cannot move it.
* ``peer`` — the median cosine to the other participants, clipped at 0. Colluders can
  inflate it for each other only while they are a majority, so it only breaks ties.
* ``reputation`` — the participant's history (:mod:`secfl.trust.reputation`).

The evidence is plain scalars, so the same rules run where only per-client scalars are
revealed (CKKS: the reference inner product and squared norm); pairwise rules need the
pairwise cosine matrix and are skipped where it is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from secfl.errors import ConfigError


@dataclass(frozen=True, eq=False)
class VoteEvidence:
    """What the rules may look at, aligned with ``client_ids``.

    ``reference_cosine`` is ``None`` where the server has no reference update;
    ``pairwise_cosine`` is ``None`` where pairs are not visible (encrypted modes)."""

    client_ids: tuple[int, ...]
    reference_cosine: np.ndarray | None
    pairwise_cosine: np.ndarray | None
    reputation: np.ndarray


#: A vote rule: evidence -> score in [0, 1] per participant (aligned with client_ids),
#: or ``None`` when its evidence is not available this round.
VoteRule = Callable[[VoteEvidence], "np.ndarray | None"]

_RULES: dict[str, VoteRule] = {}
_DEFAULT_WEIGHTS: dict[str, float] = {}


def register_vote_rule(name: str, rule: VoteRule, *, default_weight: float) -> None:
    """Add a rule to the registry (an auditor may plug in their own from outside)."""
    if not name or not name.replace("_", "").isalnum():
        raise ConfigError(f"vote rule name must be a non-empty identifier, got {name!r}")
    if not (np.isfinite(default_weight) and default_weight >= 0):
        raise ConfigError(f"vote rule {name!r}: default_weight must be >= 0, got {default_weight}")
    _RULES[name] = rule
    _DEFAULT_WEIGHTS[name] = float(default_weight)


def registered_vote_rules() -> dict[str, VoteRule]:
    return dict(_RULES)


def default_vote_weight(name: str) -> float:
    if name not in _DEFAULT_WEIGHTS:
        raise ConfigError(f"unknown vote rule {name!r}; allowed {sorted(_RULES)}")
    return _DEFAULT_WEIGHTS[name]


def reference_rule(evidence: VoteEvidence) -> np.ndarray | None:
    """Agreement with the server's reference update: max(cosine, 0)."""
    if evidence.reference_cosine is None:
        return None
    return np.clip(evidence.reference_cosine, 0.0, 1.0)


def peer_rule(evidence: VoteEvidence) -> np.ndarray | None:
    """Agreement with the peers: the median cosine to every other participant, >= 0."""
    pairs = evidence.pairwise_cosine
    n = len(evidence.client_ids)
    if pairs is None or n < 2:
        return None
    others = pairs[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    return np.clip(np.median(others, axis=1), 0.0, 1.0)


def reputation_rule(evidence: VoteEvidence) -> np.ndarray | None:
    """The participant's reputation history, in [0, 1]."""
    return np.clip(evidence.reputation, 0.0, 1.0)


# Reference dominates; peer agreement only breaks ties between honest-looking candidates;
# reputation separates clients flagged in earlier rounds from those never flagged.
register_vote_rule("reference", reference_rule, default_weight=1.0)
register_vote_rule("peer", peer_rule, default_weight=0.1)
register_vote_rule("reputation", reputation_rule, default_weight=0.25)


def find_sybil_clusters(pairwise_cosine: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups (indices) of two or more participants linked by pairwise cosine >=
    ``threshold`` (connected components): near-identical updates from distinct clients, as
    colluders sending one crafted vector do (e.g. ALIE, Baruch et al. 2019)."""
    n = pairwise_cosine.shape[0]
    linked = pairwise_cosine >= threshold
    np.fill_diagonal(linked, False)
    seen = np.zeros(n, dtype=bool)
    clusters: list[list[int]] = []
    for start in range(n):
        if seen[start] or not linked[start].any():
            continue
        stack, members = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            members.append(i)
            for j in np.flatnonzero(linked[i] & ~seen):
                seen[j] = True
                stack.append(int(j))
        clusters.append(sorted(members))
    return clusters


@dataclass(frozen=True, eq=False)
class VoteOutcome:
    """Per-rule and combined scores (aligned with the evidence's ``client_ids``), the
    Sybil clusters (client ids) and the elected index (``None``: nobody scored above 0)."""

    client_ids: tuple[int, ...]
    rule_scores: dict[str, np.ndarray]
    combined: np.ndarray
    sybil_clusters: list[list[int]]
    elected: int | None

    @property
    def trusted_party(self) -> int | None:
        return None if self.elected is None else self.client_ids[self.elected]


def elect_trusted_party(
    evidence: VoteEvidence,
    *,
    rules: Sequence[str],
    weights: Mapping[str, float],
    sybil_cosine: float | None,
) -> VoteOutcome:
    """Score every participant with ``rules``, zero Sybil clusters, elect the argmax.

    The combined score is the weighted mean of the rules that had evidence this round. Ties
    go to the lowest index (deterministic). Nobody is elected when every score is 0."""
    n = len(evidence.client_ids)
    rule_scores: dict[str, np.ndarray] = {}
    total = np.zeros(n, dtype=np.float64)
    weight_sum = 0.0
    for name in rules:
        rule = _RULES.get(name)
        if rule is None:
            raise ConfigError(f"trust.vote.rules: unknown rule {name!r}; allowed {sorted(_RULES)}")
        scores = rule(evidence)
        if scores is None:
            continue
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (n,) or not np.isfinite(scores).all():
            raise ConfigError(f"vote rule {name!r} returned scores of shape {scores.shape}")
        rule_scores[name] = scores
        w = float(weights.get(name, default_vote_weight(name)))
        total += w * scores
        weight_sum += w
    combined = total / weight_sum if weight_sum > 0 else total
    clusters: list[list[int]] = []
    if sybil_cosine is not None and evidence.pairwise_cosine is not None:
        clusters = find_sybil_clusters(evidence.pairwise_cosine, sybil_cosine)
        for members in clusters:
            combined[members] = 0.0
    elected = int(np.argmax(combined)) if n and float(combined.max()) > 0.0 else None
    return VoteOutcome(
        client_ids=evidence.client_ids,
        rule_scores=rule_scores,
        combined=combined,
        sybil_clusters=[[evidence.client_ids[i] for i in c] for c in clusters],
        elected=elected,
    )
