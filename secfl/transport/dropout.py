"""Simulated dropouts at chosen protocol stages (``simulation:`` in a run config).

Wraps a transport. For each request whose message class names a ``DROPOUT_STAGE`` (or is
:class:`~secfl.messages.FitIns`, stage ``fit``) listed in ``simulation.dropout_stages``, each
recipient independently drops with probability ``dropout_rate``: the request is not
delivered and the reply is ``None``, exactly what a vanished device looks like. The draws
come from the run's randomness (stream ``simulation.dropout.<stage>`` per round and attempt),
so ``seeded`` runs drop the same clients every time. A dropped client stays gone for the
rest of that round and attempt. Every dropout is recorded as a ``simulated_dropout`` event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from secfl.audit.events import EventLog, register_event
from secfl.config import SimulationConfig
from secfl.errors import ConfigError, MessageError
from secfl.messages import FitIns
from secfl.randomness import Randomness
from secfl.transport.base import Transport
from secfl.wire import decode_message

register_event("simulated_dropout", ("round", "attempt", "client", "stage"))

#: The stages each protection mode goes through (validated against the config).
MODE_STAGES: dict[str, frozenset[str]] = {
    "none": frozenset({"fit"}),
    "masking": frozenset(
        {"advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask"}
    ),
    "ckks": frozenset({"encrypted_input"}),
}


def message_stage(payload: bytes) -> tuple[str | None, int, int]:
    """(stage, round, attempt) of a request; stage ``None`` for messages without one."""
    try:
        message = decode_message(payload)
    except MessageError:
        return None, 0, 0
    stage = "fit" if isinstance(message, FitIns) else getattr(type(message), "DROPOUT_STAGE", None)
    return stage, int(getattr(message, "round", 0)), int(getattr(message, "attempt", 0))


class DropoutTransport:
    """A transport in which clients vanish at the configured stages."""

    def __init__(
        self,
        inner: Transport,
        *,
        rate: float,
        stages: Sequence[str],
        randomness: Randomness,
        events: EventLog,
    ) -> None:
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"simulation.dropout_rate must be in [0, 1), got {rate}")
        self.inner = inner
        self.rate = rate
        self.stages = frozenset(stages)
        self.randomness = randomness
        self.events = events
        self._gone: dict[tuple[int, int], set[int]] = {}

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        if not requests:
            return {}
        stage, round_index, attempt = message_stage(next(iter(requests.values())))
        gone = self._gone.setdefault((round_index, attempt), set())
        if len(self._gone) > 4:  # only the current round matters
            for key in sorted(self._gone)[:-4]:
                del self._gone[key]
        if stage is not None and stage in self.stages and self.rate > 0:
            ids = sorted(c for c in requests if c not in gone)
            stream = self.randomness.stream(
                f"simulation.dropout.{stage}",
                round_index=round_index,
                attempt=attempt,
                party="simulation",
            )
            draws = stream.bernoulli(self.rate, len(ids))
            for client_id, drop in zip(ids, draws):
                if drop:
                    gone.add(client_id)
                    self.events.emit(
                        "simulated_dropout",
                        round=round_index,
                        attempt=attempt,
                        client=client_id,
                        stage=stage,
                    )
        deliver = {c: p for c, p in requests.items() if c not in gone}
        replies = self.inner.exchange(deliver) if deliver else {}
        return {c: (replies.get(c) if c not in gone else None) for c in requests}


def with_simulated_dropouts(
    inner: Transport,
    simulation: SimulationConfig,
    *,
    protection: str,
    randomness: Randomness,
    events: EventLog,
) -> Transport:
    """``inner`` itself when no dropouts are configured, else a :class:`DropoutTransport`."""
    if simulation.dropout_rate == 0 or not simulation.dropout_stages:
        return inner
    allowed = MODE_STAGES.get(protection)
    if allowed is not None:
        stray = [s for s in simulation.dropout_stages if s not in allowed]
        if stray:
            raise ConfigError(
                f"simulation.dropout_stages {stray} never occur in protection mode "
                f"{protection!r}; allowed: {sorted(allowed)}"
            )
    return DropoutTransport(
        inner,
        rate=simulation.dropout_rate,
        stages=simulation.dropout_stages,
        randomness=randomness,
        events=events,
    )
