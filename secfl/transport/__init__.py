"""Transports move bytes between roles: in-process now; gRPC with mTLS and Ray later."""

from secfl.transport.base import Transport
from secfl.transport.inprocess import InProcessTransport

__all__ = ["InProcessTransport", "Transport"]
