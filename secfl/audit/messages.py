"""Audit wire messages (type ids 800-809): the server's signed per-round receipt and the
client's acknowledgement. Layouts follow :mod:`secfl.wire`; ``protocols/audit_log.md``
lists every field and what the signature covers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from secfl.wire import WireMessage

Fields = tuple[tuple[str, str], ...]

#: Signature context of a receipt (see :func:`receipt_body`).
RECEIPT_CONTEXT = b"secfl/audit/receipt/v1"


@dataclass(frozen=True)
class ServerReceipt(WireMessage):
    """Server -> each participant after a round: what the server committed to.

    ``commitment`` is the client's transcript hash for (round, attempt) as the server
    recorded it; ``model_hash`` the new global model every participant's next broadcast
    must carry; ``aggregate_hash`` the hash of the revealed mean update (empty when nothing
    was revealed); ``log_head`` the hash of the audit-log record listing the round's
    transcripts, so a receipt anchors the log. ``signature`` is Ed25519 over
    :func:`receipt_body` under the server's audit key."""

    TYPE_ID: ClassVar[int] = 800
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[Fields] = (
        ("run_id", "bytes"),
        ("round", "u32"),
        ("attempt", "u32"),
        ("client_id", "u32"),
        ("participants", "ids"),
        ("survivors", "ids"),
        ("commitment", "bytes"),
        ("model_hash", "bytes"),
        ("aggregate_hash", "bytes"),
        ("log_head", "bytes"),
        ("signature", "bytes"),
    )
    run_id: bytes
    round: int
    attempt: int
    client_id: int
    participants: tuple[int, ...]
    survivors: tuple[int, ...]
    commitment: bytes
    model_hash: bytes
    aggregate_hash: bytes
    log_head: bytes
    signature: bytes


def receipt_body(receipt: ServerReceipt) -> bytes:
    """The bytes a receipt's signature covers: its encoding with an empty signature."""
    return dataclasses.replace(receipt, signature=b"").to_bytes()


@dataclass(frozen=True)
class ReceiptAck(WireMessage):
    """Client -> server: whether the client accepted its receipt, and if not why."""

    TYPE_ID: ClassVar[int] = 801
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[Fields] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("client_id", "u32"),
        ("accepted", "bool"),
        ("reason", "str"),
    )
    round: int
    attempt: int
    client_id: int
    accepted: bool
    reason: str
