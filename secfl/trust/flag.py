"""Compare participants with the trusted party and flag outliers (DESIGN 4).

Three metrics per participant i against the trusted party t: ``cosine`` (direction),
``distance`` = ||u_i - u_t|| and ``norm_ratio`` = ||u_i|| / ||u_t|| (boosted updates). A
threshold is either fixed, or robust over the round: median -+ k * s with
s = max(1.4826 * MAD, floor), the 1.4826 making MAD a consistent estimate of a Gaussian's
standard deviation (Rousseeuw and Croux 1993). Cosine is flagged below its threshold,
distance and norm ratio above. The centre and spread are estimated on a *population* the
caller chooses (the participants the server's reference vouches for), so colluders cannot
drag the threshold towards themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from secfl.errors import ConfigError

#: Consistency constant: 1.4826 * MAD estimates sigma for Gaussian data.
MAD_SCALE = 1.4826
#: Direction of each metric: a participant is flagged below ("min") or above ("max").
METRIC_BOUND = {"cosine": "min", "distance": "max", "norm_ratio": "max"}


def _norms(updates: np.ndarray) -> np.ndarray:
    return np.linalg.norm(updates.astype(np.float64, copy=False), axis=1)


def cosine_matrix(updates: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``updates`` (a zero row has cosine 0)."""
    x = updates.astype(np.float64, copy=False)
    norms = _norms(x)
    safe = np.where(norms > 0, norms, 1.0)
    unit = x / safe[:, None]
    out = unit @ unit.T
    out[norms == 0, :] = 0.0
    out[:, norms == 0] = 0.0
    return np.clip(out, -1.0, 1.0)


def cosine_with(updates: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Cosine of every row of ``updates`` with ``anchor`` (0 where either is zero)."""
    a = anchor.astype(np.float64, copy=False)
    a_norm = float(np.linalg.norm(a))
    norms = _norms(updates)
    dots = updates.astype(np.float64, copy=False) @ a
    denom = norms * a_norm
    return np.clip(np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0), -1.0, 1.0)


def compare_with(
    updates: np.ndarray, anchor: np.ndarray, metrics: Sequence[str]
) -> dict[str, np.ndarray]:
    """The requested metrics of every row of ``updates`` against ``anchor``."""
    out: dict[str, np.ndarray] = {}
    for name in metrics:
        if name == "cosine":
            out[name] = cosine_with(updates, anchor)
        elif name == "distance":
            diff = updates.astype(np.float64) - anchor.astype(np.float64)[None, :]
            out[name] = np.linalg.norm(diff, axis=1)
        elif name == "norm_ratio":
            a_norm = float(np.linalg.norm(anchor.astype(np.float64)))
            out[name] = _norms(updates) / max(a_norm, np.finfo(np.float64).tiny)
        else:
            raise ConfigError(f"trust.compare.metrics: unknown metric {name!r}")
    return out


@dataclass(frozen=True)
class Threshold:
    """One metric's bound: flag below ``value`` (``bound="min"``) or above (``"max"``)."""

    metric: str
    bound: str
    value: float
    how: str

    def violated(self, x: float) -> bool:
        return x < self.value if self.bound == "min" else x > self.value

    def describe(self) -> dict[str, object]:
        return {"metric": self.metric, "bound": self.bound, "value": self.value, "how": self.how}


def robust_thresholds(
    values: Mapping[str, np.ndarray],
    population: np.ndarray,
    *,
    k: float,
    min_spread: float,
) -> dict[str, Threshold]:
    """median -+ k * max(1.4826 MAD, floor) per metric, over ``values[m][population]``.

    The floor is ``min_spread`` for cosine and ``min_spread * |median|`` for the scale-
    dependent metrics, so a round of nearly identical honest updates does not flag tiny,
    harmless differences."""
    out: dict[str, Threshold] = {}
    for metric, column in values.items():
        sample = column[population]
        if sample.size == 0:
            continue
        centre = float(np.median(sample))
        spread = MAD_SCALE * float(np.median(np.abs(sample - centre)))
        floor = min_spread if metric == "cosine" else min_spread * abs(centre)
        spread = max(spread, floor)
        bound = METRIC_BOUND[metric]
        value = centre - k * spread if bound == "min" else centre + k * spread
        how = f"median {centre:.4g} {'-' if bound == 'min' else '+'} {k:g} x spread {spread:.4g}"
        out[metric] = Threshold(metric, bound, value, how)
    return out


def fixed_thresholds(
    *,
    cosine_min: float | None,
    distance_max: float | None,
    norm_ratio_max: float | None,
    metrics: Sequence[str],
) -> dict[str, Threshold]:
    """The configured bounds for the compared metrics (a metric without a bound is free)."""
    given = {"cosine": cosine_min, "distance": distance_max, "norm_ratio": norm_ratio_max}
    return {
        m: Threshold(m, METRIC_BOUND[m], float(v), "fixed")
        for m, v in given.items()
        if v is not None and m in metrics
    }


def flag_outliers(
    values: Mapping[str, np.ndarray],
    thresholds: Mapping[str, Threshold],
    *,
    exempt: Sequence[int] = (),
    against: str = "the trusted party",
) -> dict[int, str]:
    """Indices whose metric violates a threshold, with a reason naming metric and bound."""
    n = len(next(iter(values.values()))) if values else 0
    flagged: dict[int, str] = {}
    for i in range(n):
        if i in exempt:
            continue
        reasons = []
        for metric, threshold in thresholds.items():
            x = float(values[metric][i])
            if threshold.violated(x):
                side = "below" if threshold.bound == "min" else "above"
                reasons.append(
                    f"{metric} {x:.4g} against {against} is {side} the threshold "
                    f"{threshold.value:.4g} ({threshold.how})"
                )
        if reasons:
            flagged[i] = "; ".join(reasons)
    return flagged
