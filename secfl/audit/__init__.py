"""Audit trail: the typed event log (hash chain and signatures come later)."""

from secfl.audit.events import EventLog, read_events, register_event

__all__ = ["EventLog", "read_events", "register_event"]
