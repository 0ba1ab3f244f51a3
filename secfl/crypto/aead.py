"""AES-256-GCM for the encrypted Shamir shares (Bonawitz et al. CCS 2017 §4, ShareKeys).

Each pair (u, v) derives one symmetric key per (round, attempt) from X25519 and HKDF; each
direction uses its own nonce (sender, receiver), and each key encrypts exactly one message
per direction, so a (key, nonce) pair is never reused. The associated data binds round,
attempt, sender and receiver, so a ciphertext cannot be replayed into another round or
re-addressed. Decryption failure raises :class:`AuthenticationError` for every cause.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secfl.errors import AuthenticationError, ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def direction_nonce(sender: int, receiver: int) -> bytes:
    """The 96-bit nonce of the one message ``sender`` -> ``receiver`` under a pair key."""
    return struct.pack(">IIxxxx", sender, receiver)


def seal(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption; returns ciphertext || tag."""
    _check(key, nonce)
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM decryption; raises :class:`AuthenticationError` on any failure."""
    _check(key, nonce)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
    except (InvalidTag, ValueError):
        raise AuthenticationError("ciphertext did not authenticate") from None


def _check(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ConfigError(f"AES-256-GCM key must be 32 bytes, got {len(key)}")
    if len(nonce) != NONCE_BYTES:
        raise ConfigError(f"AES-GCM nonce must be 12 bytes, got {len(nonce)}")
