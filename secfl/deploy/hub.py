"""The server end of the deployment: mutual-TLS gRPC, one stream per party, as a Transport.

Parties dial in (``Federation.Connect``); :class:`Hub` authenticates each stream from its
peer certificate (gRPC's auth context), never from message fields, and keeps at most one
stream per party. :meth:`Hub.exchange` is :meth:`~secfl.transport.base.Transport.exchange`:
it sends each request on its party's stream under a fresh exchange number and waits until
every reply arrived or the stage deadline passed; a party that is not connected, times out,
disconnects, or sends a reply that must be rejected yields ``None`` (a dropout, which the
protocol's own rules handle). Rejected replies (malformed, oversized, replayed, for another
round, or naming another party) are logged as ``deploy_rejected`` and never crash the server.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from secfl.audit.events import EventLog, register_event
from secfl.crypto.x509 import PartyCertificate
from secfl.deploy.framing import (
    CHUNK_BYTES,
    DEPLOY_VERSION,
    MAX_FRAME_BYTES,
    Assembler,
    ChunkHeader,
    FramingError,
    message_versions,
    payload_header,
    split_message,
)
from secfl.deploy.pki import Federation
from secfl.deploy.proto import secfl_pb2 as pb
from secfl.deploy.proto import secfl_pb2_grpc as pb_grpc
from secfl.errors import AuthenticationError, MessageError
from secfl.wire import decode_message

register_event("deploy_connected", ("role", "party", "fingerprint"))
register_event("deploy_disconnected", ("role", "party", "reason"))
register_event("deploy_refused", ("peer", "reason"))
register_event("deploy_rejected", ("role", "party", "reason"))

#: Seconds between heartbeats on an idle stream.
HEARTBEAT_S = 5.0

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(eq=False)
class _Pending:
    role: str
    party_id: int
    exchange: int
    round: int | None
    attempt: int | None
    done: threading.Event = field(default_factory=threading.Event)
    reply: bytes | None = None


@dataclass(eq=False)
class _Stream:
    party: PartyCertificate
    outbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    failure: tuple[grpc.StatusCode, str] | None = None
    closed: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, int]:
        return (self.party.role, self.party.party_id)

    def close(self, failure: tuple[grpc.StatusCode, str] | None = None) -> None:
        if failure is not None and self.failure is None:
            self.failure = failure
        if not self.closed.is_set():
            self.closed.set()
            self.outbox.put(None)


def _party_fields(message: Any) -> list[int]:
    return [
        int(getattr(message, name)) for name in ("sender", "client_id") if hasattr(message, name)
    ]


class Hub:
    """Connected parties, outstanding exchanges, and the gRPC servicer that feeds them."""

    def __init__(
        self,
        federation: Federation,
        *,
        events: EventLog,
        config_fingerprint: str,
        limits: dict[int, int],
        client_keys: Mapping[int, bytes],
        roles: tuple[str, ...] = ("client",),
    ) -> None:
        self.federation = federation
        self.events = events
        self.fingerprint = config_fingerprint
        self.limits = limits
        self.client_keys = dict(client_keys)
        self.roles = roles
        self.session = secrets.randbits(63)
        self._versions = message_versions()
        self._lock = threading.Condition()
        self._streams: dict[tuple[str, int], _Stream] = {}
        self._pending: dict[tuple[str, int], dict[int, _Pending]] = {}
        self._next_exchange = 1
        self._closing: str | None = None

    # -- the round loop's side ------------------------------------------------------------

    def connected(self, role: str) -> set[int]:
        with self._lock:
            return {pid for (r, pid) in self._streams if r == role}

    def wait_for(self, role: str, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` parties of ``role`` are connected."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(1 for (r, _) in self._streams if r == role) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def exchange(
        self, role: str, requests: Mapping[int, bytes], timeout: float
    ) -> dict[int, bytes | None]:
        """Send every request, wait at most ``timeout`` seconds, return each reply or None."""
        slots: dict[int, _Pending] = {}
        sends: list[tuple[_Stream, int, bytes]] = []
        decoded: dict[int, tuple[int | None, int | None]] = {}
        with self._lock:
            for party_id, payload in requests.items():
                stream = self._streams.get((role, party_id))
                if stream is None:
                    continue
                exchange = self._next_exchange
                self._next_exchange += 1
                if id(payload) not in decoded:  # one broadcast object is decoded once
                    request = decode_message(payload)
                    decoded[id(payload)] = (
                        getattr(request, "round", None),
                        getattr(request, "attempt", None),
                    )
                slot = _Pending(role, party_id, exchange, *decoded[id(payload)])
                self._pending.setdefault((role, party_id), {})[exchange] = slot
                slots[party_id] = slot
                sends.append((stream, exchange, payload))
        for stream, exchange, payload in sends:
            # chunked lazily by the stream's sender: a 35 MB context for 20 clients is one
            # shared bytes object here, never 20 lists of chunks
            stream.outbox.put((exchange, payload))
        deadline = time.monotonic() + timeout
        for slot in slots.values():
            slot.done.wait(max(0.0, deadline - time.monotonic()))
        replies: dict[int, bytes | None] = {}
        with self._lock:
            for party_id in requests:
                sent = slots.get(party_id)
                if sent is not None:
                    self._pending.get((role, party_id), {}).pop(sent.exchange, None)
                replies[party_id] = sent.reply if sent is not None else None
        return replies

    def call(self, role: str, party_id: int, payload: bytes, timeout: float) -> bytes | None:
        return self.exchange(role, {party_id: payload}, timeout)[party_id]

    def close_all(self, reason: str) -> None:
        """Say goodbye to every party (the run is over) and close their streams."""
        with self._lock:
            self._closing = reason
            streams = list(self._streams.values())
        for stream in streams:
            stream.outbox.put(pb.ServerFrame(goodbye=pb.Goodbye(reason=reason)))
            stream.close()

    # -- replies from the streams ---------------------------------------------------------

    def _deliver(self, stream: _Stream, exchange: int, payload: bytes) -> None:
        role, party_id = stream.key
        with self._lock:  # claim the slot: one reply per exchange, a second is a replay
            slot = self._pending.get(stream.key, {}).pop(exchange, None)
        if slot is None:  # checked at the first chunk; it may have timed out since
            self._reject(stream, f"reply to exchange {exchange} arrived after its deadline")
            return
        reason: str | None = None
        try:
            message = decode_message(payload)
        except MessageError as exc:
            reason = f"malformed reply to exchange {exchange}: {exc}"
        else:
            claimed = _party_fields(message)
            if role == "client" and any(c != party_id for c in claimed):
                reason = (
                    f"reply names client {claimed} but the certificate is client {party_id}: "
                    "a client cannot submit for another"
                )
            for name, expected in (("round", slot.round), ("attempt", slot.attempt)):
                got = getattr(message, name, None)
                if expected is not None and got is not None and int(got) != int(expected):
                    reason = f"reply for {name} {got} to a request for {name} {expected} (replayed)"
        if reason is not None:
            self._reject(stream, reason)
        else:
            slot.reply = payload
        slot.done.set()

    def _expects(self, stream: _Stream, exchange: int) -> bool:
        with self._lock:
            return exchange in self._pending.get(stream.key, {})

    def _reject(self, stream: _Stream, reason: str) -> None:
        self.events.emit(
            "deploy_rejected", role=stream.party.role, party=stream.party.party_id, reason=reason
        )

    # -- streams ----------------------------------------------------------------------------

    def _attach(self, stream: _Stream) -> None:
        with self._lock:
            old = self._streams.get(stream.key)
            self._streams[stream.key] = stream
            self._lock.notify_all()
        if old is not None:
            old.close((grpc.StatusCode.ABORTED, "replaced by a newer connection"))
        self.events.emit(
            "deploy_connected",
            role=stream.party.role,
            party=stream.party.party_id,
            fingerprint=stream.party.fingerprint,
        )

    def _detach(self, stream: _Stream, reason: str) -> None:
        with self._lock:
            if self._streams.get(stream.key) is stream:
                del self._streams[stream.key]
                for slot in self._pending.pop(stream.key, {}).values():
                    slot.done.set()  # no reply: a dropout
        self.events.emit(
            "deploy_disconnected",
            role=stream.party.role,
            party=stream.party.party_id,
            reason=reason,
        )

    def authenticate(self, context: grpc.ServicerContext) -> PartyCertificate:
        """The party a stream belongs to, from its TLS peer certificate only."""
        auth = context.auth_context()
        certs = auth.get("x509_pem_cert") or []
        if not certs:
            raise AuthenticationError("no client certificate (mutual TLS is required)")
        party = self.federation.verify(certs[0], roles=self.roles)
        if party.role == "client":
            pinned = self.client_keys.get(party.party_id)
            if pinned is None or pinned != party.identity_key:
                raise AuthenticationError(
                    f"client {party.party_id} is not in this run's registry (its certificate "
                    "is not the one the server loaded from federation/certs)"
                )
        return party

    def check_hello(self, hello: Any) -> None:
        if hello.deploy_version != DEPLOY_VERSION:
            raise AuthenticationError(
                f"deploy version {hello.deploy_version}; this server speaks {DEPLOY_VERSION}"
            )
        for type_id, version in hello.message_versions.items():
            ours = self._versions.get(int(type_id))
            if ours is not None and ours != int(version):
                raise AuthenticationError(
                    f"the party speaks message type {type_id} version {version}, the server "
                    f"version {ours}"
                )
        if hello.config_fingerprint != self.fingerprint:
            raise AuthenticationError(
                "the party's run configuration differs from the server's (fingerprint "
                f"{hello.config_fingerprint[:12]} != {self.fingerprint[:12]})"
            )

    def connect(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """``Federation.Connect``: authenticate, greet, then pump both directions."""
        try:
            party = self.authenticate(context)
        except AuthenticationError as exc:
            self.events.emit("deploy_refused", peer=context.peer(), reason=str(exc))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"refused: {exc}")
        if self._closing is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"run is over: {self._closing}")
        first = next(request_iterator, None)
        try:
            if first is None or first.WhichOneof("body") != "hello":
                raise AuthenticationError("the first frame must be a Hello")
            self.check_hello(first.hello)
        except AuthenticationError as exc:
            self.events.emit("deploy_refused", peer=context.peer(), reason=str(exc))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"refused: {exc}")
        stream = _Stream(party)
        self._attach(stream)
        reader = threading.Thread(
            target=self._read, args=(stream, request_iterator), daemon=True, name="secfl-reader"
        )
        reader.start()
        reason = "stream ended"
        try:
            yield pb.ServerFrame(
                welcome=pb.Welcome(
                    deploy_version=DEPLOY_VERSION,
                    role=party.role,
                    party_id=party.party_id,
                    session=self.session,
                    chunk_bytes=CHUNK_BYTES,
                )
            )
            while True:
                try:
                    item = stream.outbox.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    if not context.is_active():
                        break
                    yield pb.ServerFrame(
                        heartbeat=pb.Heartbeat(sent_unix_ms=int(time.time() * 1000))
                    )
                    continue
                if item is None:
                    break
                if isinstance(item, tuple):
                    yield from _request_frames(*item)
                else:
                    yield item
            if stream.failure is not None:
                reason = stream.failure[1]
                context.abort(*stream.failure)
        finally:
            stream.close()
            self._detach(stream, reason)

    def _read(self, stream: _Stream, request_iterator: Iterator[Any]) -> None:
        assembler = Assembler(self.limits, versions=self._versions)
        skipping: int | None = None
        try:
            for frame in request_iterator:
                kind = frame.WhichOneof("body")
                if kind == "heartbeat":
                    continue
                if kind != "chunk":
                    raise FramingError(f"unexpected {kind} frame after the Hello")
                c = frame.chunk
                if skipping is not None and c.exchange == skipping:
                    if c.last:
                        skipping = None
                    continue
                header = ChunkHeader(c.exchange, c.message_type, c.message_version, c.total_bytes)
                if c.index == 0:
                    assembler.check_header(header)  # oversized or unknown: close the stream
                if c.index == 0 and not self._expects(stream, c.exchange):
                    self._reject(
                        stream,
                        f"reply to exchange {c.exchange}, which is not outstanding for this "
                        "party (replayed, unsolicited or too late)",
                    )
                    if not c.last:
                        skipping = c.exchange
                    continue
                done = assembler.add(header, c.index, c.data, c.last)
                if done is not None:
                    self._deliver(stream, done[0].exchange, done[1])
        except FramingError as exc:
            self._reject(stream, str(exc))
            stream.close((grpc.StatusCode.INVALID_ARGUMENT, f"rejected: {exc}"))
            return
        except grpc.RpcError:
            pass
        except Exception as exc:  # a broken stream must never take the server down
            self._reject(stream, f"stream failed: {type(exc).__name__}: {exc}")
        stream.close()


def _request_frames(exchange: int, payload: bytes) -> Iterator[Any]:
    message_type, version = payload_header(payload)
    for index, data, last in split_message(payload):
        yield (
            pb.ServerFrame(
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
        )


class _Servicer(pb_grpc.FederationServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def Connect(  # the generated servicer's method name
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        return self.hub.connect(request_iterator, context)


def start_server(
    hub: Hub,
    *,
    listen: str,
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    max_parties: int,
) -> tuple[grpc.Server, int]:
    """Start the gRPC server with mutual TLS required; returns (server, bound port)."""
    from concurrent import futures

    # every stream holds one worker for its lifetime; leave room for reconnects
    pool = futures.ThreadPoolExecutor(max_workers=2 * max_parties + 8, thread_name_prefix="grpc")
    server = grpc.server(pool, options=GRPC_OPTIONS, maximum_concurrent_rpcs=2 * max_parties + 4)
    pb_grpc.add_FederationServicer_to_server(_Servicer(hub), server)
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise AuthenticationError(f"cannot listen on {listen!r}")
    server.start()
    return server, port


class HubTransport:
    """:class:`~secfl.transport.base.Transport` over the hub's client streams; every stage
    boundary is journalled (``deploy_stage``, fsync'd) before the requests leave."""

    def __init__(self, hub: Hub, *, timeout: float, events: EventLog) -> None:
        self.hub = hub
        self.timeout = timeout
        self.events = events

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        if not requests:
            return {}
        first = decode_message(next(iter(requests.values())))
        self.events.emit(
            "deploy_stage",
            round=int(getattr(first, "round", 0)),
            attempt=int(getattr(first, "attempt", 0)),
            stage=type(first).__name__,
            parties=sorted(requests),
        )
        self.events.sync()
        replies = self.hub.exchange("client", requests, self.timeout)
        self.events.emit(
            "deploy_stage_done",
            round=int(getattr(first, "round", 0)),
            attempt=int(getattr(first, "attempt", 0)),
            stage=type(first).__name__,
            replied=sorted(c for c, r in replies.items() if r is not None),
            # secfl payload bytes (without gRPC/TLS framing) sent and accepted at this stage
            bytes_out=sum(len(p) for p in requests.values()),
            bytes_in=sum(len(r) for r in replies.values() if r is not None),
        )
        self.events.sync()
        return replies


register_event("deploy_stage", ("round", "attempt", "stage", "parties"))
register_event(
    "deploy_stage_done", ("round", "attempt", "stage", "replied", "bytes_out", "bytes_in")
)
