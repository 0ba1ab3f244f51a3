"""User-level DP for the released global model.

:class:`UserLevelMechanism` is what a protection mode reports: the DP events its round
cost. The foundation has one implementation, :class:`CentralGaussianMechanism` (mode
``none``, trusted server; DP-FedAvg of McMahan et al. 2018): every update clipped to L2 norm
C, weighted (uniform, or capped at w_max: sensitivity C w_max), summed, and Gaussian noise
N(0, (sigma C w_max)^2) added per coordinate from the server's :class:`RandomStream`. The
sum is divided by a *fixed* denominator — the expected cohort weight, not the survivors' —
so the released mean is a post-processing of the noised sum alone (McMahan et al. 2018,
fixed-denominator estimator). Distributed noise under ``masking``/``ckks`` implements the
same protocol (:mod:`secfl.privacy.distributed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from secfl.errors import PrivacyError
from secfl.privacy.accountants import calibrate_noise_multiplier
from secfl.privacy.events import Amplification, DpEvent
from secfl.randomness import RandomStream

if TYPE_CHECKING:
    from secfl.config import RunConfig


class UserLevelMechanism(Protocol):
    """A user-level mechanism a protection mode applies; the ledger plans with
    :meth:`planned_event` before a round starts and charges the events the round reports."""

    def planned_event(self, round_index: int, attempt: int = 0) -> DpEvent:
        """The event one round will cost if it runs (the budget check uses it)."""
        ...


def client_weight(weighting: str, num_samples: int, weight_unit: float, max_weight: float) -> float:
    """A client's user-level weight: 1 (``uniform``) or min(records / unit, w_max)."""
    if weighting == "uniform":
        return 1.0
    return min(num_samples / weight_unit, max_weight)


def server_event(
    mechanism: str,
    sigma: float,
    sensitivity: float,
    *,
    sampling_rate: float,
    amplification: Amplification,
    round_index: int,
    attempt: int,
    l1_sensitivity: float | None = None,
) -> DpEvent:
    """One round's user-level event, charged to the global (``server``) ledger."""
    return DpEvent(
        mechanism=mechanism,
        noise_multiplier=sigma,
        sampling_rate=sampling_rate,
        steps=1,
        sensitivity=sensitivity,
        level="user",
        round=round_index,
        party="server",
        attempt=attempt,
        amplification=amplification,
        l1_sensitivity=l1_sensitivity,
    )


def clip_to_norm(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """``update`` scaled down to L2 norm at most ``clip_norm`` (never scaled up)."""
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm <= clip_norm or norm == 0.0:
        return update.astype(np.float64)
    return update.astype(np.float64) * (clip_norm / norm)


@dataclass(frozen=True)
class CentralGaussianMechanism:
    """Clip, weight, sum, add Gaussian noise: the trusted server's user-level mechanism."""

    noise_multiplier: float
    clip_norm: float
    weighting: str
    max_weight: float
    weight_unit: float
    #: Expected number of participants per round (the fixed denominator's cohort).
    expected_cohort: float
    sampling_rate: float
    amplification: Amplification

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise PrivacyError(f"privacy.user_level.clip_norm must be > 0, got {self.clip_norm}")
        if self.weighting not in ("uniform", "capped"):
            raise PrivacyError(f"weighting must be 'uniform' or 'capped', got {self.weighting!r}")
        if not self.expected_cohort > 0:
            raise PrivacyError(f"expected cohort must be > 0, got {self.expected_cohort}")

    @property
    def max_client_weight(self) -> float:
        return self.max_weight if self.weighting == "capped" else 1.0

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the weighted sum to one client: C * w_max."""
        return self.clip_norm * self.max_client_weight

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.sensitivity

    @property
    def denominator(self) -> float:
        return self.expected_cohort * self.max_client_weight

    def weight(self, num_samples: int) -> float:
        return client_weight(self.weighting, num_samples, self.weight_unit, self.max_weight)

    def planned_event(self, round_index: int, attempt: int = 0) -> DpEvent:
        return server_event(
            "subsampled_gaussian",
            self.noise_multiplier,
            self.sensitivity,
            sampling_rate=self.sampling_rate,
            amplification=self.amplification,
            round_index=round_index,
            attempt=attempt,
        )

    def release_mean(
        self,
        updates: Mapping[int, np.ndarray],
        num_samples: Mapping[int, int],
        stream: RandomStream,
        *,
        round_index: int,
        attempt: int,
    ) -> tuple[np.ndarray, DpEvent]:
        """The noised mean update of ``updates`` and the event it cost."""
        if not updates:
            raise PrivacyError("no update to release")
        size = next(iter(updates.values())).size
        total = np.zeros(size, dtype=np.float64)
        for client_id in sorted(updates):
            total += self.weight(num_samples[client_id]) * clip_to_norm(
                updates[client_id], self.clip_norm
            )
        total += stream.normal(size) * self.noise_std
        mean = (total / self.denominator).astype(np.float32)
        return mean, self.planned_event(round_index, attempt)


def expected_cohort(config: RunConfig) -> tuple[float, float, Amplification]:
    """(expected participants per round, client sampling rate, amplification kind).

    Amplification is claimed only for Poisson client sampling (Zhu & Wang 2019); a fixed-size
    cohort is accounted with sampling rate 1.
    """
    n = config.data.num_clients
    spec = config.server.sampling
    if spec.kind == "poisson":
        return spec.rate * n, spec.rate, "poisson"
    if spec.clients_per_round is not None:
        return float(spec.clients_per_round), 1.0, "none"
    if spec.fraction is not None:
        return float(max(1, round(spec.fraction * n))), 1.0, "none"
    return float(n), 1.0, "none"


def user_level_noise_multiplier(config: RunConfig) -> float:
    """The configured sigma, or the one calibrated so that ``config.rounds`` rounds cost at
    most ``target_epsilon`` *without* sampling amplification (the figure against the server
    and participants)."""
    user = config.privacy.user_level
    if user is None:
        raise PrivacyError("privacy.user_level is not configured")
    if user.noise_multiplier is not None:
        return user.noise_multiplier
    if user.target_epsilon is None:
        raise PrivacyError("privacy.user_level needs noise_multiplier or target_epsilon")
    return calibrate_noise_multiplier(
        config.privacy.accountant.user_level,
        target_epsilon=user.target_epsilon,
        delta=user.delta,
        sampling_rate=1.0,
        steps=config.rounds,
    )


def central_mechanism(config: RunConfig) -> CentralGaussianMechanism | None:
    """The trusted server's mechanism for ``config``, or ``None`` without user-level DP."""
    user = config.privacy.user_level
    if user is None:
        return None
    if config.aggregation.protection != "none":
        raise PrivacyError(
            "central user-level noise needs aggregation.protection 'none'; masking and ckks "
            "use distributed noise (secfl.privacy.distributed.user_level_mechanism)"
        )
    cohort, rate, amplification = expected_cohort(config)
    return CentralGaussianMechanism(
        noise_multiplier=user_level_noise_multiplier(config),
        clip_norm=user.clip_norm,
        weighting=user.weighting,
        max_weight=user.max_weight,
        weight_unit=user.weight_unit,
        expected_cohort=cohort,
        sampling_rate=rate,
        amplification=amplification,
    )
