"""The masking graph: complete (SecAgg) or a random k-regular Harary graph (SecAgg+).

Bell et al. CCS 2020 §3 (and their Appendix on the Harary construction): place the n
clients on a ring in a uniformly random order and connect each to the k/2 nearest on either
side. The order is derived from a hash of every advertised key (and the round and attempt),
so it is fixed only once all keys are committed: a server that wants a chosen neighbourhood
would have to find advertised keys that hash to it, and the keys are signed by their owners
with pinned identity keys, so it cannot pick them.

Sub-cohorts (the trust module under masking, DESIGN 4) use the same idea: the split of U1
into blocks of at least ``min_cohort`` is a permutation keyed by a hash of every advertised
key (:func:`cohort_seed`, a separate domain from the graph seed), derived and checked by
every client, so the server cannot place an honest client among colluders.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

from secfl.crypto.prg import keystream
from secfl.errors import ConfigError


def graph_seed(
    round_index: int, attempt: int, advertised: Sequence[tuple[int, bytes, bytes]]
) -> bytes:
    """SHA-256 over the round, attempt and every (id, c_pk, s_pk) in ascending id order."""
    return _keys_digest(b"secfl/secagg/v1/graph", round_index, attempt, advertised)


def cohort_seed(
    round_index: int, attempt: int, advertised: Sequence[tuple[int, bytes, bytes]]
) -> bytes:
    """Like :func:`graph_seed`, under the domain ``secfl/secagg/v1/cohorts``."""
    return _keys_digest(b"secfl/secagg/v1/cohorts", round_index, attempt, advertised)


def split_cohorts(ids: Sequence[int], min_cohort: int, seed: bytes) -> tuple[tuple[int, ...], ...]:
    """Split ``ids`` into g = floor(n / min_cohort) sub-cohorts whose sizes differ by at
    most one: order the ids by :func:`ring_order` (an AES-CTR key per id from ``seed``) and
    deal them round-robin, position i to sub-cohort i mod g. Each sub-cohort is sorted;
    sub-cohort j is the one dealt position j first."""
    members = sorted(set(ids))
    if len(members) != len(ids):
        raise ConfigError("sub-cohort members must be distinct")
    if min_cohort < 1:
        raise ConfigError(f"min_cohort must be >= 1, got {min_cohort}")
    groups = len(members) // min_cohort
    if groups < 1:
        raise ConfigError(
            f"{len(members)} clients cannot form a sub-cohort of aggregation.min_cohort="
            f"{min_cohort}"
        )
    order = ring_order(members, seed)
    return tuple(tuple(sorted(order[j::groups])) for j in range(groups))


def cohort_neighbours(cohorts: Sequence[Sequence[int]]) -> dict[int, tuple[int, ...]]:
    """The block graph: each client neighbours exactly the other members of its sub-cohort."""
    out: dict[int, tuple[int, ...]] = {}
    for block in cohorts:
        members = tuple(sorted(block))
        for i, u in enumerate(members):
            out[u] = members[:i] + members[i + 1 :]
    return out


def _keys_digest(
    domain: bytes, round_index: int, attempt: int, advertised: Sequence[tuple[int, bytes, bytes]]
) -> bytes:
    h = hashlib.sha256(domain)
    h.update(struct.pack(">QQI", round_index, attempt, len(advertised)))
    for client_id, c_pk, s_pk in sorted(advertised):
        h.update(struct.pack(">I", client_id) + c_pk + s_pk)
    return h.digest()


def ring_order(ids: Sequence[int], seed: bytes) -> list[int]:
    """The random ring: ids sorted by a 64-bit AES-CTR key each (ties broken by id)."""
    ordered = sorted(ids)
    keys = np.frombuffer(keystream(seed, 8 * len(ordered)), dtype=">u8")
    return [ordered[i] for i in np.lexsort((np.arange(len(ordered)), keys))]


def build_neighbours(ids: Sequence[int], k: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each id's neighbours (sorted). ``k >= len(ids) - 1`` gives the complete graph."""
    members = sorted(set(ids))
    if len(members) != len(ids):
        raise ConfigError("graph members must be distinct")
    n = len(members)
    if k >= n - 1:
        everyone = tuple(members)
        return {u: everyone[:i] + everyone[i + 1 :] for i, u in enumerate(everyone)}
    if k < 0 or k % 2:
        raise ConfigError(f"neighbours k of a sparse graph must be even and >= 0, got {k}")
    ring = ring_order(members, seed)
    half = k // 2
    out: dict[int, tuple[int, ...]] = {}
    for position, u in enumerate(ring):
        near = {ring[(position + step) % n] for step in range(-half, half + 1) if step}
        out[u] = tuple(sorted(near))
    return out
