"""Randomness as a parameter (DESIGN 3b).

A run's :class:`Randomness` hands out :class:`RandomStream` objects named by
``(round, attempt, party, purpose)``:

* ``mode="os"`` (default): every stream reads the OS CSPRNG; runs are not reproducible.
* ``mode="seeded"``: every stream is an AES-CTR DRBG keyed by
  ``(seed, round, attempt, party, purpose)``; runs and resumes are bit-identical, and the
  run is marked insecure in its report and event log.

The experiment's *design* (test split, client partition, model initialisation, a simulated
device population's resources) is defined by the seed in both modes: it is public, not
secret, and must be the same for every seed-matched comparison. Everything else — client
selection, batch order, dropouts, device availability, keys, masks, rounding, DP noise —
follows the mode.

Derived values use named constructions so an auditor can reimplement them:
``uniform`` = top 53 bits of a big-endian u64 times 2^-53; ``integers`` = rejection sampling
of masked u64; ``normal`` = Box–Muller in float64 on two ``uniform`` draws (with 1-u so the
logarithm never sees 0); ``permutation`` = argsort of fresh u64 keys (stable sort).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from secfl.crypto.drbg import ByteReader, os_random_bytes, seeded_reader
from secfl.errors import ConfigError

RandomnessMode = Literal["os", "seeded"]

#: Purposes that define the experiment and are seeded in every mode.
DESIGN_PURPOSES = frozenset(
    {"data.split", "data.partition", "data.shared", "model.init", "strategy.devices"}
)


class RandomStream:
    """Uniform bytes plus derived values from one byte source."""

    __slots__ = ("_read", "secure")

    def __init__(self, read: ByteReader, *, secure: bool) -> None:
        self._read = read
        self.secure = secure

    def bytes(self, n: int) -> bytes:
        return self._read(n)

    def uint64(self, size: int) -> np.ndarray:
        if size < 0:
            raise ConfigError(f"size must be >= 0, got {size}")
        return np.frombuffer(self._read(8 * size), dtype=">u8").astype(np.uint64)

    def uniform(self, size: int) -> np.ndarray:
        """Float64 uniform on [0, 1) with 53 random bits each."""
        return (self.uint64(size) >> np.uint64(11)).astype(np.float64) * (2.0**-53)

    def integers(self, high: int, size: int) -> np.ndarray:
        """Uniform integers in [0, high), unbiased (rejection sampling)."""
        if not 0 < high <= 2**63:
            raise ConfigError(f"high must be in (0, 2^63], got {high}")
        if high == 1:
            return np.zeros(size, dtype=np.int64)
        bits = (high - 1).bit_length()
        mask = np.uint64((1 << bits) - 1)
        out = np.empty(size, dtype=np.int64)
        filled = 0
        while filled < size:
            need = size - filled
            draw = self.uint64(need + need // 2 + 8) & mask
            ok = draw[draw < np.uint64(high)][:need]
            out[filled : filled + ok.size] = ok.astype(np.int64)
            filled += ok.size
        return out

    def permutation(self, n: int) -> np.ndarray:
        return np.argsort(self.uint64(n), kind="stable")

    def bernoulli(self, p: float, size: int) -> np.ndarray:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"probability must be in [0, 1], got {p}")
        return self.uniform(size) < p

    def normal(self, size: int) -> np.ndarray:
        """Standard normal float64 samples by the Box–Muller transform."""
        half = (size + 1) // 2
        u1 = 1.0 - self.uniform(half)  # in (0, 1]: log never sees 0
        u2 = self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * math.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]

    def seed_int(self, bits: int = 63) -> int:
        """An integer seed for a non-secret generator (torch init, data order)."""
        return int.from_bytes(self._read(8), "big") >> (64 - bits)

    def numpy_generator(self) -> np.random.Generator:
        """A PCG64 generator seeded from 128 bits of this stream.

        For non-secret uses only (data partitioning, shuffling a public split). Keys, masks
        and DP noise must draw from the stream itself.
        """
        return np.random.Generator(np.random.PCG64(int.from_bytes(self._read(16), "big")))


class Randomness:
    """The run's randomness policy: hands out named streams."""

    __slots__ = ("mode", "seed")

    def __init__(self, mode: RandomnessMode, seed: int) -> None:
        if mode not in ("os", "seeded"):
            raise ConfigError(f"security.randomness must be 'os' or 'seeded', got {mode!r}")
        if not 0 <= seed < 2**64:
            raise ConfigError(f"seed must be in [0, 2^64), got {seed}")
        self.mode: RandomnessMode = mode
        self.seed = seed

    @property
    def secure(self) -> bool:
        return self.mode == "os"

    def stream(
        self, purpose: str, *, round_index: int = 0, attempt: int = 0, party: str = "server"
    ) -> RandomStream:
        """A fresh stream for ``purpose``; in ``seeded`` mode the same tuple repeats bytes."""
        if self.mode == "seeded" or purpose in DESIGN_PURPOSES:
            reader = seeded_reader(
                self.seed, round_index=round_index, attempt=attempt, party=party, purpose=purpose
            )
            return RandomStream(reader, secure=False)
        return RandomStream(os_random_bytes, secure=True)
