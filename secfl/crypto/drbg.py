"""Byte sources for DESIGN 3b: the OS CSPRNG and a seeded AES-256-CTR DRBG.

The seeded DRBG exists for simulations and tests only. Its key for one stream is
``HKDF-SHA256(ikm=seed, salt=SALT, info=DOMAIN || round || attempt || party || purpose)``, so
streams for different (round, attempt, party, purpose) tuples are independent and a resumed
run regenerates exactly the bytes an uninterrupted run would have drawn. The keystream is
AES-256 in CTR mode from an all-zero counter block; a stream never re-keys, and one stream
may produce at most 2^64 blocks, far beyond any use here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secfl.errors import ConfigError

#: Fixed salt of the stream-key derivation (public; binds the derivation to secfl).
DRBG_SALT = b"secfl/drbg/v1/salt"
_DOMAIN = b"secfl/drbg/v1/stream"
_ZERO_BLOCK = bytes(16)

ByteReader = Callable[[int], bytes]


def os_random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG."""
    if n < 0:
        raise ConfigError(f"number of random bytes must be >= 0, got {n}")
    return os.urandom(n)


def _encode_label(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def derive_stream_key(
    seed: int, *, round_index: int, attempt: int, party: str, purpose: str
) -> bytes:
    """The 32-byte AES key of one seeded stream (DESIGN 3b).

    Every field is length-prefixed, so no two distinct tuples share an ``info`` string.
    """
    if seed < 0 or seed >= 2**64:
        raise ConfigError(f"seed must be in [0, 2^64), got {seed}")
    if round_index < 0 or attempt < 0:
        raise ConfigError(
            f"round and attempt must be >= 0, got round={round_index} attempt={attempt}"
        )
    info = (
        _DOMAIN
        + struct.pack(">QQ", round_index, attempt)
        + _encode_label(party)
        + _encode_label(purpose)
    )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=DRBG_SALT, info=info)
    return hkdf.derive(struct.pack(">Q", seed))


class AesCtrDrbg:
    """Deterministic byte stream: the AES-256-CTR keystream under one derived key."""

    __slots__ = ("_encryptor",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError(f"DRBG key must be 32 bytes, got {len(key)}")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_BLOCK)).encryptor()

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        if n < 0:
            raise ConfigError(f"number of random bytes must be >= 0, got {n}")
        return self._encryptor.update(bytes(n))


def seeded_reader(
    seed: int, *, round_index: int, attempt: int, party: str, purpose: str
) -> ByteReader:
    """A byte reader for one seeded stream."""
    key = derive_stream_key(
        seed, round_index=round_index, attempt=attempt, party=party, purpose=purpose
    )
    return AesCtrDrbg(key).read
