"""One round's SecAgg parameters, derived identically by every party from the config.

No parameter travels in a message: the server cannot lower a client's threshold or
precision, because each client derives ``(k, t, b, ...)`` itself from its own copy of the
federation's config and the round's participant count ``n``.

Thresholds (Bonawitz et al. CCS 2017 §4, Thm 6.2/6.4; Bell et al. CCS 2020 §3, Thm 3.5):
``t >= max(min_cohort, floor(k/2) + 1)`` against a semi-honest server (a strict majority of
a client's share holders must collude to unmask it), ``t >= floor(2k/3) + 1`` against an
active one. Share holders of a client are its k graph neighbours and itself (k + 1 holders).

Sub-cohorts (``cohorts=True``, the trust module under masking): the round's U1 is split into
g = floor(|U1| / min_cohort) sub-cohorts (:func:`secfl.secagg.graph.split_cohorts`), each
masked on its own complete graph with its own threshold :meth:`SecAggParams.cohort_threshold`.
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
    #: Sub-cohorts: each block of the split is aggregated on its own (one sum per block).
    cohorts: bool = False

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
        # The sub-cohort rule is bound into every advertised-key signature: a client that
        # splits and one that does not never agree on a round.
        tail = COHORT_DIGEST_TAG if self.cohorts else b""
        return hashlib.sha256(b"secfl/secagg/v1/params" + raw + tail).digest()

    def cohort_threshold(self, size: int) -> int:
        """t_g of a sub-cohort of ``size`` members (complete graph, k_g = size - 1):
        max(min_cohort, floor(k_g/2)+1), or floor(2 k_g/3)+1 for the active variant."""
        if size < self.min_cohort:
            raise ConfigError(
                f"a sub-cohort of {size} members is below aggregation.min_cohort={self.min_cohort}"
            )
        return max(self.min_cohort, _floor_rule(size - 1, self.variant))


#: Appended to the parameter digest when sub-cohorts are on (protocols/secagg.md §9).
COHORT_DIGEST_TAG = b"secfl/secagg/v1/cohorts"


def _floor_rule(k: int, variant: str) -> int:
    return (2 * k) // 3 + 1 if variant == "active" else k // 2 + 1


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
    masking: MaskingConfig,
    *,
    n: int,
    min_cohort: int,
    noise: NoiseHeadroom | None = None,
    cohorts: bool = False,
) -> SecAggParams:
    """Parameters for a round with ``n`` participants; ConfigError names what cannot hold.

    With distributed DP ``noise``, b also holds the noise of n shares (its tail bound).
    With ``cohorts`` the round is split into sub-cohorts (see the module docstring): ``k``
    and ``threshold`` are those of a smallest sub-cohort (``min_cohort`` members), each
    sub-cohort's own threshold comes from :meth:`SecAggParams.cohort_threshold`."""
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 participants, got n={n}")
    if cohorts:
        return _derive_cohort_params(masking, n=n, min_cohort=min_cohort, noise=noise)
    if masking.graph == "complete":
        k = n - 1
    else:
        k = masking.neighbors if masking.neighbors is not None else default_neighbours(n)
        k = min(k, n - 1)
    floor = _floor_rule(k, masking.variant)
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
    graph = "complete" if k >= n - 1 else "k_regular"
    return _params(masking, n=n, graph=graph, k=k, t=t, min_cohort=min_cohort, noise=noise)


def _derive_cohort_params(
    masking: MaskingConfig, *, n: int, min_cohort: int, noise: NoiseHeadroom | None
) -> SecAggParams:
    """Sub-cohort rounds: complete graphs inside blocks of at least ``min_cohort``."""
    if min_cohort < 2:
        raise ConfigError(
            f"trust sub-cohorts under masking need aggregation.min_cohort >= 2 (a sum of one "
            f"client is that client's update), got {min_cohort}"
        )
    if min_cohort > n:
        raise ConfigError(
            f"aggregation.min_cohort={min_cohort} exceeds the round's {n} participants; no "
            "sub-cohort can be formed"
        )
    if masking.threshold is not None and masking.threshold > min_cohort:
        raise ConfigError(
            f"aggregation.masking.threshold={masking.threshold} exceeds aggregation.min_cohort="
            f"{min_cohort}, the size of the smallest sub-cohort; with trust sub-cohorts each "
            "sub-cohort's threshold is derived from its size (leave threshold unset)"
        )
    k = min_cohort - 1
    t = max(min_cohort, _floor_rule(k, masking.variant))
    # A sub-cohort's threshold is at least that of a smallest one, so each client's noise
    # share is at most the share sized for t; n such shares bound the noise in any sum.
    return _params(
        masking, n=n, graph="cohorts", k=k, t=t, min_cohort=min_cohort, noise=noise, cohorts=True
    )


def _params(
    masking: MaskingConfig,
    *,
    n: int,
    graph: str,
    k: int,
    t: int,
    min_cohort: int,
    noise: NoiseHeadroom | None,
    cohorts: bool = False,
) -> SecAggParams:
    """The round's parameters: the graph and threshold chosen, the rest from the config and
    the modulus that holds n encoded values and the DP noise."""
    return SecAggParams(
        n=n,
        graph=graph,
        k=k,
        threshold=t,
        bits=_modulus_bits(masking, n=n, threshold=t, noise=noise),
        resolution_bits=masking.resolution_bits,
        clip_range=masking.clip_range,
        weighting=masking.weighting,
        max_weight=masking.max_weight,
        variant=masking.variant,
        min_cohort=min_cohort,
        seed_bytes=masking.seed_bytes,
        cohorts=cohorts,
    )


def _modulus_bits(
    masking: MaskingConfig, *, n: int, threshold: int, noise: NoiseHeadroom | None
) -> int:
    weight_bound = masking.max_weight if masking.weighting == "samples" else 1
    if weight_bound * 2 ** (masking.resolution_bits - 1) > 2**30:
        raise ConfigError(
            f"max_weight * 2^(resolution_bits-1) = {weight_bound} * 2^"
            f"{masking.resolution_bits - 1} exceeds 2^30, the stochastic-rounding headroom; "
            "lower aggregation.masking.max_weight or resolution_bits"
        )
    noise_bound = noise.sum_magnitude_bound(n, threshold) if noise is not None else 0
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
    return bits
