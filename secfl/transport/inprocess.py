"""In-process transport: every party lives in this process, messages still cross as bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from secfl.errors import ProtocolError

Handler = Callable[[bytes], bytes | None]


class InProcessTransport:
    """Calls each client's byte handler in turn; a handler returning ``None`` dropped out."""

    def __init__(self, handlers: Mapping[int, Handler]) -> None:
        self._handlers = dict(handlers)

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._handlers)

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies: dict[int, bytes | None] = {}
        for client_id, payload in requests.items():
            handler = self._handlers.get(client_id)
            if handler is None:
                raise ProtocolError(f"no client with id {client_id} is connected")
            replies[client_id] = handler(bytes(payload))
        return replies
