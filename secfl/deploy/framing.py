"""Chunked transfer of secfl messages over the deployment stream, with per-type size limits.

A secfl message (its own ``secfl/wire.py`` bytes) crosses the gRPC stream as a sequence of
``Chunk`` frames of at most :data:`CHUNK_BYTES` data each, so a 35 MB CKKS context never
has to fit one gRPC message. The receiver (:class:`Assembler`) checks, before it keeps a
single byte, that the message type is one this build speaks, at the version it speaks, and
that the announced size is within that type's limit (:func:`message_limits`); then that the
chunks arrive in order, add up to the announced size, and that the payload's own header
agrees with the chunk header. Any violation raises :class:`FramingError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from secfl.errors import MessageError
from secfl.wire import _REGISTRY, MAGIC

#: Version of ``protocols/secfl.proto``'s framing; a Hello with another version is refused.
DEPLOY_VERSION = 1
#: Largest ``Chunk.data``; gRPC messages stay far below its 4 MiB default.
CHUNK_BYTES = 1 << 20
#: gRPC's per-frame receive limit: one chunk plus headers.
MAX_FRAME_BYTES = CHUNK_BYTES + (64 << 10)

_HEADER = struct.Struct(">4sHB")
_MIB = 1 << 20

# Per-type limits: base bytes + bytes per model parameter + bytes per client in the round.
# Small control messages grow with the cohort (key lists, shares, signatures); vectors with
# the model; CKKS ciphertexts at most 2 polynomials x 16 primes x 8 bytes per slot pair =
# 512 bytes per parameter; public contexts (18-35 MB with Galois keys) have their own class.
_CONTROL = (4 * _MIB, 0, 4096)
_VECTOR = (1 * _MIB, 16, 0)
_CONTEXT = (64 * _MIB, 4, 0)
_CIPHER = (1 * _MIB, 512, 0)
_LIMIT_CLASSES: dict[int, tuple[int, int, int]] = {
    1: _VECTOR,  # FitIns
    2: _VECTOR,  # FitRes
    3: _CONTROL,  # ClientFailure
    101: _VECTOR,  # AdvertiseKeysIns (carries the model)
    102: _CONTROL,  # AdvertiseKeysRes
    103: _CONTROL,  # ShareKeysIns
    104: _CONTROL,  # ShareKeysRes
    105: _CONTROL,  # MaskedInputIns
    106: _VECTOR,  # MaskedInputRes
    107: _CONTROL,  # ConsistencyCheckIns
    108: _CONTROL,  # ConsistencyCheckRes
    109: _CONTROL,  # UnmaskIns
    110: _CONTROL,  # UnmaskRes
    200: _CONTEXT,  # CkksFitIns (public context + model)
    201: _CIPHER,  # EncryptedUpdate
    202: _CONTROL,  # ContextRequest
    203: _CONTEXT,  # ContextReply
    205: (2 * _MIB, 1040, 0),  # ScalarRequest: two updates and a reference vector
    206: _VECTOR,  # SumRelease
    207: _CONTROL,  # ScalarRelease
    208: _CIPHER,  # DecryptRequest
    209: _CONTROL,  # Refusal
}


class FramingError(MessageError):
    """A chunk sequence that must be rejected (oversized, out of order, mislabelled)."""


def message_versions() -> dict[int, int]:
    """Every secfl wire message this build speaks: type id -> version."""
    return {type_id: cls.VERSION for type_id, cls in sorted(_REGISTRY.items())}


def message_limits(*, model_size: int, num_clients: int) -> dict[int, int]:
    """The largest accepted size in bytes of each message type for a run with a model of
    ``model_size`` parameters and ``num_clients`` clients."""
    limits = {
        type_id: base + per_param * model_size + per_client * num_clients
        for type_id, (base, per_param, per_client) in _LIMIT_CLASSES.items()
    }
    # SumRequest (server -> decryptor) carries every accepted EncryptedUpdate of the round
    limits[204] = _CONTROL[0] + num_clients * limits[201]
    return limits


def payload_header(payload: bytes) -> tuple[int, int]:
    """(type id, version) of a secfl message; FramingError if it has no valid header."""
    if len(payload) < _HEADER.size:
        raise FramingError(f"payload of {len(payload)} bytes has no secfl header")
    magic, type_id, version = _HEADER.unpack_from(payload, 0)
    if magic != MAGIC:
        raise FramingError(f"payload has bad magic {bytes(magic)!r}")
    return int(type_id), int(version)


@dataclass(frozen=True)
class ChunkHeader:
    exchange: int
    message_type: int
    message_version: int
    total_bytes: int


def split_message(
    payload: bytes, *, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[int, bytes, bool]]:
    """(index, data, last) pieces of ``payload``; an empty payload is one empty chunk."""
    view = memoryview(payload)
    count = max(1, -(-len(view) // chunk_bytes))
    for index in range(count):
        piece = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        yield index, bytes(piece), index == count - 1


class Assembler:
    """Reassembles one sender's chunk sequences; one message at a time per stream."""

    def __init__(self, limits: dict[int, int], *, versions: dict[int, int] | None = None) -> None:
        self._limits = limits
        self._versions = versions if versions is not None else message_versions()
        self._header: ChunkHeader | None = None
        self._parts: list[bytes] = []
        self._received = 0

    def add(
        self,
        header: ChunkHeader,
        index: int,
        data: bytes,
        last: bool,
    ) -> tuple[ChunkHeader, bytes] | None:
        """Feed one chunk; returns (header, payload) when a message is complete."""
        if index == 0:
            if self._header is not None:
                raise FramingError(
                    f"a new message started (exchange {header.exchange}) before exchange "
                    f"{self._header.exchange} was complete"
                )
            self.check_header(header)
            self._header = header
            self._parts = []
            self._received = 0
        elif self._header is None or header != self._header or index != len(self._parts):
            raise FramingError(
                f"chunk {index} of exchange {header.exchange} is out of order or mislabelled"
            )
        self._received += len(data)
        if self._received > header.total_bytes:
            raise FramingError(
                f"exchange {header.exchange}: {self._received} bytes received, more than the "
                f"announced {header.total_bytes}"
            )
        self._parts.append(data)
        if not last:
            return None
        self._header = None
        if self._received != header.total_bytes:
            raise FramingError(
                f"exchange {header.exchange}: {self._received} bytes received, "
                f"{header.total_bytes} announced"
            )
        payload = b"".join(self._parts)
        self._parts = []
        if payload_header(payload) != (header.message_type, header.message_version):
            raise FramingError(
                f"exchange {header.exchange}: chunk header says type {header.message_type} "
                f"v{header.message_version}, the payload's own header disagrees"
            )
        return header, payload

    def check_header(self, header: ChunkHeader) -> None:
        """Type, version and announced size; FramingError before any byte is kept."""
        version = self._versions.get(header.message_type)
        if version is None or header.message_type not in self._limits:
            raise FramingError(f"message type {header.message_type} is not accepted here")
        if header.message_version != version:
            raise FramingError(
                f"message type {header.message_type} version {header.message_version}; this "
                f"build speaks version {version}"
            )
        limit = self._limits[header.message_type]
        if header.total_bytes > limit:
            raise FramingError(
                f"message type {header.message_type} of {header.total_bytes} bytes exceeds "
                f"its limit of {limit} bytes"
            )
