"""Protocol transcripts: a running hash, per round, attempt and client, of the bytes
exchanged between the server and that client.

Both ends compute the same :class:`Transcript`: the server through
:class:`TranscriptRecorder` (a wrapper around its transport), the client inside
:class:`~secfl.client.app.ClientApp`. An exchange counts when the client answered (a request
that never arrived, or that the client did not answer, leaves no trace on the client, so
neither end hashes it; the server's event counts such requests separately). Receipts and
their acknowledgements are not part of the transcript they commit to.

Hash (``protocols/audit_log.md``): ``T_0 = SHA-256("secfl/transcript/v1" || u32 client ||
u32 round || u32 attempt)``, ``T_i = SHA-256(T_{i-1} || SHA-256(request_i) ||
SHA-256(reply_i))``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from secfl.audit.messages import ReceiptAck, ServerReceipt
from secfl.errors import MessageError
from secfl.transport.base import Transport
from secfl.wire import WireMessage, decode_message

TRANSCRIPT_DOMAIN = b"secfl/transcript/v1"
#: Messages outside every transcript (they are about the transcript).
UNRECORDED: tuple[type[WireMessage], ...] = (ServerReceipt, ReceiptAck)


class Transcript:
    """The running transcript hash of one client in one (round, attempt)."""

    __slots__ = ("_state", "exchanges")

    def __init__(self, client_id: int, round_index: int, attempt: int) -> None:
        self._state = hashlib.sha256(
            TRANSCRIPT_DOMAIN + struct.pack(">III", client_id, round_index, attempt)
        ).digest()
        self.exchanges = 0

    def add(self, request: bytes, reply: bytes) -> None:
        self._state = hashlib.sha256(
            self._state + hashlib.sha256(request).digest() + hashlib.sha256(reply).digest()
        ).digest()
        self.exchanges += 1

    def digest(self) -> bytes:
        return self._state


def message_round(message: WireMessage | None) -> tuple[int, int]:
    """(round, attempt) a message belongs to; (0, 0) for messages without them."""
    return int(getattr(message, "round", 0)), int(getattr(message, "attempt", 0))


def recorded(message: WireMessage | None) -> bool:
    return not isinstance(message, UNRECORDED)


@dataclass(frozen=True)
class TranscriptDigest:
    """One client's transcript of one round as the server saw it."""

    hash: bytes
    #: Requests sent to the client (delivered or not).
    requests: int
    #: Requests the client answered: those in ``hash``.
    replies: int

    def describe(self) -> dict[str, object]:
        return {"hash": self.hash.hex(), "requests": self.requests, "replies": self.replies}


class TranscriptRecorder:
    """Wraps the server's transport and hashes every request and reply per round and client.

    It is the outermost wrapper, so it sees exactly the bytes the server sent and received."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self._open: dict[tuple[int, int], dict[int, tuple[Transcript, list[int]]]] = {}

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies = self.inner.exchange(requests)
        for client_id, request in requests.items():
            try:
                message: WireMessage | None = decode_message(request)
            except MessageError:
                message = None
            if not recorded(message):
                continue
            round_index, attempt = message_round(message)
            per_client = self._open.setdefault((round_index, attempt), {})
            if client_id not in per_client:
                per_client[client_id] = (Transcript(client_id, round_index, attempt), [0])
            transcript, sent = per_client[client_id]
            sent[0] += 1
            reply = replies.get(client_id)
            if reply is not None:
                transcript.add(bytes(request), bytes(reply))
        return replies

    def take(self, round_index: int, attempt: int) -> dict[int, TranscriptDigest]:
        """The round's transcripts (forgotten here afterwards), by client id."""
        per_client = self._open.pop((round_index, attempt), {})
        # transcripts of earlier rounds that were never taken (a crashed attempt) go too
        for key in [k for k in self._open if k < (round_index, attempt)]:
            del self._open[key]
        return {
            client_id: TranscriptDigest(t.digest(), sent[0], t.exchanges)
            for client_id, (t, sent) in sorted(per_client.items())
        }
