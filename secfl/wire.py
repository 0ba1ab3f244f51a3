"""Frozen, versioned protocol messages with an explicit byte encoding.

A message class is a frozen dataclass that subclasses :class:`WireMessage` and declares
``TYPE_ID`` (unique u16), ``VERSION`` (u8) and ``FIELDS``: an ordered tuple of
``(name, kind)``. The encoding is::

    MAGIC "SFL1" | u16 type id | u8 version | fields in order

with every field big-endian and every variable-length field length-prefixed (u32, or u64 for
arrays). Decoding checks magic, type id, version, each length and that no byte is left over;
any violation raises :class:`~secfl.errors.MessageError` naming the message and field.

Field kinds: ``u8 u16 u32 u64 i64 f64 bool bytes str f32 u32s u64s ids``
(``f32``/``u32s``/``u64s`` are 1-D NumPy arrays; ``ids`` a tuple of u32).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import numpy as np

from secfl.errors import MessageError

MAGIC = b"SFL1"
_HEADER = struct.Struct(">4sHB")
_SCALARS: dict[str, struct.Struct] = {
    "u8": struct.Struct(">B"),
    "u16": struct.Struct(">H"),
    "u32": struct.Struct(">I"),
    "u64": struct.Struct(">Q"),
    "i64": struct.Struct(">q"),
    "f64": struct.Struct(">d"),
    "bool": struct.Struct(">?"),
}
_ARRAYS: dict[str, np.dtype[Any]] = {
    "f32": np.dtype("<f4"),
    "u32s": np.dtype("<u4"),
    "u64s": np.dtype("<u8"),
}
_LEN32 = struct.Struct(">I")
_LEN64 = struct.Struct(">Q")

_REGISTRY: dict[int, type[WireMessage]] = {}


class WireMessage:
    """Base of every message that crosses a transport."""

    TYPE_ID: ClassVar[int]
    VERSION: ClassVar[int]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TYPE_ID" not in cls.__dict__:
            return
        if cls.TYPE_ID in _REGISTRY and _REGISTRY[cls.TYPE_ID].__qualname__ != cls.__qualname__:
            raise TypeError(f"message type id {cls.TYPE_ID} is used twice")
        for name, kind in cls.FIELDS:
            if kind not in _SCALARS and kind not in _ARRAYS and kind not in ("bytes", "str", "ids"):
                raise TypeError(f"{cls.__name__}.{name}: unknown field kind {kind!r}")
        _REGISTRY[cls.TYPE_ID] = cls

    def to_bytes(self) -> bytes:
        parts = [_HEADER.pack(MAGIC, self.TYPE_ID, self.VERSION)]
        for name, kind in self.FIELDS:
            parts.append(_encode_field(type(self).__name__, name, kind, getattr(self, name)))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        view = memoryview(data)
        message = decode_message(view)
        if not isinstance(message, cls):
            raise MessageError(f"expected a {cls.__name__} message, got {type(message).__name__}")
        return message


def _encode_field(owner: str, name: str, kind: str, value: Any) -> bytes:
    try:
        if kind in _SCALARS:
            return _SCALARS[kind].pack(value)
        if kind == "bytes":
            raw = bytes(value)
            return _LEN32.pack(len(raw)) + raw
        if kind == "str":
            raw = value.encode("utf-8")
            return _LEN32.pack(len(raw)) + raw
        if kind == "ids":
            ids = tuple(int(v) for v in value)
            return _LEN32.pack(len(ids)) + struct.pack(f">{len(ids)}I", *ids)
        array = np.asarray(value)
        if array.ndim != 1:
            raise MessageError(f"{owner}.{name}: array must be 1-D, got shape {array.shape}")
        raw = np.ascontiguousarray(array, dtype=_ARRAYS[kind]).tobytes()
        return _LEN64.pack(array.size) + raw
    except struct.error as exc:
        raise MessageError(f"{owner}.{name}: cannot encode {value!r} as {kind}: {exc}") from exc


def decode_message(data: bytes | bytearray | memoryview) -> WireMessage:
    """Decode any registered message; arrays are zero-copy read-only views of ``data``."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise MessageError(f"message too short: {len(view)} bytes, header needs {_HEADER.size}")
    magic, type_id, version = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise MessageError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    cls = _REGISTRY.get(type_id)
    if cls is None:
        raise MessageError(f"unknown message type id {type_id}")
    if version != cls.VERSION:
        raise MessageError(
            f"{cls.__name__}: unsupported version {version}, this build speaks {cls.VERSION}"
        )
    offset = _HEADER.size
    values: dict[str, Any] = {}
    for name, kind in cls.FIELDS:
        values[name], offset = _decode_field(cls.__name__, name, kind, view, offset)
    if offset != len(view):
        raise MessageError(f"{cls.__name__}: {len(view) - offset} trailing bytes after last field")
    return cls(**values)


def _need(owner: str, name: str, view: memoryview, offset: int, size: int) -> None:
    if offset + size > len(view):
        raise MessageError(
            f"{owner}.{name}: truncated, needs {size} bytes at offset {offset}, "
            f"message has {len(view)}"
        )


def _decode_field(
    owner: str, name: str, kind: str, view: memoryview, offset: int
) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        _need(owner, name, view, offset, fmt.size)
        return fmt.unpack_from(view, offset)[0], offset + fmt.size
    if kind in ("bytes", "str", "ids"):
        _need(owner, name, view, offset, 4)
        (length,) = _LEN32.unpack_from(view, offset)
        offset += 4
        size = length * 4 if kind == "ids" else length
        _need(owner, name, view, offset, size)
        raw = view[offset : offset + size]
        offset += size
        if kind == "bytes":
            return bytes(raw), offset
        if kind == "ids":
            return tuple(struct.unpack(f">{length}I", raw)), offset
        try:
            return bytes(raw).decode("utf-8"), offset
        except UnicodeDecodeError as exc:
            raise MessageError(f"{owner}.{name}: not valid UTF-8") from exc
    dtype = _ARRAYS[kind]
    _need(owner, name, view, offset, 8)
    (count,) = _LEN64.unpack_from(view, offset)
    offset += 8
    size = count * dtype.itemsize
    _need(owner, name, view, offset, size)
    array = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
    return array, offset + size


def frame_parts(parts: Sequence[bytes]) -> bytes:
    """Concatenate byte strings, each prefixed by its u32 big-endian length."""
    return b"".join(_LEN32.pack(len(p)) + p for p in parts)


def unframe_parts(data: bytes, what: str, *, error: type[Exception] = MessageError) -> list[bytes]:
    """Inverse of :func:`frame_parts`; a truncated part raises ``error`` naming ``what``."""
    parts: list[bytes] = []
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise error(f"{what}: truncated length prefix at offset {offset}")
        (length,) = _LEN32.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise error(f"{what}: part of {length} bytes truncated at offset {offset}")
        parts.append(bytes(view[offset : offset + length]))
        offset += length
    return parts


def message_fields(message: WireMessage) -> dict[str, Any]:
    """The message's fields as a dict (for logging; arrays are left as arrays)."""
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}  # type: ignore[arg-type]
