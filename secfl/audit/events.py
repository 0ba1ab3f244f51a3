"""The append-only typed event log (``events.jsonl``).

One JSON object per line: ``{"seq", "time", "event", ...fields}``. Event types are
registered with their required fields, so a typo in a producer fails loudly instead of
writing an event no consumer recognises. Later features register their own types (DP events,
trust decisions, protocol transcripts) and the log becomes hash-chained and signed.

A run killed mid-write can leave a torn last line; reopening the log truncates it and records
a ``log_repaired`` event, so the file is always a sequence of whole records.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from secfl.errors import SecflError

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
    """Appends typed events to ``path``; each line is flushed, ``sync`` fsyncs."""

    def __init__(self, path: str | Path, *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._seq, repaired = self._recover()
        self._file = self.path.open("a", encoding="utf-8")
        if repaired:
            self.emit("log_repaired", dropped_bytes=repaired)

    def _recover(self) -> tuple[int, int]:
        """(number of whole records, bytes of a torn tail removed)."""
        if not self.path.exists():
            return 0, 0
        raw = self.path.read_bytes()
        keep = raw.rfind(b"\n") + 1
        torn = len(raw) - keep
        if torn:
            with self.path.open("r+b") as f:
                f.truncate(keep)
        return raw[:keep].count(b"\n"), torn

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        required = _EVENT_TYPES.get(event)
        if required is None:
            raise SecflError(f"unknown event type {event!r}; register it with register_event")
        missing = required - fields.keys()
        if missing:
            raise SecflError(f"event {event!r} is missing fields {sorted(missing)}")
        record = {"seq": self._seq, "time": self._clock(), "event": event, **fields}
        self._file.write(json.dumps(record, sort_keys=False, default=_jsonable) + "\n")
        self._file.flush()
        self._seq += 1
        return record

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot log a value of type {type(value).__name__}")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every whole record of an event log."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
