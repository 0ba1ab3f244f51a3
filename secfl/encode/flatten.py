"""Flatten a model's parameters into one float32 vector and back; hash it for broadcast."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfl.errors import ModelError, UpdateError


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of a model's parameters in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        items = list(model.named_parameters())
        return cls(tuple(n for n, _ in items), tuple(tuple(p.shape) for _, p in items))

    @property
    def size(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    def describe(self) -> str:
        return ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in zip(self.names, self.shapes))


def flatten_parameters(model: nn.Module) -> np.ndarray:
    """The model's parameters as one contiguous float32 vector (a copy)."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def load_parameters(model: nn.Module, flat: np.ndarray) -> None:
    """Copy ``flat`` into the model's parameters; the length must match exactly."""
    layout_size = sum(p.numel() for p in model.parameters())
    if flat.ndim != 1 or flat.size != layout_size:
        raise ModelError(
            f"parameter vector has shape {flat.shape}, the model needs ({layout_size},)"
        )
    source = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(source[offset : offset + n].view_as(p))
            offset += n


def model_hash(flat: np.ndarray) -> bytes:
    """SHA-256 of the global model's flat float32 bytes (little-endian): the broadcast hash
    that later protocols sign so clients detect a server that sends different models."""
    data = np.ascontiguousarray(flat, dtype="<f4")
    return hashlib.sha256(b"secfl/model/v1" + data.tobytes()).digest()


def check_update(vector: np.ndarray, *, expected_size: int, who: str) -> None:
    """Refuse an update with the wrong shape or non-finite values (nothing is clipped here)."""
    if vector.ndim != 1 or vector.size != expected_size:
        raise UpdateError(f"{who}: update has shape {vector.shape}, expected ({expected_size},)")
    if not np.isfinite(vector).all():
        bad = int(np.count_nonzero(~np.isfinite(vector)))
        raise UpdateError(
            f"{who}: update has {bad} NaN/Inf coordinates; only finite values allowed"
        )
