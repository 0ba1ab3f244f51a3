"""The masking graph: complete (SecAgg) or a random k-regular Harary graph (SecAgg+).

Bell et al. CCS 2020 §3 (and their Appendix on the Harary construction): place the n
clients on a ring in a uniformly random order and connect each to the k/2 nearest on either
side. The order is derived from a hash of every advertised key (and the round and attempt),
so it is fixed only once all keys are committed: a server that wants a chosen neighbourhood
would have to find advertised keys that hash to it, and the keys are signed by their owners
with pinned identity keys, so it cannot pick them.
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
    h = hashlib.sha256(b"secfl/secagg/v1/graph")
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
