"""Sample-weighted aggregation of plaintext updates, streaming and in place.

The accumulator adds ``weight * update`` into one preallocated float32 buffer with a fused
multiply-add (torch's ``add_(x, alpha=w)``, which releases the GIL and uses every core), so a
round costs about one pass over each update. Finiteness is checked once on the result; only
if it fails are the held updates rescanned to name the culprits (the caller excludes them and
sums again), so the common path pays nothing extra and a bad update is never lost silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from secfl.errors import UpdateError


class WeightedSum:
    """Running ``sum_i w_i x_i`` and ``sum_i w_i`` over float32 vectors of one size."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise UpdateError(f"update size must be >= 1, got {size}")
        self.size = size
        self._acc = torch.zeros(size, dtype=torch.float32)
        self._held: dict[int, np.ndarray] = {}
        self.total_weight = 0.0

    def add(self, who: int, vector: np.ndarray, weight: float) -> None:
        if vector.ndim != 1 or vector.size != self.size:
            raise UpdateError(
                f"client {who}: update has shape {vector.shape}, expected ({self.size},)"
            )
        if not (weight > 0 and np.isfinite(weight)):
            raise UpdateError(
                f"client {who}: weight must be a positive finite number, got {weight}"
            )
        if who in self._held:
            raise UpdateError(f"client {who}: a second update in the same round is refused")
        self._acc.add_(_as_tensor(vector), alpha=float(weight))
        self._held[who] = vector
        self.total_weight += float(weight)

    @property
    def contributors(self) -> list[int]:
        return sorted(self._held)

    def non_finite_contributors(self) -> list[int]:
        """Clients whose update holds NaN/Inf (rescans held updates; failure path only)."""
        return [who for who, v in sorted(self._held.items()) if not np.isfinite(v).all()]

    def weighted_sum(self) -> np.ndarray:
        """The sum, after checking it is finite; raises naming the offending clients."""
        out = self._acc.numpy()
        if not bool(torch.isfinite(self._acc).all()):
            culprits = self.non_finite_contributors()
            detail = f"clients {culprits} sent NaN/Inf" if culprits else "the sum overflowed"
            raise UpdateError(f"weighted sum is not finite: {detail}")
        return out

    def weighted_mean(self) -> np.ndarray:
        if self.total_weight <= 0:
            raise UpdateError("no update was added; the weighted mean is undefined")
        return self.weighted_sum() / np.float32(self.total_weight)


def _as_tensor(vector: np.ndarray) -> torch.Tensor:
    """A zero-copy float32 tensor over ``vector`` (read-only received bytes included)."""
    if vector.dtype != np.float32:
        raise UpdateError(f"updates must be float32, got {vector.dtype}")
    if not vector.flags.c_contiguous:
        vector = np.ascontiguousarray(vector)
    if vector.flags.writeable:
        return torch.from_numpy(vector)
    # Received messages are immutable bytes; torch only reads them, so silence its warning
    # about non-writable buffers instead of paying for a copy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(vector.data, dtype=torch.float32)
