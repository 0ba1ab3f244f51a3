"""SecAgg wire messages (type ids 100-199), one request and one reply per stage.

Byte layouts follow :mod:`secfl.wire` (big-endian scalars, u32-length-prefixed bytes and id
lists, u64-count-prefixed little-endian arrays); ``protocols/secagg.md`` lists every field.
Requests carry ``DROPOUT_STAGE`` so the simulated-dropout transport knows the stage.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from secfl.crypto.aead import TAG_BYTES
from secfl.crypto.shamir import chunks_for
from secfl.wire import WireMessage

Fields = tuple[tuple[str, str], ...]

#: Field elements per shared secret (32-byte seed or private key).
SHARE_ELEMENTS = chunks_for(32)
#: Plaintext of one encrypted share: sender u32, receiver u32, b-share, s-share (u32 each).
SHARE_PLAINTEXT = struct.Struct(f">II{SHARE_ELEMENTS}I{SHARE_ELEMENTS}I")
SHARE_CIPHERTEXT_BYTES = SHARE_PLAINTEXT.size + TAG_BYTES

#: The alignment padding of :class:`MaskedInputRes` (see there).
MASKED_PAD = b"\x00"

STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")


@dataclass(frozen=True, eq=False)
class AdvertiseKeysIns(WireMessage):
    """Server -> every participant: start round/attempt; the broadcast model rides along."""

    TYPE_ID: ClassVar[int] = 101
    VERSION: ClassVar[int] = 1
    DROPOUT_STAGE: ClassVar[str] = "advertise_keys"
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("participants", "ids"),
        ("model_hash", "bytes"),
        ("weights", "f32"),
    )
    round: int
    attempt: int
    participants: tuple[int, ...]
    model_hash: bytes
    weights: np.ndarray


@dataclass(frozen=True, eq=False)
class AdvertiseKeysRes(WireMessage):
    """Client -> server: the two X25519 public keys, signed with the identity key."""

    TYPE_ID: ClassVar[int] = 102
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("sender", "u32"),
        ("c_pk", "bytes"),
        ("s_pk", "bytes"),
        ("signature", "bytes"),
    )
    round: int
    attempt: int
    sender: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes


@dataclass(frozen=True, eq=False)
class ShareKeysIns(WireMessage):
    """Server -> U1 (same bytes for all): every advertised key set, concatenated in id order."""

    TYPE_ID: ClassVar[int] = 103
    VERSION: ClassVar[int] = 1
    DROPOUT_STAGE: ClassVar[str] = "share_keys"
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("ids", "ids"),
        ("c_pks", "bytes"),
        ("s_pks", "bytes"),
        ("signatures", "bytes"),
    )
    round: int
    attempt: int
    ids: tuple[int, ...]
    c_pks: bytes
    s_pks: bytes
    signatures: bytes


@dataclass(frozen=True, eq=False)
class ShareKeysRes(WireMessage):
    """Client -> server: one AES-GCM ciphertext of its shares per neighbour (id order)."""

    TYPE_ID: ClassVar[int] = 104
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("sender", "u32"),
        ("recipients", "ids"),
        ("ciphertexts", "bytes"),
    )
    round: int
    attempt: int
    sender: int
    recipients: tuple[int, ...]
    ciphertexts: bytes


@dataclass(frozen=True, eq=False)
class MaskedInputIns(WireMessage):
    """Server -> U2 member v: the ciphertexts addressed to v from U2 (sender id order)."""

    TYPE_ID: ClassVar[int] = 105
    VERSION: ClassVar[int] = 1
    DROPOUT_STAGE: ClassVar[str] = "masked_input"
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("senders", "ids"),
        ("ciphertexts", "bytes"),
    )
    round: int
    attempt: int
    senders: tuple[int, ...]
    ciphertexts: bytes


@dataclass(frozen=True, eq=False)
class MaskedInputRes(WireMessage):
    """Client -> server: the masked, encoded update (d + 1 words mod 2^b); exactly one of
    ``masked32`` (b <= 32) and ``masked64`` (b > 32) is non-empty.

    ``pad`` is exactly :data:`MASKED_PAD` (one zero byte, 5 bytes with its length): it puts
    the ``masked32`` words at byte 32 of the message (and ``masked64`` at byte 40), so in a
    16-byte aligned receive buffer the server's zero-copy views are word aligned (NumPy adds
    unaligned words through a slower buffered loop: ~15% on the unmask sum)."""

    TYPE_ID: ClassVar[int] = 106
    VERSION: ClassVar[int] = 2
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("sender", "u32"),
        ("pad", "bytes"),
        ("masked32", "u32s"),
        ("masked64", "u64s"),
    )
    round: int
    attempt: int
    sender: int
    masked32: np.ndarray
    masked64: np.ndarray
    pad: bytes = b"\x00"


@dataclass(frozen=True, eq=False)
class ConsistencyCheckIns(WireMessage):
    """Server -> U3: the survivor set U3 whose inputs are in the sum."""

    TYPE_ID: ClassVar[int] = 107
    VERSION: ClassVar[int] = 1
    DROPOUT_STAGE: ClassVar[str] = "consistency_check"
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("survivors", "ids"),
    )
    round: int
    attempt: int
    survivors: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ConsistencyCheckRes(WireMessage):
    """Client -> server: signature over (round, attempt, model_hash, U3)."""

    TYPE_ID: ClassVar[int] = 108
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("sender", "u32"),
        ("signature", "bytes"),
    )
    round: int
    attempt: int
    sender: int
    signature: bytes


@dataclass(frozen=True, eq=False)
class UnmaskIns(WireMessage):
    """Server -> U4 (same bytes for all): the consistency signatures of U4 (id order)."""

    TYPE_ID: ClassVar[int] = 109
    VERSION: ClassVar[int] = 1
    DROPOUT_STAGE: ClassVar[str] = "unmask"
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("signers", "ids"),
        ("signatures", "bytes"),
    )
    round: int
    attempt: int
    signers: tuple[int, ...]
    signatures: bytes


@dataclass(frozen=True, eq=False)
class UnmaskRes(WireMessage):
    """Client -> server: self-mask seed shares of survivors, key shares of the dropped."""

    TYPE_ID: ClassVar[int] = 110
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("sender", "u32"),
        ("b_owners", "ids"),
        ("b_shares", "u32s"),
        ("s_owners", "ids"),
        ("s_shares", "u32s"),
    )
    round: int
    attempt: int
    sender: int
    b_owners: tuple[int, ...]
    b_shares: np.ndarray
    s_owners: tuple[int, ...]
    s_shares: np.ndarray


REQUEST_STAGE: dict[type[WireMessage], str] = {
    AdvertiseKeysIns: "advertise_keys",
    ShareKeysIns: "share_keys",
    MaskedInputIns: "masked_input",
    ConsistencyCheckIns: "consistency_check",
    UnmaskIns: "unmask",
}
REPLY_FOR_STAGE: dict[str, type[WireMessage]] = {
    "advertise_keys": AdvertiseKeysRes,
    "share_keys": ShareKeysRes,
    "masked_input": MaskedInputRes,
    "consistency_check": ConsistencyCheckRes,
    "unmask": UnmaskRes,
}


def advertise_signed_bytes(
    round_index: int, attempt: int, sender: int, c_pk: bytes, s_pk: bytes, params_digest: bytes
) -> bytes:
    """What a client signs at advertise_keys (context ``secfl/secagg/v1/advertise``)."""
    return struct.pack(">III", round_index, attempt, sender) + c_pk + s_pk + params_digest


def consistency_signed_bytes(
    round_index: int, attempt: int, sender: int, model_hash: bytes, survivors: tuple[int, ...]
) -> bytes:
    """What a client signs at consistency_check (context ``secfl/secagg/v1/consistency``)."""
    return (
        struct.pack(">IIII", round_index, attempt, sender, len(model_hash))
        + model_hash
        + struct.pack(f">I{len(survivors)}I", len(survivors), *survivors)
    )


def share_associated_data(round_index: int, attempt: int, sender: int, receiver: int) -> bytes:
    """AES-GCM associated data of one encrypted share."""
    return b"secfl/secagg/v1/share" + struct.pack(">IIII", round_index, attempt, sender, receiver)


ADVERTISE_CONTEXT = b"secfl/secagg/v1/advertise"
CONSISTENCY_CONTEXT = b"secfl/secagg/v1/consistency"
