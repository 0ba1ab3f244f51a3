"""The adversary: who is malicious, when it acts, and how one round's updates are crafted.

Independent of any transport or protection mode, so the plaintext adapter
(:mod:`secfl.attacks.simulation`) and later masking / CKKS adapters share it: an adapter
hands :meth:`Adversary.craft_round` the malicious participants' own updates and, when the
adversary is omniscient, the honest ones, and sends what comes back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secfl.attacks.base import Attack, AttackContext, DataPoisoningAttack
from secfl.data.datasets import Dataset
from secfl.errors import ConfigError, UpdateError
from secfl.randomness import RandomStream

#: Protection modes with an adversary adapter (:mod:`secfl.attacks.simulation`). Masking and
#: CKKS adapters will hand the same :meth:`Adversary.craft_round` what they can see.
ADAPTED_MODES: frozenset[str] = frozenset({"none", "ckks", "masking"})


def malicious_count(num_clients: int, *, fraction: float | None, count: int | None) -> int:
    """f: ``count``, or floor(``fraction`` * num_clients); 1 <= f <= num_clients / 2."""
    if (fraction is None) == (count is None):
        raise ConfigError("adversary: give exactly one of fraction or count")
    if count is not None:
        f = count
        where = f"adversary.count={count}"
    else:
        if fraction is None or not 0.0 < fraction <= 0.5:
            raise ConfigError(f"adversary.fraction={fraction!r} is not allowed: (0, 0.5]")
        # The small epsilon keeps 0.3 * 10 (2.9999...) at 3.
        f = math.floor(fraction * num_clients + 1e-9)
        where = f"adversary.fraction={fraction} of data.num_clients={num_clients} gives f={f}"
    if not 1 <= f <= num_clients / 2:
        raise ConfigError(
            f"{where}: allowed 1 <= f <= num_clients / 2 = {num_clients / 2:g} "
            "(malicious clients must be a minority and there must be at least one)"
        )
    return f


def select_malicious(
    client_ids: Sequence[int], count: int, stream: RandomStream
) -> tuple[int, ...]:
    """The first ``count`` of a permutation of ``client_ids`` drawn from ``stream`` (the
    run's ``adversary.select`` stream, so ``seeded`` runs pick the same clients), sorted."""
    ids = sorted(client_ids)
    if not 0 < count <= len(ids):
        raise ConfigError(f"cannot pick {count} malicious clients among {len(ids)}")
    order = stream.permutation(len(ids))
    return tuple(sorted(ids[int(i)] for i in order[:count]))


@dataclass(frozen=True, eq=False)
class CraftedRound:
    """The crafted update of every malicious participant, and what the attack chose."""

    updates: dict[int, np.ndarray]
    notes: dict[int, dict[str, Any]]


@dataclass(frozen=True, eq=False)
class Adversary:
    """The malicious clients and their attack.

    ``collusion``: the malicious participants craft together from all their updates (ALIE,
    IPM and min-max/min-sum then send one shared vector); without it each crafts from its
    own update only (the attack still knows the round's n and f). ``omniscient``: the
    attack sees the round's honest updates. ``rounds``: the inclusive round window in which
    it acts (None: every round); outside it the malicious clients behave honestly.
    """

    attack: Attack
    malicious: frozenset[int]
    collusion: bool = True
    omniscient: bool = True
    rounds: tuple[int, int] | None = None

    @property
    def poisons_data(self) -> bool:
        return isinstance(self.attack, DataPoisoningAttack)

    def is_malicious(self, client_id: int) -> bool:
        return client_id in self.malicious

    def is_active(self, round_index: int) -> bool:
        if self.rounds is None:
            return True
        first, last = self.rounds
        return first <= round_index <= last

    def describe(self) -> dict[str, Any]:
        """The adversary's pinned setting (echoed in benchmark JSON)."""
        return {
            **self.attack.describe(),
            "malicious": sorted(self.malicious),
            "count": len(self.malicious),
            "collusion": self.collusion,
            "omniscient": self.omniscient,
            "rounds": list(self.rounds) if self.rounds else None,
        }

    def poison_dataset(self, data: Dataset) -> Dataset:
        """A malicious client's training data under a data attack (``data`` is untouched)."""
        if not isinstance(self.attack, DataPoisoningAttack):
            return data
        x, y = self.attack.poison_data(data.x, data.y, data.num_classes)
        return Dataset(
            f"{data.name}+{self.attack.name}",
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(y, dtype=np.int64),
            data.num_classes,
        )

    def craft_round(
        self,
        round_index: int,
        attempt: int,
        *,
        num_participants: int,
        benign: Mapping[int, np.ndarray],
        honest: Mapping[int, np.ndarray],
        stream: RandomStream,
    ) -> CraftedRound:
        """Crafted updates for the malicious participants in ``benign`` (their own updates);
        ``honest`` is ignored unless the adversary is omniscient."""
        stray = sorted(c for c in benign if c not in self.malicious)
        if stray:
            raise ConfigError(f"clients {stray} are not malicious; they cannot craft updates")
        if not benign:
            return CraftedRound({}, {})
        seen = dict(honest) if self.omniscient else {}
        f = len(benign)

        def context() -> AttackContext:
            return AttackContext(
                round=round_index,
                attempt=attempt,
                num_participants=num_participants,
                num_malicious=f,
                stream=stream,
                collusion=self.collusion,
                omniscient=self.omniscient,
            )

        updates: dict[int, np.ndarray] = {}
        notes: dict[int, dict[str, Any]] = {}
        if self.collusion:
            ctx = context()
            updates = self.attack.craft(round_index, dict(benign), seen, ctx)
            notes = {c: dict(ctx.notes) for c in benign}
        else:
            for client in sorted(benign):
                ctx = context()
                own = self.attack.craft(round_index, {client: benign[client]}, seen, ctx)
                if set(own) != {client}:
                    raise UpdateError(
                        f"attack {self.attack.name!r} crafted for {sorted(own)}, "
                        f"expected [{client}]"
                    )
                updates[client] = own[client]
                notes[client] = dict(ctx.notes)
        if set(updates) != set(benign):
            raise UpdateError(
                f"attack {self.attack.name!r} crafted updates for {sorted(updates)}, "
                f"expected {sorted(benign)}"
            )
        checked: dict[int, np.ndarray] = {}
        for client, update in updates.items():
            vector = np.asarray(update)
            if vector.shape != np.shape(benign[client]):
                raise UpdateError(
                    f"attack {self.attack.name!r} crafted shape {vector.shape} for client "
                    f"{client}, expected {np.shape(benign[client])}"
                )
            checked[client] = np.ascontiguousarray(vector, dtype=np.float32)
        return CraftedRound(checked, notes)
