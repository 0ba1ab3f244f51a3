"""Per-client reputation: multiplicative decay when flagged, slow additive recovery.

A flagged client's reputation r becomes r * decay; a kept one's min(1, r + recovery); a
client that does not take part keeps its value. Recovery is deliberately slower than decay
(defaults 0.05 vs x0.5), so an attacker who alternates honest and malicious rounds loses
reputation over time. The state is plain JSON (client id -> float, exact round trip), so a
resumed run continues with the same values bit for bit.

:class:`Suspicion` is the masking-mode counterpart: per-client evidence accumulated from the
verdicts on the sub-cohorts a client was placed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from secfl.errors import CheckpointError, ConfigError


class Reputation:
    """Reputation in [0, 1] per client id."""

    def __init__(self, *, initial: float = 1.0, decay: float = 0.5, recovery: float = 0.05):
        for name, value, low, high in (
            ("trust.reputation.initial", initial, 0.0, 1.0),
            ("trust.reputation.decay", decay, 0.0, 1.0),
            ("trust.reputation.recovery", recovery, 0.0, 1.0),
        ):
            if not (np.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
        self.initial = float(initial)
        self.decay = float(decay)
        self.recovery = float(recovery)
        self._values: dict[int, float] = {}

    def of(self, client_id: int) -> float:
        return self._values.get(client_id, self.initial)

    def values(self, client_ids: Iterable[int]) -> np.ndarray:
        return np.array([self.of(c) for c in client_ids], dtype=np.float64)

    def update(self, *, kept: Iterable[int], flagged: Iterable[int]) -> None:
        """Apply one round's decisions (a client in both is treated as flagged)."""
        flagged = set(flagged)
        for client_id in kept:
            if client_id not in flagged:
                self._values[client_id] = min(1.0, self.of(client_id) + self.recovery)
        for client_id in flagged:
            self._values[client_id] = self.of(client_id) * self.decay

    def state(self) -> dict[str, Any]:
        return _scores_state(self._values)

    def load_state(self, raw: Mapping[str, Any] | None) -> None:
        self._values = _load_scores(
            raw, "reputation", lambda v: 0.0 <= v <= 1.0, "a value outside [0, 1]"
        )


class Suspicion:
    """Per-client suspicion under masking, where only sub-cohort sums are visible.

    A client in a flagged sub-cohort gains ``step``; in a kept one its suspicion is
    multiplied by ``forgive`` (a kept sub-cohort is evidence that none of its members
    poisoned). The split is fresh and random every round, so an honest client shares a
    flagged sub-cohort only by chance, while an attacker's sub-cohort is flagged whenever
    its attack is detected: suspicion separates them over rounds. A client whose suspicion
    reaches ``bound`` is excluded before masking in every later round (a permanent verdict:
    an excluded client gives no further evidence). Plain JSON state, exact on resume."""

    def __init__(self, *, step: float = 1.0, forgive: float = 0.5, bound: float = 6.0):
        for name, value, low, high in (
            ("trust.suspicion.step", step, 0.0, 1e6),
            ("trust.suspicion.forgive", forgive, 0.0, 1.0),
            ("trust.suspicion.bound", bound, 0.0, 1e6),
        ):
            if not (np.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
        if step <= 0 or bound <= 0:
            raise ConfigError(f"trust.suspicion.step and bound must be > 0, got {step}, {bound}")
        self.step = float(step)
        self.forgive = float(forgive)
        self.bound = float(bound)
        self._values: dict[int, float] = {}

    def of(self, client_id: int) -> float:
        return self._values.get(client_id, 0.0)

    def exceeds(self, client_id: int) -> bool:
        return self.of(client_id) >= self.bound

    def update(self, *, kept: Iterable[int], flagged: Iterable[int]) -> None:
        """Apply one round's sub-cohort verdicts to their members (flagged wins)."""
        flagged = set(flagged)
        for client_id in kept:
            if client_id not in flagged and client_id in self._values:
                self._values[client_id] = self._values[client_id] * self.forgive
        for client_id in flagged:
            self._values[client_id] = self.of(client_id) + self.step

    def state(self) -> dict[str, Any]:
        return _scores_state(self._values)

    def load_state(self, raw: Mapping[str, Any] | None) -> None:
        self._values = _load_scores(
            raw,
            "suspicion",
            lambda v: bool(np.isfinite(v)) and v >= 0.0,
            "a negative or non-finite value",
        )

    @property
    def recorded(self) -> bool:
        """Whether any client has a suspicion value (only sub-cohort rounds record one)."""
        return bool(self._values)


def _scores_state(values: Mapping[int, float]) -> dict[str, Any]:
    return {"values": {str(c): v for c, v in sorted(values.items())}}


def _load_scores(
    raw: Mapping[str, Any] | None, what: str, valid: Callable[[float], bool], rule: str
) -> dict[int, float]:
    """Per-client scores from checkpoint state; a malformed state is a CheckpointError."""
    if not raw:
        return {}
    try:
        values = {int(c): float(v) for c, v in raw["values"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"trust {what} state is malformed: {exc}") from exc
    if not all(valid(v) for v in values.values()):
        raise CheckpointError(f"trust {what} state holds {rule}")
    return values
