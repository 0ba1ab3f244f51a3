"""The party end (client or decryptor): dial the server, answer its requests, reconnect.

A party opens one mutual-TLS stream to the server (outbound only, so it can sit behind a
firewall or NAT), sends its Hello, and then answers every request the server pushes with
its handler's reply bytes under the request's exchange number. When the stream breaks
(server restart, network) it reconnects with exponential backoff and jitter until
``deadline_s`` seconds have passed without a connection; a refusal (bad certificate, wrong
role, revoked, other configuration) is final. A Goodbye from the server ends the party.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from secfl.deploy.framing import (
    DEPLOY_VERSION,
    Assembler,
    ChunkHeader,
    message_versions,
    payload_header,
    split_message,
)
from secfl.deploy.hub import GRPC_OPTIONS
from secfl.deploy.pki import Credentials
from secfl.deploy.proto import secfl_pb2 as pb
from secfl.deploy.proto import secfl_pb2_grpc as pb_grpc
from secfl.errors import AuthenticationError, ProtocolError

Handler = Callable[[bytes], bytes | None]

#: Status codes with which the server refuses a party for good.
_FINAL = {
    grpc.StatusCode.PERMISSION_DENIED: "refused",
    grpc.StatusCode.UNAUTHENTICATED: "refused",
    grpc.StatusCode.FAILED_PRECONDITION: "refused",
    grpc.StatusCode.INVALID_ARGUMENT: "rejected",
}


class Goodbye(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=credentials.ca_pem,
        private_key=credentials.key_pem,
        certificate_chain=credentials.cert_pem,
    )


def hello_frame(config_fingerprint: str) -> Any:
    return pb.PartyFrame(
        hello=pb.Hello(
            deploy_version=DEPLOY_VERSION,
            message_versions=message_versions(),
            config_fingerprint=config_fingerprint,
        )
    )


def reply_frames(exchange: int, payload: bytes) -> Iterator[Any]:
    message_type, version = payload_header(payload)
    for index, data, last in split_message(payload):
        yield pb.PartyFrame(
            chunk=pb.Chunk(
                exchange=exchange,
                message_type=message_type,
                message_version=version,
                total_bytes=len(payload),
                index=index,
                data=data,
                last=last,
            )
        )


class PartyConnection:
    """One party's connection loop; :meth:`run` returns the server's goodbye reason."""

    def __init__(
        self,
        address: str,
        credentials: Credentials,
        handler: Handler,
        *,
        config_fingerprint: str,
        limits: dict[int, int],
        deadline_s: float = 120.0,
        max_backoff_s: float = 5.0,
        log: Callable[[str], None] = lambda line: None,
        stop: threading.Event | None = None,
    ) -> None:
        self.address = address
        self.credentials = credentials
        self.handler = handler
        self.fingerprint = config_fingerprint
        self.limits = limits
        self.deadline_s = deadline_s
        self.max_backoff_s = max_backoff_s
        self.log = log
        self.stop = stop or threading.Event()
        self.sessions: list[int] = []

    def run(self) -> str:
        backoff = 0.2
        last_contact = time.monotonic()
        while not self.stop.is_set():
            try:
                self._session()
                last_contact = time.monotonic()
                backoff = 0.2
                self.log("stream ended; reconnecting")
            except Goodbye as bye:
                return bye.reason
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code in _FINAL:
                    raise AuthenticationError(
                        f"server {_FINAL[code]} this party: {details}"
                    ) from None
                self.log(f"connection failed ({code}): {details}")
            if time.monotonic() - last_contact > self.deadline_s:
                raise ProtocolError(
                    f"no connection to {self.address} for {self.deadline_s:.0f} s; giving up"
                )
            # jitter spreads reconnects of many parties after a server restart
            time.sleep(backoff * (0.5 + random.random()))
            backoff = min(2 * backoff, self.max_backoff_s)
        return "stopped"

    def _session(self) -> None:
        outbox: queue.Queue[Any] = queue.Queue()
        outbox.put(hello_frame(self.fingerprint))

        def frames() -> Iterator[Any]:
            while True:
                item = outbox.get()
                if item is None:
                    return
                yield item

        channel = grpc.secure_channel(
            self.address, channel_credentials(self.credentials), options=GRPC_OPTIONS
        )
        try:
            stub = pb_grpc.FederationStub(channel)
            responses = stub.Connect(frames())
            welcome = next(responses)
            if welcome.WhichOneof("body") != "welcome":
                raise ProtocolError("the server's first frame was not a Welcome")
            self.sessions.append(int(welcome.welcome.session))
            self.log(
                f"connected as {welcome.welcome.role}-{welcome.welcome.party_id} "
                f"(session {welcome.welcome.session:x})"
            )
            assembler = Assembler(self.limits)
            for frame in responses:
                kind = frame.WhichOneof("body")
                if kind == "goodbye":
                    raise Goodbye(frame.goodbye.reason)
                if kind != "chunk":
                    continue
                c = frame.chunk
                header = ChunkHeader(c.exchange, c.message_type, c.message_version, c.total_bytes)
                done = assembler.add(header, c.index, c.data, c.last)
                if done is None:
                    continue
                reply = self.handler(done[1])
                if reply is not None:
                    for out in reply_frames(done[0].exchange, reply):
                        outbox.put(out)
        finally:
            outbox.put(None)
            channel.close()
