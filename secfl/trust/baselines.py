"""Classic robust aggregators, the baselines the voted defense is compared against.

Each takes the round's updates as rows of an (n, d) array and returns a
:class:`RobustResult`: the aggregate (float64), the rows that contributed and, for the rows
that did not, why. They are sans-I/O and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from secfl.errors import ConfigError, UpdateError
from secfl.trust.flag import cosine_with


@dataclass(frozen=True, eq=False)
class RobustResult:
    aggregate: np.ndarray
    #: Row indices that contributed to the aggregate.
    selected: tuple[int, ...]
    #: Row index -> why it did not contribute.
    excluded: dict[int, str] = field(default_factory=dict)
    #: Per-row scores or weights the rule computed (for the event log).
    scores: np.ndarray | None = None


def _rows(updates: np.ndarray) -> np.ndarray:
    if updates.ndim != 2 or updates.shape[0] < 1:
        raise UpdateError(f"robust aggregation needs an (n >= 1, d) array, got {updates.shape}")
    return updates.astype(np.float64, copy=False)


def _squared_distances(x: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def max_tolerated_f(n: int) -> int:
    """The most Byzantine clients Krum tolerates among n: n > 2f + 2."""
    return max((n - 3) // 2, 0)


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each row: the sum of squared distances to its n - f - 2 nearest
    other rows (Blanchard, El Mhamdi, Guerraoui and Stainer, NeurIPS 2017, Sec. 4)."""
    x = _rows(updates)
    n = x.shape[0]
    if f < 0:
        raise ConfigError(f"trust.robust.f must be >= 0, got {f}")
    neighbours = min(max(n - f - 2, 1), n - 1)
    if n == 1:
        return np.zeros(1)
    d = _squared_distances(x)
    np.fill_diagonal(d, np.inf)
    nearest = np.sort(d, axis=1)[:, :neighbours]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


def krum(updates: np.ndarray, *, f: int) -> RobustResult:
    """Krum: the single row with the lowest score (ties: the lowest index). Requires
    n > 2f + 2 for its guarantee; a larger f than the round tolerates is the caller's to
    clamp (:func:`max_tolerated_f`)."""
    scores = krum_scores(updates, f)
    best = int(np.argmin(scores))
    excluded = {
        i: f"not selected by Krum (score {scores[i]:.4g} > {scores[best]:.4g}, f={f})"
        for i in range(len(scores))
        if i != best
    }
    return RobustResult(updates[best].astype(np.float64), (best,), excluded, scores)


def multi_krum(
    updates: np.ndarray, weights: np.ndarray, *, f: int, m: int | None = None
) -> RobustResult:
    """Multi-Krum: the ``m`` rows with the lowest Krum scores (default n - f), averaged with
    the sample weights ``weights`` as FedAvg would (Blanchard et al. 2017, Sec. 5)."""
    scores = krum_scores(updates, f)
    n = len(scores)
    count = n - f if m is None else m
    if not 1 <= count <= n:
        raise ConfigError(f"trust.robust.multi_krum_m must be in [1, {n}], got {count}")
    order = np.argsort(scores, kind="stable")
    chosen = np.sort(order[:count])
    w = np.asarray(weights, dtype=np.float64)[chosen]
    aggregate = (w[:, None] * _rows(updates)[chosen]).sum(axis=0) / w.sum()
    cut = scores[order[count - 1]]
    excluded = {
        int(i): f"not selected by Multi-Krum (score {scores[i]:.4g} > {cut:.4g}, m={count})"
        for i in order[count:]
    }
    return RobustResult(aggregate, tuple(int(i) for i in chosen), excluded, scores)


def coordinate_median(updates: np.ndarray) -> RobustResult:
    """Coordinate-wise median (Yin, Chen, Ramchandran and Bartlett, ICML 2018, Sec. 3)."""
    x = _rows(updates)
    return RobustResult(np.median(x, axis=0), tuple(range(x.shape[0])))


def trimmed_mean(updates: np.ndarray, *, beta: float) -> RobustResult:
    """Coordinate-wise beta-trimmed mean: per coordinate drop the floor(beta n) largest and
    smallest values and average the rest (Yin et al. 2018, Sec. 3)."""
    x = _rows(updates)
    n = x.shape[0]
    if not 0.0 <= beta < 0.5:
        raise ConfigError(f"trust.robust.trim_beta must be in [0, 0.5), got {beta}")
    cut = int(np.floor(beta * n))
    if n - 2 * cut < 1:
        cut = (n - 1) // 2
    ordered = np.sort(x, axis=0)
    return RobustResult(ordered[cut : n - cut].mean(axis=0), tuple(range(n)))


def centered_clipping(
    updates: np.ndarray,
    *,
    center: np.ndarray,
    tau: float | None = None,
    iterations: int = 1,
) -> RobustResult:
    """Centered clipping (Karimireddy, He and Jaggi, ICML 2021, Alg. 2): starting from
    ``center`` (the previous round's aggregate), ``iterations`` times
    v <- v + mean_i (x_i - v) min(1, tau / ||x_i - v||). ``tau`` ``None`` uses the median
    distance of the rows to the starting centre (an adaptive radius)."""
    x = _rows(updates)
    v = np.array(center, dtype=np.float64)
    if v.shape != (x.shape[1],):
        raise UpdateError(f"centered clipping centre has shape {v.shape}, expected ({x.shape[1]},)")
    if iterations < 1:
        raise ConfigError(f"trust.robust.clip_iterations must be >= 1, got {iterations}")
    if tau is None:
        tau = float(np.median(np.linalg.norm(x - v[None, :], axis=1)))
    if not tau >= 0:
        raise ConfigError(f"trust.robust.clip_tau must be > 0, got {tau}")
    for _ in range(iterations):
        diff = x - v[None, :]
        dist = np.linalg.norm(diff, axis=1)
        scale = np.where(dist > tau, tau / np.where(dist > 0, dist, 1.0), 1.0)
        v = v + (diff * scale[:, None]).mean(axis=0)
    return RobustResult(v, tuple(range(x.shape[0])))


def fltrust(updates: np.ndarray, *, reference: np.ndarray) -> RobustResult:
    """FLTrust (Cao, Fang, Liu and Gong, NDSS 2021, Alg. 1): trust score
    ReLU(cos(x_i, g0)) with the server's root update g0, each x_i rescaled to ||g0||, the
    aggregate sum_i s_i (||g0|| / ||x_i||) x_i / sum_i s_i. Rows with score 0 are excluded;
    if every score is 0 the aggregate is zero (the model does not move)."""
    x = _rows(updates)
    g0 = np.asarray(reference, dtype=np.float64)
    scores = np.maximum(cosine_with(x, g0), 0.0)
    norms = np.linalg.norm(x, axis=1)
    g_norm = float(np.linalg.norm(g0))
    selected = tuple(int(i) for i in np.flatnonzero(scores > 0))
    excluded = {
        i: f"FLTrust weight 0: cosine with the reference {c:.4g} <= 0"
        for i, c in enumerate(cosine_with(x, g0))
        if scores[i] <= 0
    }
    if not selected:
        return RobustResult(np.zeros(x.shape[1]), (), excluded, scores)
    rescaled = x * (g_norm / np.where(norms > 0, norms, 1.0))[:, None]
    aggregate = (scores[:, None] * rescaled).sum(axis=0) / scores.sum()
    return RobustResult(aggregate, selected, excluded, scores)
