"""The memorisation check run whenever synthetic data is made (DESIGN 5).

For every synthetic sample, the Euclidean distance to its nearest real training record; for
held-out test records, the same distance to the training records. The statistic is the ratio
of the medians, synthetic over test. A ratio below 1 means the synthetic samples sit closer
to the training records than unseen records from the same distribution do: the inversion
reproduces training records (a privacy regression), and the run says so.

The check needs the training records, so it is the experimenter's measurement in simulation
(like test accuracy); nothing here is computed by or sent to the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def nearest_distances(queries: np.ndarray, records: np.ndarray, *, chunk: int = 512) -> np.ndarray:
    """Distance from each query row to its nearest row of ``records`` (inputs flattened)."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    r = records.reshape(len(records), -1).astype(np.float64)
    r_sq = (r**2).sum(axis=1)
    out = np.empty(len(q))
    for start in range(0, len(q), chunk):
        block = q[start : start + chunk]
        d2 = (block**2).sum(axis=1)[:, None] - 2.0 * block @ r.T + r_sq[None, :]
        out[start : start + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


@dataclass(frozen=True)
class MemorisationReport:
    synthetic_median: float
    test_median: float
    ratio: float
    #: True when the synthetic set is closer to the training records than test records are.
    regression: bool

    def to_dict(self) -> dict[str, float | bool]:
        return {
            "synthetic_to_train_median": self.synthetic_median,
            "test_to_train_median": self.test_median,
            "ratio": self.ratio,
            "regression": self.regression,
        }


def memorisation_check(
    synthetic: np.ndarray, train: np.ndarray, test: np.ndarray
) -> MemorisationReport:
    """Median nearest-train distance of ``synthetic`` over that of ``test`` (see above)."""
    if len(synthetic) == 0 or len(train) == 0 or len(test) == 0:
        raise ValueError("the memorisation check needs synthetic, training and test records")
    syn = float(np.median(nearest_distances(synthetic, train)))
    ref = float(np.median(nearest_distances(test, train)))
    ratio = syn / ref if ref > 0 else (float("inf") if syn > 0 else 0.0)
    return MemorisationReport(syn, ref, ratio, regression=ratio < 1.0)
