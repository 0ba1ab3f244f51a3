"""Ed25519 identity signatures (RFC 8032) from ``cryptography``.

Verification raises :class:`~secfl.errors.SignatureError` and never returns a bool, so a
caller cannot forget to check. Messages are domain-separated by the caller's ``context``
label, so a signature made for one protocol step is never valid for another.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secfl.errors import SignatureError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def _framed(context: bytes, message: bytes) -> bytes:
    return b"secfl/sig/v1" + struct.pack(">H", len(context)) + context + message


class SigningKey:
    """An Ed25519 private key; it never leaves the party that generated it."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the OS CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from 32 seed bytes (seeded simulations and tests only)."""
        if len(seed) != 32:
            raise SignatureError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, context: bytes, message: bytes) -> bytes:
        return self._key.sign(_framed(context, message))

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (the caller stores it 0600 where only its owner reads)."""
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Load a PKCS#8 PEM Ed25519 private key; anything else raises SignatureError."""
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)


def public_key_pem(public_key: bytes) -> bytes:
    """SubjectPublicKeyInfo PEM of a raw 32-byte Ed25519 public key."""
    from cryptography.hazmat.primitives import serialization

    if len(public_key) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return Ed25519PublicKey.from_public_bytes(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(data: bytes) -> bytes:
    """The raw Ed25519 public key in ``data``: a PEM public key, a PEM private key (its
    public half) or 64 hex digits. Anything else raises :class:`SignatureError`."""
    from cryptography.hazmat.primitives import serialization

    text = data.strip()
    if b"PRIVATE KEY" in text:
        return SigningKey.from_pem(text).public_bytes()
    if b"PUBLIC KEY" in text:
        try:
            key = serialization.load_pem_public_key(text)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"expected an Ed25519 public key, got {type(key).__name__}")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raw = b""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SignatureError("expected a PEM Ed25519 key or 64 hex digits of a raw public key")
    return raw


def verify_signature(public_key: bytes, signature: bytes, context: bytes, message: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is valid for ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise SignatureError("invalid signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, _framed(context, message))
    except (InvalidSignature, ValueError):
        raise SignatureError("invalid signature") from None
