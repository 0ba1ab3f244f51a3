"""The trust module's round (DESIGN 4): vote, compare, flag, update reputations, log.

:func:`decide_by_vote` and :func:`decide_by_baseline` are the sans-I/O core: plain vectors
and weights in, a :class:`TrustDecision` out. :class:`TrustModule` is the server-side,
stateful wrapper a protection mode calls: it computes the reference update, keeps the
reputations (and centered clipping's centre) across rounds, writes every decision to the
event log, and checkpoints its state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from secfl.audit.events import EventLog, register_event
from secfl.errors import CheckpointError, ConfigError, UpdateError
from secfl.server.aggregate import WeightedSum
from secfl.trust import baselines
from secfl.trust.flag import (
    compare_with,
    cosine_matrix,
    cosine_with,
    fixed_thresholds,
    flag_outliers,
    robust_thresholds,
)
from secfl.trust.reference import ReferenceTrainer
from secfl.trust.reputation import Reputation
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
) -> TrustDecision:
    """Elect a trusted party, compare everyone with it, flag outliers, average the rest."""
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
        sybil_cosine=sybil.cosine,
    )
    flagged: dict[int, str] = {}
    index = {c: i for i, c in enumerate(ids)}
    sybil_rows: set[int] = set()
    if sybil.flag:
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
        settings = config.threshold
        if settings.kind == "fixed":
            bounds = fixed_thresholds(
                cosine_min=settings.cosine_min,
                distance_max=settings.distance_max,
                norm_ratio_max=settings.norm_ratio_max,
                metrics=config.compare.metrics,
            )
        else:
            bounds = robust_thresholds(
                values,
                _population(len(ids), elected, sybil_rows, ref_cos),
                k=settings.k,
                min_spread=settings.min_spread,
            )
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


def _population(
    n: int, elected: int, sybil_rows: set[int], ref_cos: np.ndarray | None
) -> np.ndarray:
    """Rows the robust centre and spread are estimated on: everyone but the trusted party
    and the Sybils, restricted to those the reference vouches for (cosine > 0) when at
    least :data:`MIN_POPULATION` are; otherwise the wider set. A minority of colluders then
    cannot inflate the spread enough to hide among the honest."""
    base = np.ones(n, dtype=bool)
    base[elected] = False
    base[list(sybil_rows)] = False
    if ref_cos is not None:
        vouched = base & (ref_cos > 0)
        if vouched.sum() >= MIN_POPULATION:
            return vouched
    if base.sum() >= 1:
        return base
    others = np.ones(n, dtype=bool)
    others[elected] = False
    return others


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


class TrustModule:
    """Server-side trust state across rounds: reputations, the reference trainer, logging.

    ``reference`` maps (global weights, round, attempt) to the server's reference update;
    it is ``None`` for the baselines that need none."""

    def __init__(
        self,
        config: TrustConfig,
        *,
        reference: Callable[..., np.ndarray] | None = None,
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
        self.reputation = Reputation(
            initial=config.reputation.initial,
            decay=config.reputation.decay,
            recovery=config.reputation.recovery,
        )
        self._center: np.ndarray | None = None

    @property
    def defense(self) -> str:
        return self.config.defense

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
            decision = decide_by_vote(
                updates,
                weights,
                reference=reference,
                reputation={c: self.reputation.of(c) for c in ids},
                config=self.config,
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

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        return {"defense": self.defense, "reputation": self.reputation.state()}

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
    return TrustModule(settings, reference=reference)
