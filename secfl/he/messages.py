"""Messages of the CKKS protocol (type ids 200-299), and the signed part of an update.

Ciphertext lists travel as one ``bytes`` field: each ciphertext (an SFCK v1 blob of RNS
residues, ``secfl.crypto.ckks_wire``; version 2 of the messages that carry them) prefixed
by its u32 big-endian length.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from secfl.wire import WireMessage, frame_parts, unframe_parts

#: Domain-separation label of a client's update signature.
UPDATE_SIGNATURE_CONTEXT = b"secfl/ckks/update/v2"


def frame_blobs(blobs: Sequence[bytes]) -> bytes:
    """Concatenate ciphertext blobs, each prefixed by its u32 big-endian length."""
    return frame_parts(blobs)


def unframe_blobs(data: bytes, what: str) -> list[bytes]:
    """Inverse of :func:`frame_blobs`; raises :class:`MessageError` on truncation."""
    return unframe_parts(data, what)


@dataclass(frozen=True, eq=False)
class CkksFitIns(WireMessage):
    """Server -> client: train from this model, encrypt under this (public) context."""

    TYPE_ID: ClassVar[int] = 200
    VERSION: ClassVar[int] = 1
    DROPOUT_STAGE: ClassVar[str] = "encrypted_input"
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("model_hash", "bytes"),
        ("weights", "f32"),
        ("epoch", "u32"),
        ("context", "bytes"),
    )
    round: int
    attempt: int
    model_hash: bytes
    weights: np.ndarray
    epoch: int
    context: bytes


@dataclass(frozen=True, eq=False)
class EncryptedUpdate(WireMessage):
    """Client -> server (forwarded to the decryptor): the encrypted, signed update."""

    TYPE_ID: ClassVar[int] = 201
    VERSION: ClassVar[int] = 2
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("client_id", "u32"),
        ("epoch", "u32"),
        ("model_hash", "bytes"),
        ("context_digest", "bytes"),
        ("num_samples", "u64"),
        ("model_size", "u64"),
        ("ciphertexts", "bytes"),
        ("signature", "bytes"),
    )
    round: int
    attempt: int
    client_id: int
    epoch: int
    model_hash: bytes
    context_digest: bytes
    num_samples: int
    model_size: int
    ciphertexts: bytes
    signature: bytes

    def signed_payload(self) -> bytes:
        return signed_update_payload(
            round_index=self.round,
            attempt=self.attempt,
            client_id=self.client_id,
            epoch=self.epoch,
            model_hash=self.model_hash,
            context_digest=self.context_digest,
            num_samples=self.num_samples,
            model_size=self.model_size,
            ciphertexts=self.ciphertexts,
        )


def signed_update_payload(
    *,
    round_index: int,
    attempt: int,
    client_id: int,
    epoch: int,
    model_hash: bytes,
    context_digest: bytes,
    num_samples: int,
    model_size: int,
    ciphertexts: bytes,
) -> bytes:
    """What a client signs: every field but the signature, ciphertexts by SHA-256."""
    return (
        struct.pack(">IIIIQQ", round_index, attempt, client_id, epoch, num_samples, model_size)
        + struct.pack(">H", len(model_hash))
        + model_hash
        + struct.pack(">H", len(context_digest))
        + context_digest
        + hashlib.sha256(ciphertexts).digest()
    )


@dataclass(frozen=True)
class ContextRequest(WireMessage):
    """Server -> decryptor: the public context of key epoch ``epoch`` for an audience."""

    TYPE_ID: ClassVar[int] = 202
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("epoch", "u32"), ("audience", "str"))
    epoch: int
    audience: str  # "client" (public key) or "server" (plus evaluation keys)


@dataclass(frozen=True)
class ContextReply(WireMessage):
    TYPE_ID: ClassVar[int] = 203
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("epoch", "u32"),
        ("preset", "str"),
        ("audience", "str"),
        ("context", "bytes"),
    )
    epoch: int
    preset: str
    audience: str
    context: bytes


@dataclass(frozen=True, eq=False)
class SumRequest(WireMessage):
    """Server -> decryptor: release the weighted mean of these signed updates.

    ``updates`` are the clients' :class:`EncryptedUpdate` encodings, framed;
    ``aggregate_digest`` the digest of the server's sum ciphertexts
    (:func:`secfl.crypto.ckks.aggregate_digest`), which the decryptor checks against its own
    recomputation. The decryptor decrypts only its recomputation.
    """

    TYPE_ID: ClassVar[int] = 204
    VERSION: ClassVar[int] = 2
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("epoch", "u32"),
        ("updates", "bytes"),
        ("aggregate_digest", "bytes"),
    )
    round: int
    attempt: int
    epoch: int
    updates: bytes
    aggregate_digest: bytes


@dataclass(frozen=True, eq=False)
class SumRelease(WireMessage):
    """Decryptor -> server: the flooded weighted mean and what it was computed over."""

    TYPE_ID: ClassVar[int] = 205
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("contributors", "ids"),
        ("total_weight", "u64"),
        ("noise_sigma", "f64"),
        ("error_bound", "f64"),
        ("mean", "f32"),
    )
    round: int
    attempt: int
    contributors: tuple[int, ...]
    total_weight: int
    noise_sigma: float
    error_bound: float
    mean: np.ndarray


#: Trust-scalar kinds (policy (b)): at most one of each per client per round attempt.
SCALAR_KINDS = ("reference", "norm", "trusted", "dormant")


@dataclass(frozen=True, eq=False)
class ScalarRequest(WireMessage):
    """Server -> decryptor: one trust scalar of one client.

    ``kind`` ``reference``: <x, reference>; ``norm``: ||x||^2; ``trusted``: <x, y> with the
    elected trusted party's signed update ``other``; ``dormant``: sum_i m_i x_i^2 with the
    public 0/1 coordinate mask ``mask`` (one byte per coordinate, 0 or 1; empty for the
    other kinds). ``result_digest`` (:func:`secfl.crypto.ckks.scalar_digest`) is the digest of
    the encrypted scalar the server computed; the decryptor recomputes it from the signed
    update(s) and refuses a mismatch. Version 3 added ``mask`` (version 2 had no mask;
    version 1 had no digest and the decryptor computed in the clear).
    """

    TYPE_ID: ClassVar[int] = 206
    VERSION: ClassVar[int] = 3
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("kind", "str"),
        ("update", "bytes"),
        ("reference", "f32"),
        ("other", "bytes"),
        ("mask", "bytes"),
        ("result_digest", "bytes"),
    )
    round: int
    attempt: int
    kind: str
    update: bytes
    reference: np.ndarray
    other: bytes
    mask: bytes
    result_digest: bytes


@dataclass(frozen=True)
class ScalarRelease(WireMessage):
    TYPE_ID: ClassVar[int] = 207
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("client_id", "u32"),
        ("kind", "str"),
        ("value", "f64"),
        ("noise_sigma", "f64"),
    )
    round: int
    attempt: int
    client_id: int
    kind: str
    value: float
    noise_sigma: float


@dataclass(frozen=True, eq=False)
class DecryptRequest(WireMessage):
    """Anyone -> decryptor: decrypt this ciphertext. Always refused, with the trace result
    as the reason: the decryptor decrypts only what it recomputed itself."""

    TYPE_ID: ClassVar[int] = 208
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("ciphertext", "bytes"),
    )
    round: int
    attempt: int
    ciphertext: bytes


@dataclass(frozen=True)
class Refusal(WireMessage):
    """Decryptor -> requester: the request was refused, and why."""

    TYPE_ID: ClassVar[int] = 209
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("request", "str"),
        ("reason", "str"),
    )
    round: int
    attempt: int
    request: str
    reason: str
