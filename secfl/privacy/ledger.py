"""Privacy ledgers: one per client (sample level) and one global (user level).

A :class:`PartyLedger` keeps every :class:`~secfl.privacy.events.DpEvent` charged to one
party and asks its accountant for the cumulative epsilon of the whole history, so the figure
is right however often (and after however many restarts) the party was sampled — never a
per-round epsilon summed naively, never a history restarted every round.

* sample level (``client:<id>``): delta is checked against the client's record count n;
  Poisson amplification applies because the client's batch-sampling coins are its secret.
* user level (``server``): delta is checked against the number of clients. The server, the
  participants and anyone holding a receipt know who was sampled, so the primary figure is
  accounted **without** sampling amplification; the amplified figure is reported beside it,
  valid only for observers of the released model.

:func:`check_delta` refuses delta > 1/(10 n), the usual ceiling (a delta near 1/n permits
mechanisms that publish one record in clear).

The configured accountant composes the history while it handles every event's mechanism;
once the history holds one it cannot (a Skellam event under a Gaussian library accountant),
the whole history is composed by ``secfl_rdp`` (:func:`~secfl.privacy.accountants.accountant_for`),
and :meth:`PartyLedger.summary` reports both names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from secfl.errors import BudgetExhausted, PrivacyError
from secfl.privacy.accountants import accountant, accountant_for, epsilon
from secfl.privacy.events import DpEvent, Level


def check_delta(delta: float, n: int, *, key: str, unit: str) -> None:
    """Refuse ``delta`` above 1/(10 n); the message names the key, value and bound."""
    if n < 1:
        raise PrivacyError(f"{key}: cannot account for {n} {unit}")
    bound = 1.0 / (10.0 * n)
    if not 0 < delta <= bound:
        raise PrivacyError(
            f"key {key!r}: value {delta!r} is not allowed: delta must be in (0, 1/(10 n)] = "
            f"(0, {bound:.3g}] for n = {n} {unit}"
        )


@dataclass
class PartyLedger:
    """Every DP event charged to ``party``, composed by ``accountant_name`` (or by
    ``secfl_rdp`` when a mechanism in the history is beyond it)."""

    party: str
    level: Level
    delta: float
    accountant_name: str
    #: Records (sample level) or clients (user level) the delta was checked against.
    n: int
    budget: float | None = None
    budget_key: str = ""
    events: list[DpEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        accountant(self.accountant_name)  # unknown names fail at construction
        if self.budget is not None and not self.budget > 0:
            raise PrivacyError(f"{self.budget_key}: budget must be > 0, got {self.budget}")

    @property
    def amplified_is_valid_for_everyone(self) -> bool:
        return self.level == "sample"

    def accountant_used(self, extra: Sequence[DpEvent] = ()) -> str:
        """The accountant that composes the history (with ``extra``): the configured one if
        it handles every mechanism in it, else ``secfl_rdp``."""
        return accountant_for(self.accountant_name, [*self.events, *extra])

    def epsilon(self, extra: Sequence[DpEvent] = ()) -> float:
        """The primary cumulative epsilon (unamplified at user level), with ``extra`` events."""
        events = [*self.events, *extra]
        return epsilon(
            accountant_for(self.accountant_name, events),
            events,
            self.delta,
            amplified=self.amplified_is_valid_for_everyone,
        )

    def epsilon_amplified(self) -> float:
        """Cumulative epsilon with sampling amplification (only Poisson-sampled events)."""
        return epsilon(self.accountant_used(), self.events, self.delta, amplified=True)

    def would_exceed(self, planned: Sequence[DpEvent]) -> bool:
        return self.budget is not None and self.epsilon(planned) > self.budget

    def charge_check(self, planned: Sequence[DpEvent]) -> None:
        """Raise :class:`BudgetExhausted` if ``planned`` would take the party over budget."""
        if self.would_exceed(planned):
            # Both figures from the accountant that composes the history with ``planned``.
            name = self.accountant_used(planned)
            amplified = self.amplified_is_valid_for_everyone
            spent = epsilon(name, self.events, self.delta, amplified=amplified)
            raise BudgetExhausted(
                f"privacy budget {self.budget_key}={self.budget} of {self.party} would be "
                f"exceeded: spent {spent:.4f}, after this round "
                f"{self.epsilon(planned):.4f} (delta {self.delta:.3g}, {name})"
            )

    def add(self, event: DpEvent) -> None:
        if event.party != self.party:
            raise PrivacyError(f"event for {event.party} charged to ledger of {self.party}")
        if event.level != self.level:
            raise PrivacyError(f"{event.level}-level event charged to a {self.level}-level ledger")
        self.events.append(event)

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "party": self.party,
            "level": self.level,
            "accountant": self.accountant_used(),
            "accountant_configured": self.accountant_name,
            "delta": self.delta,
            "n": self.n,
            "budget": self.budget,
            "events": len(self.events),
            "steps": sum(e.steps for e in self.events),
            "epsilon": self.epsilon(),
        }
        if self.level == "user":
            amplified = all(e.amplification == "poisson" for e in self.events)
            row["epsilon_against"] = "server and participants (no sampling amplification)"
            row["epsilon_amplified_model_observers"] = (
                self.epsilon_amplified() if amplified and self.events else None
            )
            row["epsilon_amplified_note"] = (
                "valid only for observers of the released model who do not know who was "
                "sampled; claimed only for Poisson client sampling"
            )
        return row

    def state(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.events]

    def load_state(self, raw: list[dict[str, Any]]) -> None:
        self.events = [DpEvent.from_dict(r) for r in raw]
