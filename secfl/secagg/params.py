"""One round's SecAgg parameters, derived identically by every party from the config.

No parameter travels in a message: the server cannot lower a client's threshold or
precision, because each client derives ``(k, t, b, ...)`` itself from its own copy of the
federation's config and the round's participant count ``n``.

Thresholds (Bonawitz et al. CCS 2017 §4, Thm 6.2/6.4; Bell et al. CCS 2020 §3, Thm 3.5):
``t >= max(min_cohort, floor(k/2) + 1)`` against a semi-honest server (a strict majority of
a client's share holders must collude to unmask it), ``t >= floor(2k/3) + 1`` against an
active one. Share holders of a client are its k graph neighbours and itself (k + 1 holders).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from secfl.config import MaskingConfig
from secfl.errors import ConfigError

#: Fixed-point fraction bits used by stochastic rounding (see encoding).
ROUNDING_FRACTION_BITS = 32


class NoiseHeadroom(Protocol):
    """Distributed DP noise the integer sum must hold besides the encoded values
    (:class:`secfl.privacy.distributed.DistributedNoise`)."""

    def sum_magnitude_bound(self, n: int, threshold: int) -> int:
        """Bound on |noise| per coordinate of a sum of up to n shares."""
        ...


@dataclass(frozen=True)
class SecAggParams:
    n: int
    graph: str
    k: int
    threshold: int
    bits: int
    resolution_bits: int
    clip_range: float
    weighting: str
    max_weight: int
    variant: str
    min_cohort: int
    seed_bytes: int

    @property
    def complete(self) -> bool:
        return self.k >= self.n - 1

    @property
    def word_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    @property
    def weight_bound(self) -> int:
        return self.max_weight if self.weighting == "samples" else 1

    @property
    def unit(self) -> float:
        """Integers per unit of (weight x value): 2^(r-1) / C."""
        return float(2 ** (self.resolution_bits - 1)) / self.clip_range

    def digest(self) -> bytes:
        """SHA-256 of the parameters (bound into every advertised-key signature)."""
        raw = struct.pack(
            ">IIIIIIdIIII",
            self.n,
            self.k,
            self.threshold,
            self.bits,
            self.resolution_bits,
            self.max_weight,
            self.clip_range,
            self.min_cohort,
            self.seed_bytes,
            1 if self.weighting == "samples" else 0,
            1 if self.variant == "active" else 0,
        )
        return hashlib.sha256(b"secfl/secagg/v1/params" + raw).digest()


def default_neighbours(n: int) -> int:
    """Bell et al. CCS 2020: k about 2*log2(n), rounded up to even."""
    k = 2 * math.ceil(math.log2(max(n, 2)))
    return k + (k % 2)


def required_bits(n: int, weight_bound: int, resolution_bits: int, noise_bound: int = 0) -> int:
    """Smallest b with n * w_max * 2^(r-1) + noise_bound <= 2^(b-1) - 1 (the signed sum
    of n encoded values and the DP noise fits)."""
    largest = n * weight_bound * 2 ** (resolution_bits - 1) + noise_bound
    return largest.bit_length() + 1


def derive_params(
    masking: MaskingConfig, *, n: int, min_cohort: int, noise: NoiseHeadroom | None = None
) -> SecAggParams:
    """Parameters for a round with ``n`` participants; ConfigError names what cannot hold.

    With distributed DP ``noise``, b also holds the noise of n shares (its tail bound)."""
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 participants, got n={n}")
    if masking.graph == "complete":
        k = n - 1
    else:
        k = masking.neighbors if masking.neighbors is not None else default_neighbours(n)
        k = min(k, n - 1)
    floor = (2 * k) // 3 + 1 if masking.variant == "active" else k // 2 + 1
    t_min = max(min_cohort, floor)
    holders = k + 1
    if masking.threshold is not None:
        t = masking.threshold
        if t < t_min:
            rule = "floor(2k/3)+1" if masking.variant == "active" else "floor(k/2)+1"
            raise ConfigError(
                f"aggregation.masking.threshold={t} is below the safe minimum {t_min} = "
                f"max(min_cohort={min_cohort}, {rule}={floor}) for k={k}"
            )
    else:
        t = t_min
    if t > holders:
        raise ConfigError(
            f"threshold t={t} exceeds the {holders} share holders (k={k} neighbours + self) of "
            f"a round with n={n} participants; lower aggregation.min_cohort={min_cohort} or "
            "raise the number of participants or neighbours"
        )
    if min_cohort > n:
        raise ConfigError(
            f"aggregation.min_cohort={min_cohort} exceeds the round's {n} participants"
        )
    weight_bound = masking.max_weight if masking.weighting == "samples" else 1
    if weight_bound * 2 ** (masking.resolution_bits - 1) > 2**30:
        raise ConfigError(
            f"max_weight * 2^(resolution_bits-1) = {weight_bound} * 2^"
            f"{masking.resolution_bits - 1} exceeds 2^30, the stochastic-rounding headroom; "
            "lower aggregation.masking.max_weight or resolution_bits"
        )
    noise_bound = noise.sum_magnitude_bound(n, t) if noise is not None else 0
    need = required_bits(n, weight_bound, masking.resolution_bits, noise_bound)
    bits = max(8, need) if masking.bits is None else masking.bits
    if need > bits or need > 64:
        raise ConfigError(
            f"aggregation.masking.bits={masking.bits if masking.bits is not None else 'auto'}: "
            f"the sum of n={n} clipped values weighted up to {weight_bound} at resolution "
            f"2^{masking.resolution_bits - 1}"
            + (f" plus DP noise up to {noise_bound}" if noise_bound else "")
            + f" needs {need} bits (allowed at most "
            f"{min(bits, 64)}); lower resolution_bits or max_weight, or raise bits (<= 64)"
        )
    return SecAggParams(
        n=n,
        graph="complete" if k >= n - 1 else "k_regular",
        k=k,
        threshold=t,
        bits=bits,
        resolution_bits=masking.resolution_bits,
        clip_range=masking.clip_range,
        weighting=masking.weighting,
        max_weight=masking.max_weight,
        variant=masking.variant,
        min_cohort=min_cohort,
        seed_bytes=masking.seed_bytes,
    )
