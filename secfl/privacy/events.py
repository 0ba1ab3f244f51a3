"""DP events: frozen records of what one privacy mechanism cost.

Every mechanism in secfl returns a :class:`DpEvent` (STYLE habit 2); the ledger composes them
with a library accountant. An event's meaning never changes after it is written (as in
Google's ``dp_accounting`` ``DpEvent``): it records the mechanism and its parameters, never an
epsilon, so any accountant can re-derive the cost later and an auditor can check it.

The one mechanism family the foundation needs is the (Poisson-)subsampled Gaussian:
``steps`` releases, each adding N(0, (noise_multiplier * sensitivity)^2) per coordinate to a
sum whose L2 sensitivity is ``sensitivity``, each record (sample level) or client (user
level) included independently with probability ``sampling_rate`` (Abadi et al. 2016;
Mironov 2017; Zhu & Wang 2019).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from secfl.errors import PrivacyError

Level = Literal["sample", "user"]
Amplification = Literal["poisson", "none"]

#: Mechanisms the registered accountants understand.
MECHANISMS = frozenset({"subsampled_gaussian"})


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

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise actually added to the sum."""
        return self.noise_multiplier * self.sensitivity

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "noise_std": self.noise_std}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DpEvent:
        fields = {k: v for k, v in raw.items() if k != "noise_std"}
        return cls(**fields)
