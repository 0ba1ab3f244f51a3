"""The random model sharing pool's per-round draw and assignment (CN119005361B, S403).

Each round every participant advertises a fresh 32-byte *pool key* (from its own
``strategy.pool.key`` stream: the OS CSPRNG by default). Once the server holds every
advertisement it derives one seed, SHA-256 under the domain ``secfl/pool/v1/assign`` of the
round, the attempt, the pool's model names and every (id, key) in ascending id order, and
from it (AES-CTR keystreams under two sub-domains, :func:`secfl.secagg.graph.ring_order`):

1. the drawn models: the first ``k`` of a random order of the pool, where
   ``k = min(models_per_round, n // min_cohort)`` (fewer models when the round is too small
   to give each one a cohort of ``aggregation.min_cohort``; none below ``min_cohort``);
2. the cohorts: the participants in a random ring order dealt round-robin to the ``k``
   drawn models, so cohort sizes differ by at most one and each is ``>= min_cohort``.

The same keys give the same seed to everyone, so each client recomputes the whole
assignment from the list the server sends (:meth:`PoolParticipant.verify`) and refuses a
list without its own key or an assignment that does not follow from the list. The server
cannot choose a participant's model without choosing the keys, and honest clients' keys are
fresh random bytes it cannot predict. Why a pool-level advertisement and not the SecAgg
keys: the per-model SecAgg instances advertise their keys *within* each cohort, after the
assignment, so there is no cross-cohort key list yet; the pool stage is the same commitment
in every protection mode (``none``, ``masking``, ``ckks``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from secfl.errors import ProtocolError
from secfl.randomness import Randomness
from secfl.secagg.graph import ring_order

POOL_KEY_BYTES = 32
_DOMAIN = b"secfl/pool/v1/assign"


class PoolAssignmentError(ProtocolError):
    """A client found that the server's pool assignment does not follow from the keys."""


@dataclass(frozen=True)
class PoolAdvert:
    """A participant's pool key for one round attempt."""

    round: int
    attempt: int
    client_id: int
    key: bytes

    def __post_init__(self) -> None:
        if type(self.key) is not bytes or len(self.key) != POOL_KEY_BYTES:
            raise PoolAssignmentError(f"a pool key is {POOL_KEY_BYTES} bytes")


@dataclass(frozen=True)
class PoolAssignment:
    """What the server sends every participant: every advertisement it used, the pool's
    model names, the drawn models (indices into ``models``) and, per drawn model, its
    cohort (sorted client ids)."""

    round: int
    attempt: int
    adverts: tuple[tuple[int, bytes], ...]
    models: tuple[str, ...]
    drawn: tuple[int, ...]
    cohorts: tuple[tuple[int, ...], ...]

    def model_of(self, client_id: int) -> str:
        for index, cohort in zip(self.drawn, self.cohorts, strict=True):
            if client_id in cohort:
                return self.models[index]
        raise PoolAssignmentError(f"client {client_id} is in no cohort of round {self.round}")


def assignment_seed(
    round_index: int, attempt: int, models: Sequence[str], adverts: Sequence[tuple[int, bytes]]
) -> bytes:
    """SHA-256 over the domain, round, attempt, model names and sorted (id, key) pairs."""
    h = hashlib.sha256(_DOMAIN)
    h.update(struct.pack(">QQII", round_index, attempt, len(models), len(adverts)))
    for name in models:
        encoded = name.encode()
        h.update(struct.pack(">I", len(encoded)) + encoded)
    for client_id, key in sorted(adverts):
        h.update(struct.pack(">I", client_id) + key)
    return h.digest()


def models_to_draw(
    participants: int, models_per_round: int, pool_size: int, min_cohort: int
) -> int:
    """How many models a round of ``participants`` can train: each needs ``min_cohort``."""
    return max(0, min(models_per_round, pool_size, participants // max(1, min_cohort)))


def assign(
    round_index: int,
    attempt: int,
    adverts: Sequence[tuple[int, bytes]],
    models: Sequence[str],
    *,
    models_per_round: int,
    min_cohort: int,
) -> PoolAssignment:
    """The assignment that follows from ``adverts`` (see the module docstring)."""
    ids = [client_id for client_id, _ in adverts]
    if len(set(ids)) != len(ids):
        raise PoolAssignmentError(f"duplicate client ids among the pool adverts: {sorted(ids)}")
    for _, key in adverts:
        if type(key) is not bytes or len(key) != POOL_KEY_BYTES:
            raise PoolAssignmentError(f"a pool key is {POOL_KEY_BYTES} bytes")
    ordered = tuple(sorted(adverts))
    seed = assignment_seed(round_index, attempt, models, ordered)
    k = models_to_draw(len(ordered), models_per_round, len(models), min_cohort)
    model_order = ring_order(list(range(len(models))), hashlib.sha256(seed + b"/models").digest())
    drawn = tuple(int(m) for m in model_order[:k])
    cohorts: tuple[tuple[int, ...], ...] = ()
    if k:
        ring = ring_order(sorted(ids), hashlib.sha256(seed + b"/cohorts").digest())
        cohorts = tuple(tuple(sorted(ring[j::k])) for j in range(k))
    return PoolAssignment(
        round=round_index,
        attempt=attempt,
        adverts=ordered,
        models=tuple(models),
        drawn=drawn,
        cohorts=cohorts,
    )


class PoolParticipant:
    """A client's side of the pool stage: advertise a fresh key, verify the assignment."""

    def __init__(
        self,
        client_id: int,
        randomness: Randomness,
        *,
        models: Sequence[str],
        models_per_round: int,
        min_cohort: int,
    ) -> None:
        self.client_id = client_id
        self.randomness = randomness
        self.models = tuple(models)
        self.models_per_round = models_per_round
        self.min_cohort = min_cohort
        self._advert: PoolAdvert | None = None

    def advertise(self, round_index: int, attempt: int) -> PoolAdvert:
        stream = self.randomness.stream(
            "strategy.pool.key",
            round_index=round_index,
            attempt=attempt,
            party=f"client-{self.client_id}",
        )
        self._advert = PoolAdvert(
            round_index, attempt, self.client_id, stream.bytes(POOL_KEY_BYTES)
        )
        return self._advert

    def verify(self, assignment: PoolAssignment) -> str:
        """The name of this client's model, or :class:`PoolAssignmentError` when the
        assignment is not the one its keys determine (one message for every failure)."""
        mine = self._advert
        if mine is None:
            raise PoolAssignmentError(f"client {self.client_id} has not advertised a pool key")
        expected = None
        if (
            (assignment.round, assignment.attempt) == (mine.round, mine.attempt)
            and assignment.models == self.models
            and (mine.client_id, mine.key) in assignment.adverts
        ):
            expected = assign(
                mine.round,
                mine.attempt,
                assignment.adverts,
                self.models,
                models_per_round=self.models_per_round,
                min_cohort=self.min_cohort,
            )
        if expected is None or expected != assignment:
            raise PoolAssignmentError(
                f"client {self.client_id} refuses the pool assignment of round "
                f"{mine.round} attempt {mine.attempt}: it does not follow from the advertised "
                "pool keys (wrong round, pool, missing or altered key, or altered draw)"
            )
        self._advert = None  # one verification per advertisement
        return assignment.model_of(self.client_id)
