"""Signed per-round receipts: the server's side (:class:`ReceiptIssuer`) and the client's
(:class:`ReceiptBook`).

After each round the server logs every participant's transcript hash (``round_transcript``)
and sends each participant a :class:`~secfl.audit.messages.ServerReceipt` signed with its
audit key: run id, round, attempt, participants, survivors, that client's transcript hash
(its commitment), the new global model's hash, the revealed aggregate's hash and the hash of
the log record of the transcripts. A client checks the signature against the server key it
received out of band, the run id, its own id, that it took part in that (round, attempt),
and that the commitment equals the hash of the bytes it itself received and sent. The next
round's broadcast must carry the receipt's model hash: a server that gives different models
to different clients is caught by every client whose broadcast disagrees with its receipt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from secfl.audit.events import EventLog, register_event
from secfl.audit.messages import RECEIPT_CONTEXT, ReceiptAck, ServerReceipt, receipt_body
from secfl.audit.transcript import (
    Transcript,
    TranscriptDigest,
    TranscriptRecorder,
    message_round,
    recorded,
)
from secfl.crypto.sign import SigningKey, verify_signature
from secfl.encode.flatten import model_hash
from secfl.errors import AuditError, MessageError, ProtocolError, SignatureError
from secfl.wire import WireMessage, decode_message

if TYPE_CHECKING:
    from secfl.server.loop import RoundOutcome

register_event("round_transcript", ("round", "attempt", "clients"))
register_event(
    "receipts_issued",
    ("round", "attempt", "model_hash", "aggregate_hash", "receipts", "accepted", "disputed"),
)

RECEIPTS_DIR = "receipts"


def receipt_digest(receipt_bytes: bytes) -> str:
    """SHA-256 (hex) of a receipt's wire bytes: how the log names a receipt."""
    return hashlib.sha256(receipt_bytes).hexdigest()


def aggregate_hash(mean_update: np.ndarray | None) -> bytes:
    """SHA-256 of the revealed mean update's float32 bytes; empty when none was revealed."""
    if mean_update is None:
        return b""
    data = np.ascontiguousarray(mean_update, dtype="<f4")
    return hashlib.sha256(b"secfl/aggregate/v1" + data.tobytes()).digest()


def verify_receipt(
    receipt: ServerReceipt,
    *,
    server_key: bytes,
    run_id: bytes,
    client_id: int,
    round_index: int | None = None,
    attempt: int | None = None,
    commitment: bytes | None = None,
) -> None:
    """Raise :class:`AuditError` naming the first check ``receipt`` fails."""
    try:
        verify_signature(server_key, receipt.signature, RECEIPT_CONTEXT, receipt_body(receipt))
    except SignatureError:
        raise AuditError(
            f"receipt for round {receipt.round} attempt {receipt.attempt}: the signature does "
            "not verify under the server's audit key"
        ) from None
    if receipt.run_id != run_id:
        raise AuditError(
            f"receipt is for run {receipt.run_id.hex()}, this client is in run {run_id.hex()}"
        )
    if receipt.client_id != client_id:
        raise AuditError(f"receipt is for client {receipt.client_id}, not client {client_id}")
    if round_index is not None and (receipt.round, receipt.attempt) != (round_index, attempt):
        raise AuditError(
            f"receipt is for round {receipt.round} attempt {receipt.attempt}, expected round "
            f"{round_index} attempt {attempt}"
        )
    if client_id not in receipt.participants:
        raise AuditError(f"receipt does not list client {client_id} among the participants")
    if commitment is not None and receipt.commitment != commitment:
        raise AuditError(
            f"receipt for round {receipt.round} attempt {receipt.attempt} commits to transcript "
            f"{receipt.commitment.hex()[:16]}..., but this client's own transcript hashes to "
            f"{commitment.hex()[:16]}...: the server recorded other bytes than were exchanged"
        )


class ReceiptIssuer:
    """Server side: after each round, log the transcripts and send signed receipts."""

    def __init__(self, *, events: EventLog, recorder: TranscriptRecorder) -> None:
        if events.signer is None:
            raise AuditError("receipts need an event log signed with the server's audit key")
        self.signer: SigningKey = events.signer
        self.events = events
        self.recorder = recorder
        self.run_id = bytes.fromhex(events.run_id)

    def issue(self, outcome: RoundOutcome, weights: np.ndarray) -> dict[int, bool]:
        """Log the round's transcripts, send each participant its receipt through the
        recorder's transport, log what was sent and who accepted; {client: accepted}.
        ``weights`` is the new global model: the one the next round broadcasts."""
        transcripts = self.recorder.take(outcome.round, outcome.attempt)
        self.events.emit(
            "round_transcript",
            round=outcome.round,
            attempt=outcome.attempt,
            clients={str(c): t.describe() for c, t in transcripts.items()},
        )
        head = bytes.fromhex(self.events.last_hash)
        new_model = model_hash(weights)
        result = outcome.aggregate
        aggregate = aggregate_hash(result.mean_update if result is not None else None)
        survivors = tuple(result.survivors) if result is not None else ()
        requests: dict[int, bytes] = {}
        for client_id in outcome.participants:
            digest = transcripts.get(client_id)
            if digest is None or digest.replies == 0:
                continue  # the client never answered: it has nothing to check a receipt with
            requests[client_id] = self._sign(
                outcome, survivors, client_id, digest, new_model, aggregate, head
            )
        replies = self.recorder.exchange(requests) if requests else {}
        accepted: list[int] = []
        unanswered: list[int] = []
        disputed: dict[str, str] = {}
        for client_id in requests:
            reply = replies.get(client_id)
            verdict = _read_ack(reply, client_id, outcome) if reply is not None else None
            if reply is None:
                unanswered.append(client_id)  # gone (dropped out): not a dispute
            elif verdict is None:
                accepted.append(client_id)
            else:
                disputed[str(client_id)] = verdict
        self.events.emit(
            "receipts_issued",
            round=outcome.round,
            attempt=outcome.attempt,
            model_hash=new_model.hex(),
            aggregate_hash=aggregate.hex(),
            receipts={str(c): receipt_digest(r) for c, r in requests.items()},
            accepted=accepted,
            disputed=disputed,
            unanswered=unanswered,
        )
        return {c: c in accepted for c in requests}

    def _sign(
        self,
        outcome: RoundOutcome,
        survivors: tuple[int, ...],
        client_id: int,
        digest: TranscriptDigest,
        new_model: bytes,
        aggregate: bytes,
        head: bytes,
    ) -> bytes:
        unsigned = ServerReceipt(
            run_id=self.run_id,
            round=outcome.round,
            attempt=outcome.attempt,
            client_id=client_id,
            participants=tuple(sorted(outcome.participants)),
            survivors=tuple(sorted(survivors)),
            commitment=digest.hash,
            model_hash=new_model,
            aggregate_hash=aggregate,
            log_head=head,
            signature=b"",
        )
        signature = self.signer.sign(RECEIPT_CONTEXT, receipt_body(unsigned))
        return dataclasses.replace(unsigned, signature=signature).to_bytes()


def _read_ack(reply: bytes, client_id: int, outcome: RoundOutcome) -> str | None:
    """None if the client accepted its receipt, else why not."""
    try:
        ack = decode_message(reply)
    except MessageError as exc:
        return f"malformed acknowledgement: {exc}"
    if not isinstance(ack, ReceiptAck):
        reason = getattr(ack, "reason", "")
        return f"expected ReceiptAck, got {type(ack).__name__}" + (f": {reason}" if reason else "")
    if (ack.round, ack.attempt, ack.client_id) != (outcome.round, outcome.attempt, client_id):
        return f"acknowledgement for round {ack.round} attempt {ack.attempt} client {ack.client_id}"
    return None if ack.accepted else f"rejected: {ack.reason}"


class ReceiptBook:
    """Client side: its own transcripts, the receipts it accepted, and the broadcast check.

    ``server_key`` (raw Ed25519 public key) and ``run_id`` reach the client out of band.
    ``sink`` (simulation) is a JSON-lines file where each receipt is appended with the
    client's verdict, so an auditor can check receipts without trusting the server's log."""

    def __init__(
        self,
        client_id: int,
        *,
        server_key: bytes,
        run_id: bytes,
        sink: Path | None = None,
    ) -> None:
        self.client_id = client_id
        self.server_key = bytes(server_key)
        self.run_id = bytes(run_id)
        self.sink = sink
        if sink is not None:
            _drop_torn_tail(sink)
        self._transcripts: dict[tuple[int, int], Transcript] = {}
        #: Accepted receipts, by round (the highest attempt wins).
        self.receipts: dict[int, ServerReceipt] = {}
        #: What the client caught: receipts it rejected and broadcasts it refused.
        self.detections: list[str] = []

    def witness(self, message: WireMessage | None, request: bytes, reply: bytes | None) -> None:
        """Add one answered exchange to the transcript of its (round, attempt)."""
        if reply is None or not recorded(message):
            return
        round_index, attempt = message_round(message)
        key = (round_index, attempt)
        if key not in self._transcripts:
            self._transcripts[key] = Transcript(self.client_id, round_index, attempt)
            for old in [k for k in self._transcripts if k[0] < round_index - 1]:
                del self._transcripts[old]
        self._transcripts[key].add(request, reply)

    def check_broadcast(self, message: WireMessage) -> None:
        """Refuse a broadcast whose model is not the one the previous round's receipt
        promised (or whose weights do not hash to the hash it carries)."""
        promised_hash = getattr(message, "model_hash", None)
        if promised_hash is None or not hasattr(message, "round") or not recorded(message):
            return
        weights = getattr(message, "weights", None)
        if isinstance(weights, np.ndarray) and model_hash(weights) != promised_hash:
            self._detect(
                f"round {message.round}: the broadcast weights do not match their model_hash"
            )
        receipt = self.receipts.get(int(message.round) - 1)
        if receipt is not None and receipt.model_hash != bytes(promised_hash):
            self._detect(
                f"round {message.round}: the broadcast carries model hash "
                f"{bytes(promised_hash).hex()[:16]}..., but the server's signed receipt for "
                f"round {receipt.round} promised {receipt.model_hash.hex()[:16]}... to this "
                "client: the server gives different models to different clients"
            )

    def _detect(self, what: str) -> None:
        self.detections.append(what)
        raise ProtocolError(f"client {self.client_id}: {what}")

    def on_receipt(self, receipt: ServerReceipt) -> ReceiptAck:
        key = (receipt.round, receipt.attempt)
        own = self._transcripts.get(key)
        try:
            if own is None:
                raise AuditError(
                    f"receipt for round {receipt.round} attempt {receipt.attempt}, in which "
                    "this client exchanged nothing with the server"
                )
            verify_receipt(
                receipt,
                server_key=self.server_key,
                run_id=self.run_id,
                client_id=self.client_id,
                commitment=own.digest(),
            )
        except AuditError as exc:
            self.detections.append(str(exc))
            self._store(receipt, accepted=False, reason=str(exc), own=own)
            return ReceiptAck(receipt.round, receipt.attempt, self.client_id, False, str(exc))
        best = self.receipts.get(receipt.round)
        if best is None or receipt.attempt >= best.attempt:
            self.receipts[receipt.round] = receipt
        self._store(receipt, accepted=True, reason="", own=own)
        return ReceiptAck(receipt.round, receipt.attempt, self.client_id, True, "")

    def _store(
        self, receipt: ServerReceipt, *, accepted: bool, reason: str, own: Transcript | None
    ) -> None:
        if self.sink is None:
            return
        line = {
            "round": receipt.round,
            "attempt": receipt.attempt,
            "accepted": accepted,
            "reason": reason,
            "included": self.client_id in receipt.survivors,
            "own_commitment": own.digest().hex() if own is not None else None,
            "receipt": receipt.to_bytes().hex(),
        }
        self.sink.parent.mkdir(parents=True, exist_ok=True)
        with self.sink.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


def _drop_torn_tail(path: Path) -> None:
    """A crash mid-append leaves a partial last line: cut it, so the next line stays whole."""
    if not path.exists():
        return
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with path.open("r+b") as f:
            f.truncate(keep)


def receipt_sink(run_dir: Path, client_id: int) -> Path:
    return run_dir / RECEIPTS_DIR / f"client-{client_id}.jsonl"
