"""Audit trail: the hash-chained, signed event log, transcripts, receipts, verification."""

from secfl.audit.events import EventLog, read_events, register_event

__all__ = ["EventLog", "read_events", "register_event"]
