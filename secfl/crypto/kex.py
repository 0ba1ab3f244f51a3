"""X25519 key agreement (RFC 7748) for SecAgg's two key pairs per client.

Bonawitz et al. CCS 2017 §4 (and Bell et al. CCS 2020 §3) give each client two key pairs per
round: ``c`` for authenticated encryption of the Shamir shares and ``s`` for the pairwise
mask seeds. The private half of ``s`` is Shamir-shared so the server can recover the masks
of a client that drops; it is therefore held as its 32 raw bytes (in a wipeable
``bytearray``) as well as a key object.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from secfl.errors import AuthenticationError, ConfigError

KEY_BYTES = 32


class KeyPair:
    """An X25519 key pair whose private bytes can be wiped."""

    __slots__ = ("_private", "_raw", "public")

    def __init__(self, private_bytes: bytes | bytearray) -> None:
        if len(private_bytes) != KEY_BYTES:
            raise ConfigError(f"X25519 private key must be 32 bytes, got {len(private_bytes)}")
        self._raw = bytearray(private_bytes)
        self._private: X25519PrivateKey | None = X25519PrivateKey.from_private_bytes(
            bytes(self._raw)
        )
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] | None = None) -> KeyPair:
        """A fresh pair: from ``random_bytes`` (a seeded stream) or the OS CSPRNG."""
        if random_bytes is None:
            key = X25519PrivateKey.generate()
            raw = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            return cls(raw)
        return cls(random_bytes(KEY_BYTES))

    @property
    def private_bytes(self) -> bytes:
        if self._private is None:
            raise ConfigError("this key pair was wiped")
        return bytes(self._raw)

    def agree(self, peer_public: bytes) -> bytes:
        """The raw X25519 shared secret with ``peer_public`` (feed it to HKDF, never use raw)."""
        if self._private is None:
            raise ConfigError("this key pair was wiped")
        return x25519_agree(self._private, peer_public)

    def wipe(self) -> None:
        """Zero the private bytes and drop the key object (best effort in CPython)."""
        for i in range(len(self._raw)):
            self._raw[i] = 0
        self._private = None

    @property
    def wiped(self) -> bool:
        return self._private is None


def x25519_agree(private: X25519PrivateKey | bytes, peer_public: bytes) -> bytes:
    """X25519(private, peer_public); an all-zero result (small-order point) is refused."""
    if len(peer_public) != KEY_BYTES:
        raise AuthenticationError(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
    key = private if isinstance(private, X25519PrivateKey) else _private_from(private)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # the library refuses low-order points
        raise AuthenticationError(f"X25519 agreement refused: {exc}") from None
    return shared


def _private_from(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"X25519 private key must be 32 bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_private(raw: bytes) -> X25519PrivateKey:
    """A key object from 32 raw private bytes (e.g. Shamir-recovered), parsed once."""
    return _private_from(raw)


def public_of(key: X25519PrivateKey) -> bytes:
    """The raw public key of a private key object."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_private(raw: bytes) -> bytes:
    """The public key of raw private bytes (checks a Shamir-recovered key against its ad)."""
    return (
        _private_from(raw)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
