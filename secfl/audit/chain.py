"""The hash chain of the audit log: canonical encoding, record hash and record signature.

See ``protocols/audit_log.md`` for the normative format. A record is a JSON object; its
canonical encoding is ``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=True)`` of the record after one JSON round trip (so integer dictionary keys
have become strings before sorting). Each record carries ``prev`` (the previous record's
``hash``, 64 zeros for record 0), ``hash`` (SHA-256 over a domain label and the canonical
encoding of the record without ``hash`` and ``sig``) and ``sig`` (the server's Ed25519
signature over the 32 hash bytes, context ``secfl/audit/record/v1``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from secfl.crypto.sign import SigningKey, verify_signature

FORMAT = "secfl-audit/1"
RECORD_DOMAIN = b"secfl/audit/record/v1\n"
RECORD_CONTEXT = b"secfl/audit/record/v1"
GENESIS_PREV = "0" * 64
#: Fields the chain owns; producers may not use these names.
CHAIN_FIELDS = ("prev", "hash", "sig", "genesis")
RESERVED_FIELDS = frozenset({"seq", "time", "event", *CHAIN_FIELDS})


def jsonable(value: Any) -> Any:
    """``default=`` for :func:`json.dumps`: NumPy scalars and arrays, bytes as hex."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot log a value of type {type(value).__name__}")


def canonical_bytes(record: dict[str, Any]) -> bytes:
    """The canonical encoding of an already normalised record (see :func:`normalise`)."""
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=jsonable
    ).encode("ascii")


def normalise(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a JSON reader will see it (dict keys strings, arrays lists)."""
    normal: dict[str, Any] = json.loads(canonical_bytes(record))
    return normal


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 (hex) over the domain label and the canonical record without hash and sig."""
    body = {k: v for k, v in record.items() if k not in ("hash", "sig")}
    return hashlib.sha256(RECORD_DOMAIN + canonical_bytes(body)).hexdigest()


def seal(record: dict[str, Any], signer: SigningKey | None) -> dict[str, Any]:
    """``record`` (with ``prev`` set) normalised, hashed and, with a signer, signed."""
    sealed = normalise(record)
    sealed["hash"] = record_hash(sealed)
    if signer is not None:
        sealed["sig"] = signer.sign(RECORD_CONTEXT, bytes.fromhex(sealed["hash"])).hex()
    return sealed


def verify_record_signature(public_key: bytes, record: dict[str, Any]) -> None:
    """Raise :class:`~secfl.errors.SignatureError` unless ``sig`` signs ``hash``."""
    try:
        digest = bytes.fromhex(str(record.get("hash", "")))
        signature = bytes.fromhex(str(record.get("sig", "")))
    except ValueError:
        digest, signature = b"", b""
    verify_signature(public_key, signature, RECORD_CONTEXT, digest)


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 (hex) of a raw Ed25519 public key: what a run directory may name."""
    return hashlib.sha256(b"secfl/audit/key/v1" + public_key).hexdigest()
