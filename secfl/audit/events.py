"""The append-only, hash-chained, signed event log (``events.jsonl``).

One JSON object per line: ``{"seq", "time", "event", ...fields, "prev", "hash", "sig"}`` in
the canonical encoding of :mod:`secfl.audit.chain` (``protocols/audit_log.md``). Each record
names the previous record's hash and is signed by the server's audit key (Ed25519), so an
auditor holding the server's public key detects any altered, removed, reordered or re-signed
record (``secfl audit``). Record 0 carries the ``genesis`` binding: format, a fresh run id,
the configuration fingerprint and the fingerprint of the signing key. ``events.head.json``
beside the log names the last record's seq and hash, so removing the tail is detected too.

Event types are registered with their required fields, so a typo in a producer fails loudly
instead of writing an event no consumer recognises.

A run killed mid-write can leave a torn last line; reopening the log truncates it, continues
the chain from the last whole record and records a (chained, signed) ``log_repaired`` event.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from secfl.audit.chain import (
    CHAIN_FIELDS,
    FORMAT,
    GENESIS_PREV,
    RESERVED_FIELDS,
    canonical_bytes,
    key_fingerprint,
    seal,
)
from secfl.crypto.sign import SigningKey
from secfl.errors import AuditError, SecflError

Clock = Callable[[], float]

_EVENT_TYPES: dict[str, frozenset[str]] = {}


def register_event(event: str, required: Iterable[str] = ()) -> None:
    """Declare an event type and the fields every instance must carry."""
    fields = frozenset(required)
    known = _EVENT_TYPES.get(event)
    if known is not None and known != fields:
        raise SecflError(f"event type {event!r} is already registered with fields {sorted(known)}")
    _EVENT_TYPES[event] = fields


def registered_events() -> dict[str, frozenset[str]]:
    return dict(_EVENT_TYPES)


for _name, _fields in {
    "run_started": ("config_fingerprint", "randomness", "secure", "protection"),
    "insecure_randomness": ("mode", "reason"),
    "run_resumed": ("from_round",),
    "log_repaired": ("dropped_bytes",),
    "round_started": ("round", "attempt", "participants"),
    "client_dropped": ("round", "attempt", "client", "stage", "reason"),
    "update_rejected": ("round", "attempt", "client", "reason"),
    "round_skipped": ("round", "attempt", "reason"),
    "round_completed": ("round", "attempt", "survivors", "accuracy", "loss"),
    "checkpoint_written": ("round", "sha256"),
    "run_finished": ("rounds", "accuracy", "loss"),
    "warning": ("message",),
}.items():
    register_event(_name, _fields)


class EventLog:
    """Appends typed events to ``path``; each line is flushed, ``sync`` fsyncs.

    With a ``signer`` (the server's audit key, never derived from the run's seed) every
    record is signed; without one the records are hash-chained only and ``secfl audit``
    reports them as unsigned. ``run_id`` and ``config_fingerprint`` bind a new log to its
    run (a fresh random run id when not given); reopening an existing log keeps its run id
    and refuses a signer other than the one named in its genesis record.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Clock = time.time,
        signer: SigningKey | None = None,
        run_id: str | None = None,
        config_fingerprint: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.head_path = head_path(self.path)
        self._clock = clock
        self._signer = signer
        key = key_fingerprint(signer.public_bytes()) if signer is not None else None
        self._genesis: dict[str, Any] = {
            "format": FORMAT,
            "run_id": run_id if run_id is not None else secrets.token_hex(16),
            "config_fingerprint": config_fingerprint,
            "server_key": key,
        }
        self._seq, self._prev, repaired, genesis = self._recover()
        if genesis is not None:
            known = genesis.get("server_key")
            if signer is not None and known is not None and known != key:
                raise AuditError(
                    f"{self.path} is signed by the audit key with fingerprint {known}; "
                    f"this server's key has fingerprint {key}: point security.audit_key at "
                    "the key the run started with"
                )
            self._genesis = dict(genesis)
        self._file = self.path.open("a", encoding="utf-8")
        if repaired:
            self.emit("log_repaired", dropped_bytes=repaired)

    @property
    def signer(self) -> SigningKey | None:
        """The key signing this log (the server's audit key), or None."""
        return self._signer

    @property
    def run_id(self) -> str:
        """The run id this log is bound to (from its genesis record)."""
        return str(self._genesis.get("run_id"))

    @property
    def last_hash(self) -> str:
        """The hash of the last record written (64 zeros before the first)."""
        return self._prev

    def _recover(self) -> tuple[int, str, int, dict[str, Any] | None]:
        """(number of whole records, hash of the last, bytes of a torn tail removed,
        genesis binding of record 0)."""
        if not self.path.exists():
            return 0, GENESIS_PREV, 0, None
        raw = self.path.read_bytes()
        keep = raw.rfind(b"\n") + 1
        torn = len(raw) - keep
        if torn:
            with self.path.open("r+b") as f:
                f.truncate(keep)
        lines = raw[:keep].splitlines()
        if not lines:
            return 0, GENESIS_PREV, torn, None
        genesis = _parse(lines[0]).get("genesis")
        last = _parse(lines[-1]).get("hash")
        if not (isinstance(last, str) and len(last) == 64):
            last = hashlib.sha256(lines[-1]).hexdigest()
        return len(lines), last, torn, genesis if isinstance(genesis, dict) else None

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        required = _EVENT_TYPES.get(event)
        if required is None:
            raise SecflError(f"unknown event type {event!r}; register it with register_event")
        missing = required - fields.keys()
        if missing:
            raise SecflError(f"event {event!r} is missing fields {sorted(missing)}")
        clash = RESERVED_FIELDS & fields.keys()
        if clash:
            raise SecflError(
                f"event {event!r} uses reserved field names {sorted(clash)}; "
                f"reserved: {sorted(RESERVED_FIELDS)}"
            )
        record: dict[str, Any] = {"seq": self._seq, "time": self._clock(), "event": event}
        record.update(fields)
        if self._seq == 0:
            record["genesis"] = self._genesis
        record["prev"] = self._prev
        sealed = seal(record, self._signer)
        self._file.write(canonical_bytes(sealed).decode("ascii") + "\n")
        self._file.flush()
        self._seq += 1
        self._prev = sealed["hash"]
        _write_head(self.head_path, sealed["seq"], sealed["hash"])
        return _strip(sealed)

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


def head_path(path: str | Path) -> Path:
    """``events.head.json`` beside ``events.jsonl``: the last record's seq and hash."""
    log = Path(path)
    return log.with_name(f"{log.stem}.head.json")


def _write_head(path: Path, seq: int, digest: str) -> None:
    # a writer-unique temporary name: two writers of one head (threads, or two processes
    # that share a state directory) must never move each other's file away
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps({"seq": seq, "hash": digest}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _parse(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in CHAIN_FIELDS}


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every whole record of an event log, without the chain's fields (``prev``, ``hash``,
    ``sig``, ``genesis``); :mod:`secfl.audit.verify` reads and checks whole records."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [_strip(json.loads(line)) for line in lines if line.strip()]
