"""Distributed user-level DP: every client adds a share of the noise before protection.

Under ``masking`` and ``ckks`` no party sees an individual update, so no party can add the
noise centrally. Instead each participant clips its update, adds a *share* of the noise,
and the securely aggregated sum carries the full noise while no single party added it
(Agarwal, Kairouz & Liu 2021 for ``masking``; the Gaussian analogue for ``ckks``):

* ``masking`` — discrete noise in the integer domain, before masking. The client scales its
  clipped value v (||v||_2 <= C) to ``2^(r-1)/C`` integers per unit, rounds stochastically
  (the SecAgg encoding), and adds Skellam noise Sk(mu_i, mu_i) = Poisson(mu_i) - Poisson(mu_i)
  per coordinate. Skellam is closed under summation, so the sum of m honest shares is exactly
  Sk(m mu_i, m mu_i). The integer-domain sensitivities of one client's encoded vector q are
  ``D2 = 2^(r-1) + sqrt(d)`` (rounding moves each coordinate by less than 1) and
  ``D1 = min(2^(r-1) sqrt(d) + d, D2^2)`` (``||q||_1 <= ||q||_2^2`` for integer vectors).
  Accounted by the RDP bound of Agarwal et al. 2021 (:mod:`secfl.privacy.discrete`).
* ``ckks`` — Gaussian shares N(0, s_i^2) in float64 before encryption (``secfl-gauss/1``); a
  sum of independent Gaussians is Gaussian, so the released sum is the subsampled Gaussian
  mechanism with sensitivity C and the library accountants apply unchanged.

How much each client adds. The protocol reveals a sum only if at least t shares are in it
(the SecAgg threshold of the round; ``aggregation.min_cohort`` for the CKKS decryptor), and
``privacy.user_level.colluding_clients`` = T of the contributors may be colluding with the
server (they know, or never added, their own shares). Each client therefore adds variance
``(sigma D2)^2 / (t - T)``: whatever dropouts the protocol tolerates, the shares of the at
least t - T honest contributors carry the target variance ``(sigma D2)^2``. The ledger is
charged with the noise actually present in the released sum: ``(|survivors| - T)`` shares.

Weights. A client's weight is folded into its value before the noise: ``v = clip(x, C) w /
w_max`` (uniform: w = 1), so every contribution has norm <= C and weight 1 on the wire (the
sum of weights reveals only the number of contributors, which the server knows). The mean
uses the fixed denominator of DP-FedAvg (McMahan et al. 2018): the expected cohort, not the
survivors, so the released mean is a post-processing of the noised sum alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from secfl.errors import ConfigError, PrivacyError
from secfl.privacy.accountants import calibrate_noise_multiplier
from secfl.privacy.central import (
    CentralGaussianMechanism,
    central_mechanism,
    client_weight,
    clip_to_norm,
    expected_cohort,
    server_event,
    user_level_noise_multiplier,
)
from secfl.privacy.events import Amplification, DpEvent
from secfl.randomness import RandomStream

if TYPE_CHECKING:
    from secfl.config import RunConfig

#: Overflow headroom for the integer sum: a Skellam sum Sk(M, M) exceeds
#: ``TAIL_SIGMAS * sqrt(2M) + TAIL_FLOOR`` in absolute value with probability at most
#: 2 exp(-s^2 / (2 (2M + s/3))) (Bernstein's inequality for the two Poisson sums), below
#: 2^-130 per coordinate for every M: the modulus never wraps in any realistic run.
TAIL_SIGMAS = 14.0
TAIL_FLOOR = 128

#: The clipped value is scaled to just below C so its float32 copy cannot exceed C.
_CLIP_SHRINK = 1.0 - 2.0**-20

NoiseKind = Literal["skellam", "gaussian"]


@dataclass(frozen=True)
class DistributedNoise:
    """The noise plan every party derives from its own copy of the run config."""

    kind: NoiseKind
    #: Target standard deviation of the sum's noise in units of the L2 sensitivity.
    noise_multiplier: float
    clip_norm: float
    weighting: str
    max_weight: float
    weight_unit: float
    #: T: contributors that may collude with the server (their shares do not count).
    colluding: int
    #: Expected contributors per round: the fixed denominator of the released mean.
    expected_cohort: float
    sampling_rate: float
    amplification: Amplification
    #: d, the number of coordinates that carry noise.
    model_size: int
    #: Skellam only: r, so that C is encoded as 2^(r-1) integers.
    resolution_bits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("skellam", "gaussian"):
            raise PrivacyError(f"distributed noise kind must be skellam or gaussian: {self.kind}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise PrivacyError(f"privacy.user_level.clip_norm must be > 0, got {self.clip_norm}")
        if self.weighting not in ("uniform", "capped"):
            raise PrivacyError(f"weighting must be 'uniform' or 'capped', got {self.weighting!r}")
        if self.colluding < 0:
            raise PrivacyError(f"colluding_clients must be >= 0, got {self.colluding}")
        if self.model_size < 1:
            raise PrivacyError(f"model size must be >= 1, got {self.model_size}")
        if not self.expected_cohort > 0:
            raise PrivacyError(f"expected cohort must be > 0, got {self.expected_cohort}")
        if self.kind == "skellam" and not 2 <= self.resolution_bits <= 30:
            raise PrivacyError(
                f"Skellam noise needs resolution_bits in [2, 30], got {self.resolution_bits}"
            )

    # ------------------------------------------------------------ sensitivity

    @property
    def mechanism(self) -> str:
        return "skellam" if self.kind == "skellam" else "subsampled_gaussian"

    @property
    def scale(self) -> float:
        """Noise-domain units per unit of value: 2^(r-1)/C for Skellam, 1 for Gaussian."""
        if self.kind == "skellam":
            return float(2 ** (self.resolution_bits - 1)) / self.clip_norm
        return 1.0

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity D2 of the sum to one client, in the domain the noise is added."""
        if self.kind == "skellam":
            return float(2 ** (self.resolution_bits - 1)) + math.sqrt(self.model_size)
        return self.clip_norm

    @property
    def l1_sensitivity(self) -> float | None:
        """L1 sensitivity D1 (Skellam only)."""
        if self.kind != "skellam":
            return None
        d = float(self.model_size)
        return min(float(2 ** (self.resolution_bits - 1)) * math.sqrt(d) + d, self.sensitivity**2)

    @property
    def target_std(self) -> float:
        """Standard deviation of the noise the sum carries with t - T honest shares."""
        return self.noise_multiplier * self.sensitivity

    @property
    def denominator(self) -> float:
        """The released mean is the noised sum over this (in value units)."""
        return self.expected_cohort

    # ------------------------------------------------------------ shares

    def honest_minimum(self, threshold: int) -> int:
        """t - T: honest shares in any sum the protocol reveals."""
        honest = threshold - self.colluding
        if honest < 1:
            raise PrivacyError(
                f"privacy.user_level.colluding_clients={self.colluding} leaves no honest "
                f"share in a sum of threshold t={threshold}; allowed: colluding_clients < t"
            )
        return honest

    def client_std(self, threshold: int) -> float:
        """Standard deviation of one client's share for a round with threshold t."""
        return self.target_std / math.sqrt(self.honest_minimum(threshold))

    def client_value(self, update: np.ndarray, num_samples: int) -> np.ndarray:
        """``clip(update, C) * w / w_max`` in float64: norm below C, weight folded in."""
        if num_samples < 1:
            raise PrivacyError(f"num_samples must be >= 1, got {num_samples}")
        if update.shape != (self.model_size,):
            raise PrivacyError(
                f"update has shape {update.shape}, the noise plan is for ({self.model_size},)"
            )
        if not np.isfinite(update).all():
            raise PrivacyError("update holds NaN or Inf; refusing to privatise it")
        weight = client_weight(self.weighting, num_samples, self.weight_unit, self.max_weight)
        weight /= self._max_client_weight
        return clip_to_norm(update, self.clip_norm * _CLIP_SHRINK) * weight

    def client_noise(self, stream: RandomStream, threshold: int) -> np.ndarray:
        """One client's share: int64 Skellam, or float64 Gaussian, of ``model_size`` values."""
        std = self.client_std(threshold)
        if self.kind == "skellam":
            from secfl.privacy.discrete import sample_skellam

            return sample_skellam(stream, std * std / 2.0, self.model_size)
        from secfl.privacy.noise import gaussian_noise

        return gaussian_noise(stream, self.model_size).numpy() * std

    def sum_magnitude_bound(self, n: int, threshold: int) -> int:
        """An integer bound on |noise| in any coordinate of a sum of up to n Skellam shares,
        exceeded with probability below 2^-130 (see ``TAIL_SIGMAS``)."""
        if self.kind != "skellam":
            return 0
        variance = n * self.client_std(threshold) ** 2
        return math.ceil(TAIL_SIGMAS * math.sqrt(variance)) + TAIL_FLOOR

    # ------------------------------------------------------------ events

    def planned_event(self, round_index: int, attempt: int = 0) -> DpEvent:
        """The least noise a revealed sum can carry (t - T honest shares): the budget check."""
        return self._event(self.noise_multiplier, round_index, attempt)

    def released_event(
        self, contributors: int, threshold: int, *, round_index: int, attempt: int
    ) -> DpEvent:
        """The noise actually present in a sum of ``contributors`` shares, T of them
        possibly colluding: (contributors - T) * s_t^2."""
        if contributors < threshold:
            raise PrivacyError(
                f"a sum of {contributors} shares is below the threshold t={threshold}; it "
                "must not be released"
            )
        honest = contributors - self.colluding
        std = math.sqrt(honest) * self.client_std(threshold)
        return self._event(std / self.sensitivity, round_index, attempt)

    def _event(self, sigma: float, round_index: int, attempt: int) -> DpEvent:
        return server_event(
            self.mechanism,
            sigma,
            self.sensitivity,
            sampling_rate=self.sampling_rate,
            amplification=self.amplification,
            round_index=round_index,
            attempt=attempt,
            l1_sensitivity=self.l1_sensitivity,
        )

    @property
    def _max_client_weight(self) -> float:
        return self.max_weight if self.weighting == "capped" else 1.0

    def check_ckks_range(self, clip_range: float, threshold: int) -> None:
        """CKKS clips coordinates to [-R, R]; a noised share must fit unclipped (clipping it
        would change the sum's distribution). Require R >= C + 9 s_t: a coordinate exceeds
        it with probability below 2^-60."""
        need = self.clip_norm + 9.0 * self.client_std(threshold)
        if clip_range < need:
            raise ConfigError(
                f"aggregation.ckks.clip_range={clip_range} is too small for noised shares: "
                f"clip_norm {self.clip_norm} + 9 x share std {self.client_std(threshold):.4g} "
                f"= {need:.4g}; raise aggregation.ckks.clip_range to at least that"
            )


def user_level_mechanism(
    config: RunConfig, model_size: int
) -> CentralGaussianMechanism | DistributedNoise | None:
    """The user-level mechanism of ``config``: central Gaussian noise in mode ``none``,
    Skellam shares under ``masking``, Gaussian shares under ``ckks``; None without it."""
    user = config.privacy.user_level
    if user is None:
        return None
    protection = config.aggregation.protection
    if protection == "none":
        return central_mechanism(config)
    cohort, rate, amplification = expected_cohort(config)
    kind: NoiseKind = "skellam" if protection == "masking" else "gaussian"
    plan = DistributedNoise(
        kind=kind,
        noise_multiplier=1.0,
        clip_norm=user.clip_norm,
        weighting=user.weighting,
        max_weight=user.max_weight,
        weight_unit=user.weight_unit,
        colluding=user.colluding_clients,
        expected_cohort=cohort,
        sampling_rate=rate,
        amplification=amplification,
        model_size=model_size,
        resolution_bits=config.aggregation.masking.resolution_bits if kind == "skellam" else 0,
    )
    sigma = user.noise_multiplier
    if sigma is None:
        if user.target_epsilon is None:
            raise PrivacyError("privacy.user_level needs noise_multiplier or target_epsilon")
        if kind == "gaussian":
            sigma = user_level_noise_multiplier(config)
        else:
            # the Skellam bound depends on D1 and D2, not on sigma alone
            sigma = calibrate_noise_multiplier(
                "secfl_rdp",
                target_epsilon=user.target_epsilon,
                delta=user.delta,
                sampling_rate=1.0,
                steps=config.rounds,
                mechanism="skellam",
                sensitivity=plan.sensitivity,
                l1_sensitivity=plan.l1_sensitivity,
            )
    return dataclasses.replace(plan, noise_multiplier=sigma)
