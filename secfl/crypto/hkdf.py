"""HKDF-SHA256 (RFC 5869) with a salt and domain-separated ``info``.

Every derivation names its purpose with a label and a tuple of context fields; both are
length-prefixed so no two distinct (label, context) pairs share an ``info`` string. This is
what Flower's SecAgg+ lacks (no salt, no context: a pairwise key is then the same for every
round and every use). Bonawitz et al. CCS 2017 §4 require the pairwise keys of distinct uses
to be independent; domain separation gives that in the random-oracle model of HKDF.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secfl.errors import ConfigError

#: The salt of every secfl protocol derivation (public, fixed: binds keys to secfl v1).
PROTOCOL_SALT = b"secfl/kdf/v1/salt"
_DOMAIN = b"secfl/kdf/v1"

ContextField = int | bytes | str


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256: ``length`` bytes of output keying material."""
    if not 1 <= length <= 255 * 32:
        raise ConfigError(f"HKDF output length must be in [1, 8160], got {length}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def encode_info(label: str, context: tuple[ContextField, ...]) -> bytes:
    """The ``info`` string: domain, label, then each context field typed and length-prefixed."""
    parts = [_DOMAIN, _frame(b"L", label.encode("utf-8"))]
    for value in context:
        if isinstance(value, bool):
            raise ConfigError("HKDF context fields are int, bytes or str, not bool")
        if isinstance(value, int):
            if value < 0 or value >= 2**64:
                raise ConfigError(f"HKDF integer context field must be in [0, 2^64), got {value}")
            parts.append(b"I" + struct.pack(">Q", value))
        elif isinstance(value, bytes):
            parts.append(_frame(b"B", value))
        else:
            parts.append(_frame(b"S", value.encode("utf-8")))
    return b"".join(parts)


def _frame(tag: bytes, raw: bytes) -> bytes:
    return tag + struct.pack(">I", len(raw)) + raw


def derive_key(
    ikm: bytes, label: str, *context: ContextField, length: int = 32, salt: bytes = PROTOCOL_SALT
) -> bytes:
    """A key for one purpose: HKDF-SHA256(ikm, salt, info=encode_info(label, context))."""
    return hkdf_sha256(ikm, salt=salt, info=encode_info(label, context), length=length)
