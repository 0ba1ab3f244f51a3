"""The trust module's round (DESIGN 4): vote, compare, flag, update reputations, log.

:func:`decide_by_vote` and :func:`decide_by_baseline` are the sans-I/O core: plain vectors
and weights in, a :class:`TrustDecision` out. :class:`TrustModule` is the server-side,
stateful wrapper a protection mode calls: it computes the reference update, keeps the
reputations (and centered clipping's centre) across rounds, writes every decision to the
event log, and checkpoints its state.

Under masking (:meth:`TrustModule.defend_cohorts`) the candidates are sub-cohort means, the
only vectors the server sees; every member of a flagged sub-cohort gains suspicion
(:class:`~secfl.trust.reputation.Suspicion`), and :meth:`TrustModule.admit` keeps clients
whose suspicion reached the bound out of later rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from secfl.audit.events import EventLog, register_event
from secfl.errors import CheckpointError, ConfigError, UpdateError
from secfl.server.aggregate import WeightedSum
from secfl.trust import baselines
from secfl.trust.flag import (
    Threshold,
    compare_with,
    cosine_matrix,
    cosine_with,
    fixed_thresholds,
    flag_outliers,
    robust_thresholds,
)
from secfl.trust.prune import DormantPruner, dormant_share
from secfl.trust.reference import ReferenceTrainer
from secfl.trust.reputation import Reputation, Suspicion
from secfl.trust.vote import VoteEvidence, elect_trusted_party

if TYPE_CHECKING:
    from torch import nn

    from secfl.config import RunConfig, TrustConfig
    from secfl.data.datasets import Dataset
    from secfl.randomness import Randomness

register_event(
    "trust_vote",
    ("round", "attempt", "defense", "trusted_party", "scores", "rules", "sybil_clusters"),
)
register_event(
    "trust_flag", ("round", "attempt", "defense", "client", "metrics", "threshold", "reason")
)
register_event("trust_kept", ("round", "attempt", "defense", "clients", "thresholds"))
register_event(
    "trust_cohort_flag",
    ("round", "attempt", "cohort", "members", "metrics", "threshold", "reason", "suspicion"),
)
register_event("trust_cohort_kept", ("round", "attempt", "cohorts", "thresholds", "suspicion"))
register_event("trust_excluded", ("round", "attempt", "client", "suspicion", "bound", "reason"))
register_event("trust_prune", ("round", "attempt", "layers", "zeroed", "removed_norm", "tau"))

#: Defenses whose output is the weighted mean of a subset of the updates, so central
#: user-level DP (clip, sum, noise) can be applied to what they keep.
SELECTING_DEFENSES = frozenset({"vote", "krum", "multi_krum"})
#: Smallest population the robust thresholds are estimated on before falling back.
MIN_POPULATION = 3


@dataclass(frozen=True, eq=False)
class TrustDecision:
    """One round's decision: the aggregate of what was kept, and who was flagged and why.

    ``scores`` are the combined vote scores (``vote``) or the rule's per-client scores
    (Krum scores, FLTrust weights); ``metrics`` each participant's comparison with the
    trusted party; ``thresholds`` the bounds applied (``Threshold.describe()``)."""

    defense: str
    mean_update: np.ndarray
    total_weight: float
    kept: tuple[int, ...]
    flagged: dict[int, str]
    trusted_party: int | None = None
    scores: dict[int, float] = field(default_factory=dict)
    rule_scores: dict[str, dict[int, float]] = field(default_factory=dict)
    sybil_clusters: list[list[int]] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, object]] = field(default_factory=dict)


def _stack(updates: Mapping[int, np.ndarray]) -> tuple[tuple[int, ...], np.ndarray]:
    ids = tuple(sorted(updates))
    if not ids:
        raise UpdateError("the trust module needs at least one update")
    return ids, np.stack([np.asarray(updates[c], dtype=np.float32) for c in ids])


def weighted_mean_of(
    updates: Mapping[int, np.ndarray], weights: Mapping[int, float], kept: tuple[int, ...]
) -> tuple[np.ndarray, float]:
    """The sample-weighted mean of the kept updates, summed exactly as mode ``none`` sums
    (so a round whose flagged clients had never replied gives the same bits)."""
    if not kept:
        size = next(iter(updates.values())).size
        return np.zeros(size, dtype=np.float32), 0.0
    total = WeightedSum(next(iter(updates.values())).size)
    for client_id in kept:
        total.add(client_id, np.asarray(updates[client_id], dtype=np.float32), weights[client_id])
    return total.weighted_mean(), total.total_weight


def decide_by_vote(
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, float],
    *,
    reference: np.ndarray | None,
    reputation: Mapping[int, float],
    config: TrustConfig,
    detect_sybils: bool = True,
) -> TrustDecision:
    """Elect a trusted party, compare everyone with it, flag outliers, average the rest.

    ``detect_sybils=False`` skips near-duplicate detection (sub-cohort means: averaging
    makes honest sub-cohorts' means nearly parallel, so closeness is no evidence there)."""
    ids, x = _stack(updates)
    if "reference" in config.vote.rules and reference is None:
        raise ConfigError("trust.vote.rules includes 'reference' but no reference update given")
    ref_cos = cosine_with(x, reference) if reference is not None else None
    pairs = cosine_matrix(x)
    evidence = VoteEvidence(
        client_ids=ids,
        reference_cosine=ref_cos,
        pairwise_cosine=pairs,
        reputation=np.array([reputation.get(c, config.reputation.initial) for c in ids]),
    )
    sybil = config.sybil
    outcome = elect_trusted_party(
        evidence,
        rules=config.vote.rules,
        weights=config.vote.weights,
        sybil_cosine=sybil.cosine if detect_sybils else None,
    )
    flagged: dict[int, str] = {}
    index = {c: i for i, c in enumerate(ids)}
    sybil_rows: set[int] = set()
    if sybil.flag and detect_sybils:
        for members in outcome.sybil_clusters:
            for c in members:
                sybil_rows.add(index[c])
                flagged[c] = (
                    f"near-duplicate (Sybil) cluster {members}: pairwise cosine >= "
                    f"{sybil.cosine} (trust.sybil.cosine)"
                )
    metrics: dict[int, dict[str, float]] = {}
    thresholds: dict[str, dict[str, object]] = {}
    elected = outcome.elected
    if elected is None:
        for c in ids:
            flagged.setdefault(
                c, "no trusted party could be elected: every participant's vote score is 0"
            )
    else:
        trusted = outcome.client_ids[elected]
        values = compare_with(x, x[elected], config.compare.metrics)
        for i, c in enumerate(ids):
            metrics[c] = {m: float(v[i]) for m, v in values.items()}
        bounds = _thresholds(config, values, _population(len(ids), elected, sybil_rows, ref_cos))
        thresholds = {m: t.describe() for m, t in bounds.items()}
        outliers = flag_outliers(
            values, bounds, exempt=(elected,), against=f"trusted party {trusted}"
        )
        for i, reason in outliers.items():
            flagged.setdefault(ids[i], reason)
    kept = tuple(c for c in ids if c not in flagged)
    mean, total_weight = weighted_mean_of(updates, weights, kept)
    return TrustDecision(
        defense="vote",
        mean_update=mean,
        total_weight=total_weight,
        kept=kept,
        flagged={c: flagged[c] for c in ids if c in flagged},
        trusted_party=outcome.trusted_party,
        scores={c: float(outcome.combined[i]) for i, c in enumerate(ids)},
        rule_scores={
            name: {c: float(s[i]) for i, c in enumerate(ids)}
            for name, s in outcome.rule_scores.items()
        },
        sybil_clusters=outcome.sybil_clusters,
        metrics=metrics,
        thresholds=thresholds,
    )


#: Vote rules that need every pair of updates; skipped where only per-client scalars are
#: revealed (mode ``ckks``), as is Sybil detection.
PAIRWISE_RULES = frozenset({"peer"})


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def scalar_metrics(
    squared_norms: np.ndarray, trusted_inner: np.ndarray, trusted_row: int, metrics: Sequence[str]
) -> dict[str, np.ndarray]:
    """Compare with the trusted party t from scalars only (mode ``ckks``): cosine
    s3 / sqrt(s2_i s2_t), distance sqrt(s2_i + s2_t - 2 s3), norm ratio sqrt(s2_i / s2_t).
    Released scalars carry flooding noise, so squared norms are floored at 0 and cosines
    clipped to [-1, 1]."""
    s2 = np.maximum(np.asarray(squared_norms, dtype=np.float64), 0.0)
    s3 = np.asarray(trusted_inner, dtype=np.float64)
    s2_t = float(s2[trusted_row])
    out: dict[str, np.ndarray] = {}
    for name in metrics:
        if name == "cosine":
            out[name] = np.clip(_safe_ratio(s3, np.sqrt(s2 * s2_t)), -1.0, 1.0)
        elif name == "distance":
            out[name] = np.sqrt(np.maximum(s2 + s2_t - 2.0 * s3, 0.0))
        elif name == "norm_ratio":
            out[name] = np.sqrt(s2 / max(s2_t, np.finfo(np.float64).tiny))
        else:
            raise ConfigError(f"trust.compare.metrics: unknown metric {name!r}")
    return out


def decide_by_scalars(
    weights: Mapping[int, float],
    *,
    reference_inner: Mapping[int, float] | None,
    reference_norm: float | None,
    squared_norms: Mapping[int, float],
    trusted_inner: Callable[[int], Mapping[int, float]],
    reputation: Mapping[int, float],
    config: TrustConfig,
) -> TrustDecision:
    """The vote and flag of :func:`decide_by_vote` from per-client scalars only (mode
    ``ckks``): s1 = <x_i, r>, s2 = ||x_i||^2, and, once t is elected, s3 = <x_i, x_t> from
    ``trusted_inner(t)`` (every participant but t). The reference cosine is
    s1 / (||r|| sqrt(s2)); pairwise rules and Sybil detection do not run (no pairs are
    revealed). ``mean_update`` is empty: the caller sums the kept clients' ciphertexts."""
    ids = tuple(sorted(squared_norms))
    if not ids:
        raise UpdateError("the trust module needs at least one update")
    if "reference" in config.vote.rules and (reference_inner is None or reference_norm is None):
        raise ConfigError("trust.vote.rules includes 'reference' but no reference update given")
    s2 = np.array([squared_norms[c] for c in ids], dtype=np.float64)
    ref_cos = None
    if reference_inner is not None and reference_norm is not None:
        s1 = np.array([reference_inner[c] for c in ids], dtype=np.float64)
        ref_cos = np.clip(_safe_ratio(s1, reference_norm * np.sqrt(np.maximum(s2, 0.0))), -1.0, 1.0)
    evidence = VoteEvidence(
        client_ids=ids,
        reference_cosine=ref_cos,
        pairwise_cosine=None,
        reputation=np.array([reputation.get(c, config.reputation.initial) for c in ids]),
    )
    outcome = elect_trusted_party(
        evidence, rules=config.vote.rules, weights=config.vote.weights, sybil_cosine=None
    )
    flagged: dict[int, str] = {}
    metrics: dict[int, dict[str, float]] = {}
    thresholds: dict[str, dict[str, object]] = {}
    elected = outcome.elected
    if elected is None:
        for c in ids:
            flagged[c] = "no trusted party could be elected: every participant's vote score is 0"
    else:
        trusted = ids[elected]
        inner = dict(trusted_inner(trusted))
        inner[trusted] = float(s2[elected])  # <x_t, x_t>: never requested, it is s2_t
        s3 = np.array([inner[c] for c in ids], dtype=np.float64)
        values = scalar_metrics(s2, s3, elected, config.compare.metrics)
        for i, c in enumerate(ids):
            metrics[c] = {m: float(v[i]) for m, v in values.items()}
        bounds = _thresholds(config, values, _population(len(ids), elected, set(), ref_cos))
        thresholds = {m: t.describe() for m, t in bounds.items()}
        outliers = flag_outliers(
            values, bounds, exempt=(elected,), against=f"trusted party {trusted}"
        )
        for i, reason in outliers.items():
            flagged[ids[i]] = reason
    kept = tuple(c for c in ids if c not in flagged)
    return TrustDecision(
        defense="vote",
        mean_update=np.zeros(0, dtype=np.float32),
        total_weight=float(sum(weights[c] for c in kept)),
        kept=kept,
        flagged={c: flagged[c] for c in ids if c in flagged},
        trusted_party=outcome.trusted_party,
        scores={c: float(outcome.combined[i]) for i, c in enumerate(ids)},
        rule_scores={
            name: {c: float(v[i]) for i, c in enumerate(ids)}
            for name, v in outcome.rule_scores.items()
        },
        sybil_clusters=[],
        metrics=metrics,
        thresholds=thresholds,
    )


def _thresholds(
    config: TrustConfig, values: Mapping[str, np.ndarray], populations: Populations
) -> dict[str, Threshold]:
    """The round's flagging bounds: fixed, or median -+ k MAD over the primary population;
    for the norm ratio, the whole round's bound instead when the primary population's
    median is itself above it (see :func:`_population`)."""
    settings = config.threshold
    if settings.kind == "fixed":
        return fixed_thresholds(
            cosine_min=settings.cosine_min,
            distance_max=settings.distance_max,
            norm_ratio_max=settings.norm_ratio_max,
            metrics=config.compare.metrics,
        )
    primary, whole = populations
    k, floor = settings.k, settings.min_spread
    out = robust_thresholds(values, primary, k=k, min_spread=floor)
    if whole is primary or "norm_ratio" not in out:
        return out
    ratios = {"norm_ratio": values["norm_ratio"]}
    bound = robust_thresholds(ratios, whole, k=k, min_spread=floor)["norm_ratio"]
    centre = float(np.median(ratios["norm_ratio"][primary]))
    if bound.violated(centre):
        out["norm_ratio"] = replace(
            bound,
            how=f"{bound.how} over the whole round (the vouched rows' median: {centre:.4g})",
        )
    return out


#: (primary population, whole round): see :func:`_population`.
Populations = tuple[np.ndarray, np.ndarray]


def _population(
    n: int, elected: int, sybil_rows: set[int], ref_cos: np.ndarray | None
) -> Populations:
    """Rows the robust centre and spread are estimated on.

    The primary population is everyone but the trusted party and the Sybils, restricted
    to those the reference vouches for (cosine > 0) when at least :data:`MIN_POPULATION`
    are and they are a strict majority of the wider set; otherwise the wider set. A large
    minority of colluders pointing away from the reference then cannot inflate the spread
    and hide inside it; and late in training, when most honest updates are nearly
    orthogonal to the reference (cosine <= 0 by chance), the few vouched rows are not
    relied on.

    The second population is the wider set (the whole round), where honest rows are the
    majority whenever colluders are a minority (MAD's 50% breakdown point). Where the
    primary population's median norm ratio is above the whole round's bound, most vouched
    rows are boosted outliers of the round, and the whole round's norm-ratio bound is used:
    boosted colluders who keep a positive reference cosine can be most of the vouched rows
    even when those are a majority of the round, and would otherwise set the bound on the
    very norm that betrays them. (Only the norm ratio: for the other metrics, with the few
    rows left once Sybils are out, the whole round's MAD is often at its floor and its
    bound would flag honest rows by chance.)"""
    base = np.ones(n, dtype=bool)
    base[elected] = False
    base[list(sybil_rows)] = False
    if not base.any():
        base = np.ones(n, dtype=bool)
        base[elected] = False
    if ref_cos is not None:
        vouched = base & (ref_cos > 0)
        if vouched.sum() >= MIN_POPULATION and 2 * vouched.sum() > base.sum():
            return vouched, base
    return base, base


def decide_by_baseline(
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, float],
    *,
    config: TrustConfig,
    reference: np.ndarray | None = None,
    center: np.ndarray | None = None,
) -> TrustDecision:
    """One of the robust aggregators of :mod:`secfl.trust.baselines`."""
    ids, x = _stack(updates)
    n = len(ids)
    robust = config.robust
    defense = config.defense
    f = min(robust.f if robust.f is not None else n, baselines.max_tolerated_f(n))
    if defense == "krum":
        result = baselines.krum(x, f=f)
    elif defense == "multi_krum":
        m = None if robust.multi_krum_m is None else min(robust.multi_krum_m, n)
        w = np.array([weights[c] for c in ids], dtype=np.float64)
        result = baselines.multi_krum(x, w, f=f, m=m)
    elif defense == "median":
        result = baselines.coordinate_median(x)
    elif defense == "trimmed_mean":
        result = baselines.trimmed_mean(x, beta=robust.trim_beta)
    elif defense == "centered_clipping":
        start = np.zeros(x.shape[1]) if center is None else center
        result = baselines.centered_clipping(
            x, center=start, tau=robust.clip_tau, iterations=robust.clip_iterations
        )
    elif defense == "fltrust":
        if reference is None:
            raise ConfigError("trust.defense=fltrust needs the server's reference update")
        result = baselines.fltrust(x, reference=reference)
    else:
        raise ConfigError(f"trust.defense={defense!r} is not a baseline robust aggregator")
    kept = tuple(ids[i] for i in result.selected)
    flagged = {ids[i]: reason for i, reason in sorted(result.excluded.items())}
    if defense in ("krum", "multi_krum"):
        # A selection: summed exactly as mode none sums the selected updates.
        mean, total_weight = weighted_mean_of(updates, weights, kept)
    else:
        mean = result.aggregate.astype(np.float32)
        total_weight = float(sum(weights[c] for c in kept))
    scores = (
        {c: float(result.scores[i]) for i, c in enumerate(ids)} if result.scores is not None else {}
    )
    return TrustDecision(
        defense=defense,
        mean_update=mean,
        total_weight=total_weight,
        kept=kept,
        flagged=flagged,
        scores=scores,
    )


def _flag_against_reference(
    decision: TrustDecision,
    reference: np.ndarray | None,
    cohorts: Mapping[int, tuple[tuple[int, ...], np.ndarray, float]],
    *,
    norm_ratio_max: float | None = None,
) -> TrustDecision:
    """Sub-cohorts: also flag every candidate whose mean points away from the server's
    reference update (cosine <= 0; FLTrust's ReLU, Cao et al. 2021), and, with
    ``norm_ratio_max``, every candidate whose mean is longer than ``norm_ratio_max`` times
    the trusted sub-cohort's (norm bounding to the trusted party, as FLTrust bounds every
    update by the reference's norm). With a handful of candidates, most of them holding an
    attacker, the robust spread is estimated on too few clean sub-cohorts to be trusted,
    and a poisoned sub-cohort mean must never pass for lack of a population; a mean of
    ``min_cohort`` honest updates concentrates, so a fixed bound on its length against
    the trusted one is safe for honest sub-cohorts."""
    if reference is None and norm_ratio_max is None:
        return decision
    flagged = dict(decision.flagged)
    ids = sorted(cohorts)
    x = np.stack([np.asarray(cohorts[j][1], dtype=np.float32) for j in ids])
    if reference is not None:
        for j, cosine in zip(ids, cosine_with(x, reference)):
            if j not in flagged and float(cosine) <= 0.0:
                flagged[j] = (
                    f"sub-cohort mean points away from the server's reference update "
                    f"(cosine {float(cosine):.4g} <= 0)"
                )
    trusted = decision.trusted_party
    if norm_ratio_max is not None and trusted is not None:
        row = ids.index(trusted)
        ratios = compare_with(x, x[row], ("norm_ratio",))["norm_ratio"]
        for j, ratio in zip(ids, ratios):
            if j not in flagged and j != trusted and float(ratio) > norm_ratio_max:
                flagged[j] = (
                    f"sub-cohort mean is {float(ratio):.4g} times as long as the trusted "
                    f"sub-cohort {trusted}'s, above trust.suspicion.norm_ratio_max="
                    f"{norm_ratio_max:g}"
                )
    if len(flagged) == len(decision.flagged):
        return decision
    kept = tuple(j for j in decision.kept if j not in flagged)
    mean, total_weight = weighted_mean_of(
        {j: cohorts[j][1] for j in ids}, {j: cohorts[j][2] for j in ids}, kept
    )
    return replace(
        decision,
        kept=kept,
        flagged={j: flagged[j] for j in ids if j in flagged},
        mean_update=mean,
        total_weight=total_weight,
    )


def _dormant_reasons(shares: Mapping[int, float], bound: float | None) -> dict[int, str]:
    """The candidates whose dormant share exceeds ``trust.dormant.flag_share``, with the
    reason logged for each."""
    if bound is None:
        return {}
    return {
        c: (
            f"{shares[c]:.3g} of the update's norm lies on weights fed by units dormant "
            f"on the public shared set, above trust.dormant.flag_share={bound:g}"
        )
        for c in sorted(shares)
        if shares[c] > bound
    }


def _vote_after_dormant_flags(
    updates: Mapping[int, np.ndarray],
    shares: Mapping[int, float],
    bound: float | None,
    vote: Callable[[Mapping[int, np.ndarray]], TrustDecision],
) -> TrustDecision:
    """Flag every candidate whose update puts more than ``bound`` of its norm on weights fed
    by units dormant on the shared set (``trust.dormant.flag_share``), then run ``vote`` on
    the others, so a flagged candidate can neither be elected nor move the thresholds. Its
    share goes into every candidate's metrics (``dormant_share``)."""
    ids = sorted(updates)
    pre = _dormant_reasons(shares, bound)
    rest = {c: updates[c] for c in ids if c not in pre}
    if rest:
        decision = vote(rest)
    else:
        size = next(iter(updates.values())).size
        decision = TrustDecision(
            defense="vote",
            mean_update=np.zeros(size, dtype=np.float32),
            total_weight=0.0,
            kept=(),
            flagged={},
        )
    if not shares:
        return decision
    flagged = {**pre, **decision.flagged}
    metrics = {c: {**decision.metrics.get(c, {}), "dormant_share": shares[c]} for c in ids}
    return replace(decision, flagged={c: flagged[c] for c in ids if c in flagged}, metrics=metrics)


class TrustModule:
    """Server-side trust state across rounds: reputations, the reference trainer, logging.

    ``reference`` maps (global weights, round, attempt) to the server's reference update;
    it is ``None`` for the baselines that need none."""

    def __init__(
        self,
        config: TrustConfig,
        *,
        reference: Callable[..., np.ndarray] | None = None,
        pruner: DormantPruner | None = None,
        reset: bool = False,
    ) -> None:
        if config.defense == "none":
            raise ConfigError("trust.defense='none' needs no trust module")
        needs_reference = config.defense == "fltrust" or (
            config.defense == "vote" and "reference" in config.vote.rules
        )
        if needs_reference and reference is None:
            raise ConfigError(
                f"trust.defense={config.defense!r} needs the server's reference update on "
                "data.shared (data.shared.per_class >= 1)"
            )
        self.config = config
        self.reference = reference
        self.pruner = pruner
        #: Reset dormant-fed weights after each round (``trust.dormant.reset`` for this mode).
        self.reset = reset and pruner is not None
        self.reputation = Reputation(
            initial=config.reputation.initial,
            decay=config.reputation.decay,
            recovery=config.reputation.recovery,
        )
        self._center: np.ndarray | None = None
        self.suspicion = Suspicion(
            step=config.suspicion.step,
            forgive=config.suspicion.forgive,
            bound=config.suspicion.bound,
        )

    @property
    def defense(self) -> str:
        return self.config.defense

    def _dormant_shares(
        self, updates: Mapping[int, np.ndarray], global_weights: np.ndarray
    ) -> dict[int, float]:
        """Each update's share of its norm on the weights fed by units dormant on the
        shared set at the broadcast model (empty without ``trust.dormant.flag_share``)."""
        if self.pruner is None or self.config.dormant.flag_share is None:
            return {}
        mask = self.pruner.mask(global_weights)
        return {c: dormant_share(u, mask) for c, u in updates.items()}

    def defend(
        self,
        updates: Mapping[int, np.ndarray],
        weights: Mapping[int, float],
        *,
        global_weights: np.ndarray,
        round_index: int,
        attempt: int,
        events: EventLog,
    ) -> TrustDecision:
        """Decide this round, update reputations, log every decision."""
        reference = None
        if self.reference is not None:
            reference = self.reference(global_weights, round_index=round_index, attempt=attempt)
        if self.defense == "vote":
            ids = sorted(updates)
            decision = _vote_after_dormant_flags(
                updates,
                self._dormant_shares(updates, global_weights),
                self.config.dormant.flag_share,
                lambda rest: decide_by_vote(
                    rest,
                    {c: weights[c] for c in rest},
                    reference=reference,
                    reputation={c: self.reputation.of(c) for c in ids},
                    config=self.config,
                ),
            )
        else:
            decision = decide_by_baseline(
                updates, weights, config=self.config, reference=reference, center=self._center
            )
            if self.defense == "centered_clipping":
                self._center = decision.mean_update.astype(np.float64)
        self.reputation.update(kept=decision.kept, flagged=decision.flagged)
        self._log(decision, round_index, attempt, events)
        return decision

    def defend_scalars(
        self,
        weights: Mapping[int, float],
        *,
        reference_inner: Mapping[int, float] | None,
        reference_norm: float | None,
        squared_norms: Mapping[int, float],
        trusted_inner: Callable[[int, Sequence[int]], Mapping[int, float]],
        round_index: int,
        attempt: int,
        events: EventLog,
        dormant_norms: Mapping[int, float] | None = None,
    ) -> TrustDecision:
        """Mode ``ckks``: :func:`decide_by_scalars`, reputations, the same event log as
        :meth:`defend`, plus a note on the rules that need pairs and did not run.

        ``trusted_inner(t, among)`` returns <x_c, x_t> for the clients ``among``.
        ``dormant_norms`` (s4 = sum_i m_i x_i^2 over the weights fed by dormant units, the
        fourth released scalar) gives each client's dormant share sqrt(s4 / s2), clipped
        to [0, 1]; above ``trust.dormant.flag_share`` the client is flagged before the
        vote, as in mode ``none``."""
        if self.defense != "vote":
            raise ConfigError(
                f"trust.defense={self.defense!r} needs every update in clear; under "
                "aggregation.protection=ckks only 'vote' runs (from per-client scalars)"
            )
        skipped = sorted(PAIRWISE_RULES & set(self.config.vote.rules))
        if skipped or self.config.sybil.flag:
            events.emit(
                "warning",
                message=(
                    f"trust under ckks, round {round_index}: only per-client scalars are "
                    f"revealed, so pairwise vote rules {skipped} and Sybil detection do not run"
                ),
            )
        ids = sorted(squared_norms)
        shares: dict[int, float] = {}
        if dormant_norms is not None:
            for c in ids:
                s2 = max(float(squared_norms[c]), 0.0)
                ratio = float(dormant_norms[c]) / s2 if s2 > 0 else 0.0
                shares[c] = math.sqrt(min(max(ratio, 0.0), 1.0))
        pre = _dormant_reasons(shares, self.config.dormant.flag_share)
        rest = [c for c in ids if c not in pre]
        if rest:
            decision = decide_by_scalars(
                {c: weights[c] for c in rest},
                reference_inner=None
                if reference_inner is None
                else {c: reference_inner[c] for c in rest},
                reference_norm=reference_norm,
                squared_norms={c: squared_norms[c] for c in rest},
                trusted_inner=lambda t: trusted_inner(t, [c for c in rest if c != t]),
                reputation={c: self.reputation.of(c) for c in rest},
                config=self.config,
            )
        else:
            decision = TrustDecision(
                defense="vote",
                mean_update=np.zeros(0, dtype=np.float32),
                total_weight=0.0,
                kept=(),
                flagged={},
            )
        if shares:
            flagged = {**pre, **decision.flagged}
            decision = replace(
                decision,
                flagged={c: flagged[c] for c in ids if c in flagged},
                metrics={
                    c: {**decision.metrics.get(c, {}), "dormant_share": shares[c]} for c in ids
                },
            )
        self.reputation.update(kept=decision.kept, flagged=decision.flagged)
        self._log(decision, round_index, attempt, events)
        return decision

    def _log(self, decision: TrustDecision, round_index: int, attempt: int, log: EventLog) -> None:
        where = {"round": round_index, "attempt": attempt, "defense": decision.defense}
        if decision.defense == "vote":
            log.emit(
                "trust_vote",
                **where,
                trusted_party=decision.trusted_party,
                scores=decision.scores,
                rules=decision.rule_scores,
                sybil_clusters=decision.sybil_clusters,
            )
        for client_id, reason in decision.flagged.items():
            log.emit(
                "trust_flag",
                **where,
                client=client_id,
                metrics=decision.metrics.get(client_id, {}),
                score=decision.scores.get(client_id),
                threshold=decision.thresholds,
                reason=reason,
                reputation=self.reputation.of(client_id),
            )
        log.emit(
            "trust_kept",
            **where,
            clients={
                c: {
                    **decision.metrics.get(c, {}),
                    "score": decision.scores.get(c),
                    "reputation": self.reputation.of(c),
                }
                for c in decision.kept
            },
            thresholds=decision.thresholds,
        )

    # ------------------------------------------------------------------ sub-cohorts

    def admit(
        self, participants: list[int], *, round_index: int, attempt: int, events: EventLog
    ) -> list[int]:
        """The participants whose suspicion is below the bound; each one left out is logged
        (``trust_excluded``) with its suspicion and the reason."""
        admitted = []
        for client_id in participants:
            if not self.suspicion.exceeds(client_id):
                admitted.append(client_id)
                continue
            events.emit(
                "trust_excluded",
                round=round_index,
                attempt=attempt,
                client=client_id,
                suspicion=self.suspicion.of(client_id),
                bound=self.suspicion.bound,
                reason=(
                    f"suspicion {self.suspicion.of(client_id):g} >= trust.suspicion.bound="
                    f"{self.suspicion.bound:g}: its sub-cohorts were flagged in earlier rounds"
                ),
            )
        return admitted

    def defend_cohorts(
        self,
        cohorts: Mapping[int, tuple[tuple[int, ...], np.ndarray, float]],
        *,
        global_weights: np.ndarray,
        round_index: int,
        attempt: int,
        events: EventLog,
    ) -> TrustDecision:
        """Vote over sub-cohort means: ``cohorts`` maps a sub-cohort's index to (its
        survivors, its weighted mean update, its total weight). The decision's ``kept`` and
        ``flagged`` name sub-cohort indices; every member of a flagged one gains suspicion
        and loses reputation, members of kept ones are forgiven and recover. The vote's
        reputation evidence for a sub-cohort is its members' mean reputation."""
        if self.defense != "vote":
            raise ConfigError(
                f"trust.defense={self.defense!r} cannot run on sub-cohort sums; allowed: vote"
            )
        reference = None
        if self.reference is not None:
            reference = self.reference(global_weights, round_index=round_index, attempt=attempt)
        members = {j: survivors for j, (survivors, _, _) in cohorts.items()}
        means = {j: mean for j, (_, mean, _) in cohorts.items()}
        decision = _vote_after_dormant_flags(
            means,
            self._dormant_shares(means, global_weights),
            self.config.dormant.flag_share,
            lambda rest: decide_by_vote(
                rest,
                {j: cohorts[j][2] for j in rest},
                reference=reference,
                reputation={
                    j: float(np.mean([self.reputation.of(c) for c in members[j]]))
                    if members[j]
                    else 0.0
                    for j in rest
                },
                config=self.config,
                detect_sybils=False,
            ),
        )
        decision = _flag_against_reference(
            decision, reference, cohorts, norm_ratio_max=self.config.suspicion.norm_ratio_max
        )
        kept_clients = [c for j in decision.kept for c in members[j]]
        flagged_clients = [c for j in decision.flagged for c in members[j]]
        self.reputation.update(kept=kept_clients, flagged=flagged_clients)
        self.suspicion.update(kept=kept_clients, flagged=flagged_clients)
        where = {"round": round_index, "attempt": attempt}
        events.emit(
            "trust_vote",
            **where,
            defense="vote",
            candidates="sub-cohorts",
            trusted_party=decision.trusted_party,
            scores=decision.scores,
            rules=decision.rule_scores,
            sybil_clusters=[],
            members={j: list(ids) for j, ids in members.items()},
        )
        for j, reason in decision.flagged.items():
            events.emit(
                "trust_cohort_flag",
                **where,
                cohort=j,
                members=list(members[j]),
                metrics=decision.metrics.get(j, {}),
                score=decision.scores.get(j),
                threshold=decision.thresholds,
                reason=reason,
                suspicion={c: self.suspicion.of(c) for c in members[j]},
            )
        events.emit(
            "trust_cohort_kept",
            **where,
            cohorts={
                j: {
                    **decision.metrics.get(j, {}),
                    "score": decision.scores.get(j),
                    "members": list(members[j]),
                }
                for j in decision.kept
            },
            thresholds=decision.thresholds,
            suspicion={c: self.suspicion.of(c) for ids in members.values() for c in ids},
        )
        return decision

    def after_round(
        self, weights: np.ndarray, *, round_index: int, attempt: int, events: EventLog
    ) -> None:
        """Post-aggregation step on the new global model (``trust.dormant.reset``): reset, in place,
        the weights fed by units dormant on the public shared set, and log what was reset.
        It sees only the revealed global model, so it is the same in every mode."""
        if self.pruner is None or not self.reset:
            return
        report = self.pruner.prune(weights)
        events.emit(
            "trust_prune",
            round=round_index,
            attempt=attempt,
            layers={str(k): v for k, v in report.units.items()},
            zeroed=report.zeroed,
            removed_norm=report.removed_norm,
            tau=self.pruner.tau,
        )

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"defense": self.defense, "reputation": self.reputation.state()}
        if self.suspicion.recorded:  # sub-cohort rounds only; mode none's state is unchanged
            state["suspicion"] = self.suspicion.state()
        return state

    def arrays(self) -> dict[str, np.ndarray]:
        """Vector state for the checkpoint's arrays (centered clipping's centre)."""
        return {} if self._center is None else {"trust.center": self._center}

    def load_state(self, raw: Mapping[str, Any] | None, arrays: Mapping[str, np.ndarray]) -> None:
        if not raw:
            return
        if raw.get("defense") != self.defense:
            raise CheckpointError(
                f"checkpoint trust state is for defense {raw.get('defense')!r}, "
                f"the run uses {self.defense!r}"
            )
        self.reputation.load_state(raw.get("reputation"))
        self.suspicion.load_state(raw.get("suspicion"))
        center = arrays.get("trust.center")
        self._center = None if center is None else np.array(center, dtype=np.float64)


def build_trust(
    config: RunConfig,
    *,
    model_factory: Callable[[], nn.Module],
    shared: Dataset,
    randomness: Randomness,
    events: EventLog,
) -> TrustModule | None:
    """The run's trust module (``None`` without ``trust:`` or with ``defense: none``).

    Refuses central user-level DP with a defense whose output is not a weighted mean of
    kept updates (the central mechanism noises such a sum), and states in the log that the
    selection itself is not covered by the DP accounting."""
    settings = config.trust
    if settings is None or settings.defense == "none":
        return None
    if config.privacy.user_level is not None:
        if settings.defense not in SELECTING_DEFENSES:
            raise ConfigError(
                f"trust.defense={settings.defense!r} with privacy.user_level is not supported: "
                "user-level DP noises a sum of clipped updates; allowed "
                f"{sorted(SELECTING_DEFENSES)}"
            )
        events.emit(
            "warning",
            message=(
                "trust with user-level DP: the noise covers the sum of the kept updates; which "
                "updates are kept depends on every participant's update and is not covered by "
                "the DP accounting"
            ),
        )
    needs_reference = settings.defense == "fltrust" or (
        settings.defense == "vote" and "reference" in settings.vote.rules
    )
    reference = None
    if needs_reference:
        ref = settings.reference
        reference = ReferenceTrainer(
            model_factory,
            shared,
            randomness,
            steps=ref.steps,
            lr=ref.lr if ref.lr is not None else config.client.lr,
            batch_size=ref.batch_size,
        ).reference_update
    pruner = None
    dormant = settings.dormant
    flags = dormant.flag_share is not None and settings.defense == "vote"
    reset = dormant.reset == "always" or (
        dormant.reset == "masking" and config.aggregation.protection == "masking"
    )
    if flags and not reset and len(shared) == 0:
        events.emit(
            "warning",
            message=(
                "trust.dormant.flag_share is off: dormant units are measured on the public "
                "shared dataset and data.shared.per_class=0 leaves it empty"
            ),
        )
    elif reset or flags:
        pruner = DormantPruner(model_factory, shared, layers=dormant.layers, tau=dormant.tau)
    return TrustModule(settings, reference=reference, pruner=pruner, reset=reset)
