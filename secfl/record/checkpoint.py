"""Crash-safe checkpoints: one safetensors file, written atomically after every round.

The file holds the arrays (global model, server optimiser state, anything a later feature
adds) and, in its metadata, a JSON document with the round, the run config's fingerprint,
the metrics history and opaque JSON state. ``payload_sha256`` covers every array's bytes and
the JSON, so a torn or edited file is refused rather than resumed from.

Writes go to a temporary file in the same directory, are fsync'd, then ``os.replace``d over
the previous checkpoint and the directory is fsync'd: after a crash the checkpoint is either
the old one or the new one, never a mixture.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from secfl.errors import CheckpointError

FORMAT = "secfl-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass(eq=False)
class Checkpoint:
    round: int
    config_fingerprint: str
    arrays: dict[str, np.ndarray]
    state: dict[str, Any] = field(default_factory=dict)


def _digest(arrays: dict[str, np.ndarray], document: str) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    h.update(document.encode())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> str:
    """Atomically replace ``folder/checkpoint.safetensors``; returns the payload digest."""
    folder = Path(folder)
    document = json.dumps(
        {
            "format": FORMAT,
            "round": checkpoint.round,
            "config_fingerprint": checkpoint.config_fingerprint,
            "state": checkpoint.state,
        },
        sort_keys=True,
    )
    arrays = {k: np.ascontiguousarray(v) for k, v in checkpoint.arrays.items()}
    digest = _digest(arrays, document)
    blob = st_save(arrays, metadata={"secfl": document, "payload_sha256": digest})
    target = folder / CHECKPOINT_NAME
    tmp = folder / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    with tmp.open("wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(folder)
    return digest


def read_checkpoint(folder: str | Path, *, expected_fingerprint: str | None = None) -> Checkpoint:
    """Load and verify a checkpoint; any damage or mismatch raises :class:`CheckpointError`."""
    path = Path(folder) / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; nothing to resume")
    raw = path.read_bytes()
    try:
        arrays = st_load(raw)
        metadata = _metadata(raw)
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    document = metadata.get("secfl")
    if document is None or "payload_sha256" not in metadata:
        raise CheckpointError(f"{path} is not a secfl checkpoint (no secfl metadata)")
    if _digest(arrays, document) != metadata["payload_sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: payload digest does not match")
    info = json.loads(document)
    if info.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {info.get('format')!r}, expected {FORMAT!r}")
    if expected_fingerprint is not None and info["config_fingerprint"] != expected_fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run config (fingerprint "
            f"{info['config_fingerprint'][:12]}..., this config {expected_fingerprint[:12]}...); "
            "resume with the run directory's own config.yaml"
        )
    return Checkpoint(
        round=int(info["round"]),
        config_fingerprint=info["config_fingerprint"],
        arrays=dict(arrays),
        state=info["state"],
    )


def _metadata(raw: bytes) -> dict[str, str]:
    if len(raw) < 8:
        raise ValueError("file shorter than the safetensors header")
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return meta
