"""DP events: frozen records of what one privacy mechanism cost.

Every mechanism in secfl returns a :class:`DpEvent` (STYLE habit 2); the ledger composes them
with a library accountant. An event's meaning never changes after it is written (as in
Google's ``dp_accounting`` ``DpEvent``): it records the mechanism and its parameters, never an
epsilon, so any accountant can re-derive the cost later and an auditor can check it.

Two mechanism families:

* ``subsampled_gaussian``: ``steps`` releases, each adding N(0, (noise_multiplier *
  sensitivity)^2) per coordinate to a sum whose L2 sensitivity is ``sensitivity``, each record
  (sample level) or client (user level) included independently with probability
  ``sampling_rate`` (Abadi et al. 2016; Mironov 2017; Zhu & Wang 2019).
* ``skellam``: the same shape with integer noise Sk(mu, mu) = Poisson(mu) - Poisson(mu) per
  coordinate of an integer-valued sum (distributed DP under secure aggregation; Agarwal,
  Kairouz & Liu 2021). Its variance 2 mu equals (noise_multiplier * sensitivity)^2, where
  ``sensitivity`` is the integer-domain L2 sensitivity D2 and ``l1_sensitivity`` the L1
  sensitivity D1 (the RDP bound needs both; see :mod:`secfl.privacy.discrete`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from secfl.errors import PrivacyError

Level = Literal["sample", "user"]
Amplification = Literal["poisson", "none"]

#: Mechanisms a DP event may record (which accountant handles which: ``AccountantSpec``).
MECHANISMS = frozenset({"subsampled_gaussian", "skellam"})

#: A round's auxiliary releases (refinement's statistics rounds) run as attempt
#: ``STATS_ATTEMPT_OFFSET + a`` of round attempt ``a``, so their keys, masks and noise streams
#: never coincide with the training attempt's; the ledger books them with attempt ``a``'s row.
STATS_ATTEMPT_OFFSET = 1 << 20

#: Keys :meth:`DpEvent.to_dict` derives from the fields; :meth:`DpEvent.from_dict` drops them.
_DERIVED_KEYS = frozenset({"noise_std", "skellam_mu"})


@dataclass(frozen=True)
class DpEvent:
    """What one mechanism invocation cost; ``party`` is ``client:<id>`` or ``server``."""

    mechanism: str
    noise_multiplier: float
    sampling_rate: float
    steps: int
    sensitivity: float
    level: Level
    round: int
    party: str
    attempt: int = 0
    #: How ``sampling_rate`` came about; amplification is claimed only for ``poisson``.
    amplification: Amplification = "poisson"
    #: L1 sensitivity D1 of the integer-valued sum; required for ``skellam``, else None.
    l1_sensitivity: float | None = None

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise PrivacyError(
                f"DP event mechanism {self.mechanism!r} is unknown; known: {sorted(MECHANISMS)}"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise PrivacyError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.steps < 0:
            raise PrivacyError(f"steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise PrivacyError(f"sensitivity must be > 0, got {self.sensitivity}")
        if self.level not in ("sample", "user"):
            raise PrivacyError(f"level must be 'sample' or 'user', got {self.level!r}")
        if self.amplification not in ("poisson", "none"):
            raise PrivacyError(
                f"amplification must be 'poisson' or 'none', got {self.amplification!r}"
            )
        if self.amplification == "none" and self.sampling_rate != 1.0:
            raise PrivacyError("an event without amplification must have sampling_rate 1.0")
        if self.mechanism == "skellam":
            l1 = self.l1_sensitivity
            if l1 is None or not (math.isfinite(l1) and l1 > 0):
                raise PrivacyError(
                    f"a skellam event needs l1_sensitivity > 0 (the L1 sensitivity D1 of the "
                    f"integer-valued sum), got {l1!r}"
                )
            if l1 < self.sensitivity:
                raise PrivacyError(
                    f"l1_sensitivity {l1} is below the L2 sensitivity {self.sensitivity}: "
                    "an L1 bound is never smaller than the L2 bound of the same vectors"
                )
        elif self.l1_sensitivity is not None:
            raise PrivacyError(
                f"l1_sensitivity applies only to skellam events; a {self.mechanism} event "
                f"must leave it None, got {self.l1_sensitivity!r}"
            )

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise actually added to the sum."""
        return self.noise_multiplier * self.sensitivity

    @property
    def skellam_mu(self) -> float:
        """Mean of each Poisson in the aggregate Sk(mu, mu) noise: mu = noise_std^2 / 2."""
        if self.mechanism != "skellam":
            raise PrivacyError(f"skellam_mu is defined for skellam events, not {self.mechanism}")
        return self.noise_std**2 / 2.0

    def to_dict(self) -> dict[str, Any]:
        """Fields plus derived values; a Gaussian event's dict is unchanged by the optional
        ``l1_sensitivity`` (left out while None), so old logs and new ones read alike."""
        raw = asdict(self)
        if raw["l1_sensitivity"] is None:
            del raw["l1_sensitivity"]
        raw["noise_std"] = self.noise_std
        if self.mechanism == "skellam":
            raw["skellam_mu"] = self.skellam_mu
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DpEvent:
        fields = {k: v for k, v in raw.items() if k not in _DERIVED_KEYS}
        return cls(**fields)
