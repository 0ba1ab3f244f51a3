"""The server's round: select, broadcast, (protect, aggregate), apply the server optimiser.

The server reaches clients only through a :class:`~secfl.transport.base.Transport` and the
typed messages of its :class:`~secfl.server.protection.Protection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from secfl.audit.events import EventLog
from secfl.config import RunConfig
from secfl.encode.flatten import model_hash
from secfl.errors import ConfigError
from secfl.messages import FitIns
from secfl.randomness import Randomness
from secfl.server.optimizers import ServerOptimizer
from secfl.server.protection import AggregateResult, Protection, RoundContext
from secfl.server.selection import select_clients
from secfl.transport.base import Transport


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    round: int
    attempt: int
    participants: tuple[int, ...]
    aggregate: AggregateResult | None


class FederatedServer:
    """Holds the global model and runs rounds; knows clients only by id."""

    def __init__(
        self,
        *,
        config: RunConfig,
        weights: np.ndarray,
        optimizer: ServerOptimizer,
        protection: Protection,
        transport: Transport,
        client_ids: list[int],
        randomness: Randomness,
        events: EventLog,
    ) -> None:
        self.config = config
        self.weights = np.array(weights, dtype=np.float32)
        self.optimizer = optimizer
        self.protection = protection
        self.transport = transport
        self.client_ids = list(client_ids)
        self.randomness = randomness
        self.events = events

    def broadcast_message(self, round_index: int, attempt: int) -> FitIns:
        return FitIns(
            round=round_index,
            attempt=attempt,
            model_hash=model_hash(self.weights),
            weights=self.weights,
        )

    def run_round(
        self, round_index: int, attempt: int = 0, *, participants: Sequence[int] | None = None
    ) -> RoundOutcome:
        """One round. ``participants``: chosen by an orchestration strategy (a scheduler)
        instead of ``server.sampling``; ids must be known and distinct."""
        if participants is None:
            stream = self.randomness.stream(
                "server.selection", round_index=round_index, attempt=attempt
            )
            participants = select_clients(self.config.server.sampling, self.client_ids, stream)
        else:
            participants = sorted(int(i) for i in participants)
            known = set(self.client_ids)
            if len(set(participants)) != len(participants) or not known.issuperset(participants):
                raise ConfigError(
                    f"participants {participants} must be distinct ids of this federation's "
                    f"{len(known)} clients"
                )
        self.events.emit(
            "round_started", round=round_index, attempt=attempt, participants=participants
        )
        if not participants:
            self.events.emit(
                "round_skipped", round=round_index, attempt=attempt, reason="no client sampled"
            )
            return RoundOutcome(round_index, attempt, (), None)
        ctx = RoundContext(
            round=round_index,
            attempt=attempt,
            broadcast=self.broadcast_message(round_index, attempt),
            model_size=self.weights.size,
            randomness=self.randomness,
            events=self.events,
        )
        result = self.protection.aggregate(self.transport, participants, ctx)
        if result is None:
            self.events.emit(
                "round_skipped",
                round=round_index,
                attempt=attempt,
                reason="no usable update survived",
            )
        else:
            self.optimizer.apply_update(
                self.weights, result.mean_update, kind=self.config.client.update_kind
            )
        return RoundOutcome(round_index, attempt, tuple(participants), result)
