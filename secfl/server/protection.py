"""What the server learns from a round: the protection-mode interface and mode ``none``.

A :class:`Protection` drives its protocol with the round's participants through the
transport and returns the weighted mean update of the survivors. Mode ``none`` sends the
broadcast, receives plaintext updates and sums them; ``masking`` and ``ckks`` implement the
same interface with their own messages.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from secfl.audit.events import EventLog
from secfl.errors import MessageError, UpdateError
from secfl.messages import ClientFailure, FitIns, FitRes
from secfl.privacy.central import CentralGaussianMechanism, central_mechanism
from secfl.privacy.events import DpEvent
from secfl.randomness import Randomness
from secfl.server.aggregate import WeightedSum
from secfl.transport.base import Transport
from secfl.wire import decode_message

if TYPE_CHECKING:
    from secfl.client.app import ClientApp
    from secfl.config import RunConfig
    from secfl.trust.defense import TrustModule


@dataclass(frozen=True, eq=False)
class RoundContext:
    round: int
    attempt: int
    broadcast: FitIns
    model_size: int
    randomness: Randomness
    events: EventLog


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The survivors' sample-weighted mean update, and who did not make it and why."""

    mean_update: np.ndarray
    total_weight: float
    survivors: tuple[int, ...]
    dropped: dict[int, str] = field(default_factory=dict)
    #: Mean client training loss, only where the mode lets the server see it.
    train_loss: float | None = None
    #: User-level DP events this round cost (for the privacy ledger).
    dp_events: tuple[DpEvent, ...] = ()
    #: Mean updates the protection mode let the server see beside the aggregate, by party:
    #: ``client:<id>`` (every kept client's update, mode ``none``) or ``cohort:<j>`` (every
    #: kept sub-cohort's mean, masking with sub-cohorts); empty under ``ckks``. Refinement
    #: may invert exactly these (DESIGN 5).
    revealed: dict[str, np.ndarray] = field(default_factory=dict)


class Protection(Protocol):
    name: str

    def aggregate(
        self, transport: Transport, participants: list[int], ctx: RoundContext
    ) -> AggregateResult | None:
        """Run one round's protocol; ``None`` if nothing may be revealed this round."""
        ...


def record_dropout(
    ctx: RoundContext, dropped: dict[int, str], client_id: int, *, stage: str, reason: str
) -> None:
    """Count ``client_id`` as dropped at ``stage`` and say why in the event log."""
    dropped[client_id] = reason
    ctx.events.emit(
        "client_dropped",
        round=ctx.round,
        attempt=ctx.attempt,
        client=client_id,
        stage=stage,
        reason=reason,
    )


def decode_reply(
    reply: bytes | None, client_id: int, ctx: RoundContext, stage: str
) -> FitRes | str:
    """A checked :class:`FitRes`, or the reason the reply is unusable."""
    if reply is None:
        return f"no reply at stage {stage}"
    try:
        message = decode_message(reply)
    except MessageError as exc:
        return f"malformed reply: {exc}"
    if isinstance(message, ClientFailure):
        return f"client failed: {message.reason}"
    if not isinstance(message, FitRes):
        return f"expected FitRes, got {type(message).__name__}"
    if (message.round, message.attempt) != (ctx.round, ctx.attempt):
        return (
            f"reply for round {message.round} attempt {message.attempt}, expected "
            f"round {ctx.round} attempt {ctx.attempt}"
        )
    if message.client_id != client_id:
        return f"reply claims client id {message.client_id}"
    if message.model_hash != ctx.broadcast.model_hash:
        return "reply trained from a different model (model_hash mismatch)"
    if message.num_samples < 1:
        return f"num_samples must be >= 1, got {message.num_samples}"
    if message.update.shape != (ctx.model_size,):
        return f"update has shape {message.update.shape}, expected ({ctx.model_size},)"
    return message


class PlaintextModeWarning(UserWarning):
    """Mode ``none`` protects nothing from the server; said loudly at every run."""


class PlaintextProtection:
    """Mode ``none``: the server sees every update. For baselines and trusted servers only."""

    name = "none"

    def __init__(
        self,
        user_level: CentralGaussianMechanism | None = None,
        *,
        trust: TrustModule | None = None,
    ) -> None:
        #: Central user-level DP (trusted server): clip, weight, noise the sum.
        self.user_level = user_level
        #: The trust module: flagged updates are excluded before the sum (DESIGN 4).
        self.trust = trust

    def aggregate(
        self, transport: Transport, participants: list[int], ctx: RoundContext
    ) -> AggregateResult | None:
        payload = ctx.broadcast.to_bytes()
        replies = transport.exchange(dict.fromkeys(participants, payload))
        accepted: dict[int, FitRes] = {}
        dropped: dict[int, str] = {}
        for client_id in participants:
            checked = decode_reply(replies.get(client_id), client_id, ctx, "fit")
            if isinstance(checked, str):
                record_dropout(ctx, dropped, client_id, stage="fit", reason=checked)
            else:
                accepted[client_id] = checked
        while accepted:
            total = WeightedSum(ctx.model_size)
            for client_id, res in accepted.items():
                total.add(client_id, res.update, float(res.num_samples))
            try:
                mean = total.weighted_mean()
            except UpdateError:
                # Only the failure path rescans: name and exclude the clients whose update
                # holds NaN/Inf, then sum the rest again. An overflow of finite values has
                # no culprit and fails the round.
                culprits = total.non_finite_contributors()
                if not culprits:
                    raise
                for client_id in culprits:
                    reason = "update rejected: it contains NaN/Inf; only finite values allowed"
                    dropped[client_id] = reason
                    del accepted[client_id]
                    ctx.events.emit(
                        "update_rejected",
                        round=ctx.round,
                        attempt=ctx.attempt,
                        client=client_id,
                        reason=reason,
                    )
                continue
            total_weight = total.total_weight
            if self.trust is not None:
                decision = self.trust.defend(
                    {cid: r.update for cid, r in accepted.items()},
                    {cid: float(r.num_samples) for cid, r in accepted.items()},
                    global_weights=ctx.broadcast.weights,
                    round_index=ctx.round,
                    attempt=ctx.attempt,
                    events=ctx.events,
                )
                for client_id, reason in decision.flagged.items():
                    record_dropout(ctx, dropped, client_id, stage="trust", reason=reason)
                    del accepted[client_id]
                if not accepted:
                    return None
                mean, total_weight = decision.mean_update, decision.total_weight
            weights = np.array([r.num_samples for r in accepted.values()], dtype=np.float64)
            losses = np.array([r.train_loss for r in accepted.values()], dtype=np.float64)
            dp_events: tuple[DpEvent, ...] = ()
            if self.user_level is not None:
                mean, event = self.user_level.release_mean(
                    {cid: r.update for cid, r in accepted.items()},
                    {cid: r.num_samples for cid, r in accepted.items()},
                    ctx.randomness.stream(
                        "server.dp_noise", round_index=ctx.round, attempt=ctx.attempt
                    ),
                    round_index=ctx.round,
                    attempt=ctx.attempt,
                )
                dp_events = (event,)
            return AggregateResult(
                mean_update=mean,
                total_weight=total_weight,
                survivors=tuple(sorted(accepted)),
                dropped=dropped,
                train_loss=float(np.dot(weights, losses) / weights.sum()),
                dp_events=dp_events,
                revealed={f"client:{cid}": r.update for cid, r in accepted.items()},
            )
        return None


def build_plaintext_protection(
    config: RunConfig,
    clients: list[ClientApp],
    randomness: Randomness,
    events: EventLog,
    *,
    user_level: CentralGaussianMechanism | None = None,
    trust: TrustModule | None = None,
) -> PlaintextProtection:
    """Builder for mode ``none`` (clients answer :class:`FitIns` out of the box); the
    trusted server adds the central user-level noise (``user_level``) if configured and
    applies the trust module (``trust``) to the plaintext updates before summing."""
    message = (
        "aggregation.protection=none: the server sees every client update in clear; "
        "for baselines and trusted-server research only"
    )
    warnings.warn(message, PlaintextModeWarning, stacklevel=2)
    events.emit("warning", message=message)
    if user_level is None:
        user_level = central_mechanism(config)
    return PlaintextProtection(user_level=user_level, trust=trust)
