"""Messages of the plaintext round (broadcast and update), shared by client and server.

Protection protocols (masking, CKKS) define their own messages beside their state machines;
all use the codec of :mod:`secfl.wire`. Type ids 1-99 belong to this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from secfl.wire import WireMessage


@dataclass(frozen=True, eq=False)
class FitIns(WireMessage):
    """Server -> client: train from this global model. ``model_hash`` binds the broadcast."""

    TYPE_ID: ClassVar[int] = 1
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("model_hash", "bytes"),
        ("weights", "f32"),
    )
    round: int
    attempt: int
    model_hash: bytes
    weights: np.ndarray


@dataclass(frozen=True, eq=False)
class FitRes(WireMessage):
    """Client -> server (mode ``none``): the weights delta and the sample count."""

    TYPE_ID: ClassVar[int] = 2
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("attempt", "u32"),
        ("client_id", "u32"),
        ("model_hash", "bytes"),
        ("num_samples", "u64"),
        ("train_loss", "f64"),
        ("update", "f32"),
    )
    round: int
    attempt: int
    client_id: int
    model_hash: bytes
    num_samples: int
    train_loss: float
    update: np.ndarray


@dataclass(frozen=True)
class ClientFailure(WireMessage):
    """Client -> server: the client refused or failed the request, and why."""

    TYPE_ID: ClassVar[int] = 3
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "u32"),
        ("client_id", "u32"),
        ("reason", "str"),
    )
    round: int
    client_id: int
    reason: str
