"""Mode ``masking`` in ``secfl run``: equip simulated clients and build the server side.

Each :class:`~secfl.client.app.ClientApp` gets its own :class:`SecAggClient` (its keys,
shares and release log live there); the server side is :class:`MaskingProtection`, which
owns a fresh :class:`SecAggServer` per round and talks to clients only through the
transport's bytes. Identity keys: in ``seeded`` mode derived from the seed (reproducible),
in ``os`` mode from the OS CSPRNG; the registry of their public halves is pinned by every
party (in deployment it comes from the federation's certificates).

With a trust module the round runs in sub-cohorts (protocols/secagg.md §9): clients whose
suspicion reached the bound are left out before masking, every revealed sub-cohort's mean is
a candidate of the trust vote, and the released aggregate adds only the kept sub-cohorts'
integer sums. Under a simulated adversary (``adversary:``), the malicious clients' updates
are crafted before masking (:mod:`secfl.attacks.simulation`, masking adapter).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from secfl.audit.events import EventLog
from secfl.crypto.prg import MaskEngine, reduce_mod
from secfl.crypto.sign import SigningKey
from secfl.errors import ConfigError, PrivacyError, SecAggAbort
from secfl.messages import FitIns
from secfl.privacy.events import DpEvent
from secfl.randomness import Randomness
from secfl.secagg import messages as m
from secfl.secagg.client import SecAggClient, ShareReleaseLog
from secfl.secagg.encoding import decode_mean
from secfl.secagg.identity import IdentityRegistry
from secfl.secagg.params import derive_params
from secfl.secagg.server import SecAggResult, SecAggServer
from secfl.server.protection import AggregateResult, RoundContext, record_dropout
from secfl.transport.base import Transport

if TYPE_CHECKING:
    from secfl.client.app import ClientApp
    from secfl.config import MaskingConfig, RunConfig
    from secfl.privacy.distributed import DistributedNoise
    from secfl.trust.defense import TrustModule


#: Each simulated ClientApp's SecAgg side (the adversary adapter reaches its hooks).
_SIDES: weakref.WeakKeyDictionary[ClientApp, SecAggClient] = weakref.WeakKeyDictionary()


def secagg_client_of(app: ClientApp) -> SecAggClient | None:
    """The :class:`SecAggClient` that :func:`build_protection` gave ``app`` (simulation)."""
    return _SIDES.get(app)


def identity_key(randomness: Randomness, client_id: int) -> SigningKey:
    """A client's Ed25519 identity key (seeded mode: from the seed; os mode: fresh)."""
    stream = randomness.stream("secagg.identity", party=f"client:{client_id}")
    return SigningKey.generate() if stream.secure else SigningKey.from_seed(stream.bytes(32))


class MaskingProtection:
    """Mode ``masking``: the server learns the survivors' weighted mean and nothing else."""

    name = "masking"

    def __init__(
        self,
        masking: MaskingConfig,
        *,
        min_cohort: int,
        registry: IdentityRegistry,
        engine: MaskEngine | None = None,
        user_level: DistributedNoise | None = None,
        trust: TrustModule | None = None,
    ) -> None:
        self.masking = masking
        #: The trust module: rounds run in sub-cohorts and it votes over their means.
        self.trust = trust
        self.min_cohort = min_cohort
        self.registry = registry
        #: User-level DP: clients add Skellam shares; the mean uses the fixed denominator.
        self.user_level = user_level
        self.engine = engine if engine is not None else MaskEngine(threads=masking.threads)
        self.last_server: SecAggServer | None = None

    def aggregate(
        self, transport: Transport, participants: list[int], ctx: RoundContext
    ) -> AggregateResult | None:
        stage = "advertise_keys"
        if self.trust is not None:
            participants = self.trust.admit(
                participants, round_index=ctx.round, attempt=ctx.attempt, events=ctx.events
            )
            if len(participants) < max(2, self.min_cohort):
                ctx.events.emit(
                    "secagg_aborted",
                    round=ctx.round,
                    attempt=ctx.attempt,
                    stage=stage,
                    reason=(
                        f"{len(participants)} participants left after trust exclusions, below "
                        f"aggregation.min_cohort={self.min_cohort}; no sum is revealed"
                    ),
                )
                return None
        try:
            server = SecAggServer(
                masking=self.masking,
                min_cohort=self.min_cohort,
                participants=participants,
                round_index=ctx.round,
                attempt=ctx.attempt,
                model_hash=ctx.broadcast.model_hash,
                weights=ctx.broadcast.weights,
                registry=self.registry,
                engine=self.engine,
                events=ctx.events,
                noise=self.user_level,
                cohorts=self.trust is not None,
            )
            self.last_server = server
            while not server.done:
                stage = server.stage
                server.receive(transport.exchange(server.requests()))
        except SecAggAbort as exc:
            ctx.events.emit(
                "secagg_aborted",
                round=ctx.round,
                attempt=ctx.attempt,
                stage=stage,
                reason=str(exc),
            )
            return None
        result = server.result
        if result is None:  # pragma: no cover - done implies a result
            return None
        if self.trust is not None:
            return self._defend(server, result, ctx)
        mean = result.mean_update
        dp_events: tuple[DpEvent, ...] = ()
        if self.user_level is not None:
            # every share has weight 1: total_weight = |U3|; fixed denominator instead
            mean = (mean * (result.total_weight / self.user_level.denominator)).astype(np.float32)
            dp_events = (
                self.user_level.released_event(
                    len(result.survivors),
                    server.params.threshold,
                    round_index=ctx.round,
                    attempt=ctx.attempt,
                ),
            )
        return AggregateResult(
            mean_update=mean,
            total_weight=float(result.total_weight),
            survivors=result.survivors,
            dropped=result.dropped,
            train_loss=None,
            dp_events=dp_events,
        )

    def _defend(
        self, server: SecAggServer, result: SecAggResult, ctx: RoundContext
    ) -> AggregateResult | None:
        """Vote over the revealed sub-cohort means; release the kept sub-cohorts' sums."""
        trust = self.trust
        if trust is None:  # pragma: no cover - only called with a trust module
            raise SecAggAbort("no trust module")
        by_index = {part.index: part for part in result.cohorts}
        decision = trust.defend_cohorts(
            {
                j: (part.survivors, part.mean_update, float(part.total_weight))
                for j, part in by_index.items()
            },
            global_weights=ctx.broadcast.weights,
            round_index=ctx.round,
            attempt=ctx.attempt,
            events=ctx.events,
        )
        dropped = dict(result.dropped)
        for j, reason in decision.flagged.items():
            for client_id in by_index[j].survivors:
                record_dropout(
                    ctx,
                    dropped,
                    client_id,
                    stage="trust",
                    reason=f"sub-cohort {j} flagged: {reason}",
                )
        dp_events = self._released_events(server, result, ctx)
        kept = [by_index[j] for j in decision.kept]
        if not kept:
            return None
        total = np.zeros_like(kept[0].raw_sum)
        for part in kept:
            np.add(total, part.raw_sum, out=total)  # wraps modulo the word size
        reduce_mod(total, server.params.bits)
        mean, total_weight = decode_mean(server.params, total)
        if self.user_level is not None:
            mean = (mean * (total_weight / self.user_level.denominator)).astype(np.float32)
        return AggregateResult(
            mean_update=mean,
            total_weight=float(total_weight),
            survivors=tuple(sorted(c for part in kept for c in part.survivors)),
            dropped=dropped,
            train_loss=None,
            dp_events=dp_events,
            revealed={f"cohort:{part.index}": part.mean_update for part in kept},
        )

    def _released_events(
        self, server: SecAggServer, result: SecAggResult, ctx: RoundContext
    ) -> tuple[DpEvent, ...]:
        """User-level DP: the round's one event. Every revealed sub-cohort sum (kept or
        flagged: the server saw it) carries the full noise of its t_g - T honest shares, and
        the sub-cohorts are disjoint, so each client is in exactly one release per round
        (parallel composition); the event is the least-noised revealed sum's."""
        if self.user_level is None:
            return ()
        events = [
            self.user_level.released_event(
                len(part.survivors), part.threshold, round_index=ctx.round, attempt=ctx.attempt
            )
            for part in result.cohorts
        ]
        return (min(events, key=lambda event: event.noise_multiplier),)


def build_protection(
    config: RunConfig,
    clients: list[ClientApp],
    randomness: Randomness,
    events: EventLog,
    *,
    user_level: DistributedNoise | None = None,
    trust: TrustModule | None = None,
) -> MaskingProtection:
    """Give every simulated client its SecAgg state machine; return the server side.

    With user-level DP (``user_level``, Skellam shares) every party masks with the DP
    clip: the per-coordinate range is ``clip_norm`` (implied by the L2 clip) and the weight
    is folded into the value, so SecAgg weights are uniform."""
    if trust is not None and trust.defense != "vote":
        raise ConfigError(
            f"trust.defense={trust.defense!r} is not available under "
            "aggregation.protection=masking (only sub-cohort sums are visible); allowed: vote"
        )
    masking = config.aggregation.masking
    if user_level is not None:
        if user_level.kind != "skellam":
            raise PrivacyError(f"mode masking adds Skellam shares, not {user_level.kind}")
        masking = masking.model_copy(
            update={"clip_range": user_level.clip_norm, "weighting": "uniform"}
        )
        events.emit(
            "privacy_notice",
            message=(
                "user-level DP under masking: aggregation.masking.clip_range and weighting are "
                f"replaced by the L2 clip {user_level.clip_norm} and uniform SecAgg weights "
                "(each client's weight is folded into its clipped value)"
            ),
        )
        # fail at build time, not at every round start, if the modulus cannot hold the
        # noise of a round with every client taking part (the largest sum the run can see)
        derive_params(
            masking,
            n=max(2, len(clients)),
            min_cohort=config.aggregation.min_cohort,
            noise=user_level,
        )
    min_cohort = config.aggregation.min_cohort
    keys = {app.client_id: identity_key(randomness, app.client_id) for app in clients}
    registry = IdentityRegistry({cid: key.public_bytes() for cid, key in keys.items()})
    engine = MaskEngine(threads=masking.threads)
    state_dir = Path(events.path).parent / "client_state"
    for app in clients:
        # os mode: the release log is on disk so a restarted client still refuses the other
        # share; seeded mode replays a round bit-identically, so memory suffices.
        log_path = (
            state_dir / f"client-{app.client_id}-releases.jsonl" if randomness.secure else None
        )
        machine = SecAggClient(
            app.client_id,
            masking=masking,
            min_cohort=min_cohort,
            signing_key=keys[app.client_id],
            registry=registry,
            randomness=randomness,
            compute_update=_trainer(app),
            release_log=ShareReleaseLog(log_path),
            engine=engine,
            noise=user_level,
            cohorts=trust is not None,
        )
        _SIDES[app] = machine
        app.register(m.AdvertiseKeysIns, machine.on_advertise_keys)
        app.register(m.ShareKeysIns, machine.on_share_keys)
        app.register(m.MaskedInputIns, machine.on_masked_input)
        app.register(m.ConsistencyCheckIns, machine.on_consistency_check)
        app.register(m.UnmaskIns, machine.on_unmask)
    if trust is not None:
        events.emit(
            "privacy_notice",
            message=(
                "trust under masking: each round is split into sub-cohorts of at least "
                f"aggregation.min_cohort={min_cohort} (a permutation keyed by all advertised "
                "keys, checked by every client); the server learns every sub-cohort's sum, so "
                f"the anonymity set of a client shrinks from the round to its sub-cohort "
                f"(>= {min_cohort})"
            ),
        )
    return MaskingProtection(
        masking,
        min_cohort=min_cohort,
        registry=registry,
        engine=engine,
        user_level=user_level,
        trust=trust,
    )


def _trainer(app: ClientApp):  # type: ignore[no-untyped-def]
    def compute(
        round_index: int, attempt: int, model_hash: bytes, weights: np.ndarray
    ) -> tuple[np.ndarray, int]:
        delta, result = app.train(
            FitIns(round=round_index, attempt=attempt, model_hash=model_hash, weights=weights)
        )
        return delta, int(result.num_samples)

    return compute
