"""The transport interface: the server reaches clients only through this, as bytes.

Protocol cores are sans-I/O: they produce request bytes per recipient and consume the
replies. A transport only moves bytes; ``None`` for a recipient means no reply (dropped,
timed out, unreachable), which the protocol treats as a dropout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Transport(Protocol):
    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        """Deliver each request to its client and return every client's reply (or None)."""
        ...
