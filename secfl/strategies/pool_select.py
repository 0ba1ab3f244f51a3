"""The pool's per-model convergence test, acceptable set and elimination rule
(CN119005361B, S401-S402 / S405-S406 and the claims' acceptable-set paragraph).

* convergence: a model's test error (1 - accuracy) is at most ``error_bound``, or it moved
  by less than ``tolerance`` (max - min) over its last ``window`` evaluations;
* acceptable set (the claims' confidence region): the models whose test accuracy's
  Clopper-Pearson interval (exact binomial, Clopper and Pearson 1934) at ``confidence``
  overlaps the best model's interval;
* elimination: a model outside the acceptable set goes; of two acceptable models with one
  architecture whose weights have cosine similarity above ``duplicate_cosine``, the less
  accurate goes (ties: the later in the pool).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from secfl.errors import ConfigError


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The two-sided exact binomial interval for ``successes`` of ``trials``."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ConfigError(f"need 0 <= successes <= trials, trials >= 1; got {successes}/{trials}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    upper = (
        1.0
        if successes == trials
        else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return lower, upper


def has_converged(
    errors: Sequence[float], *, error_bound: float, tolerance: float, window: int
) -> bool:
    """S402: the latest test error is within the bound, or the last ``window`` errors span
    less than ``tolerance``."""
    if not errors:
        return False
    if errors[-1] <= error_bound:
        return True
    if len(errors) < window:
        return False
    last = errors[-window:]
    return max(last) - min(last) < tolerance


@dataclass(frozen=True)
class Candidate:
    """A converged model's test outcome and weights (unpadded) for the final selection."""

    name: str
    correct: int
    trials: int
    architecture: str
    weights: np.ndarray


def acceptable_set(
    candidates: Sequence[Candidate], confidence: float
) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """Names whose interval overlaps the best model's, and every model's interval."""
    if not candidates:
        return [], {}
    intervals = {c.name: clopper_pearson(c.correct, c.trials, confidence) for c in candidates}
    best = max(candidates, key=lambda c: c.correct / c.trials)
    lo_best, hi_best = intervals[best.name]
    accepted = [
        c.name
        for c in candidates
        if intervals[c.name][0] <= hi_best and lo_best <= intervals[c.name][1]
    ]
    return accepted, intervals


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


def eliminate(
    candidates: Sequence[Candidate], *, confidence: float, duplicate_cosine: float
) -> tuple[list[str], list[str], dict[str, str], dict[str, tuple[float, float]]]:
    """The acceptable set, the shared models after elimination, why each other model
    went, and every model's interval."""
    accepted, intervals = acceptable_set(candidates, confidence)
    reasons: dict[str, str] = {
        c.name: "test accuracy's Clopper-Pearson interval does not overlap the best model's"
        for c in candidates
        if c.name not in accepted
    }
    by_name: Mapping[str, Candidate] = {c.name: c for c in candidates}
    order = {c.name: i for i, c in enumerate(candidates)}
    # best first, so that of a duplicate pair the better one is kept
    ranked = sorted(accepted, key=lambda n: (-by_name[n].correct / by_name[n].trials, order[n]))
    kept: list[str] = []
    for name in ranked:
        c = by_name[name]
        twin = next(
            (
                k
                for k in kept
                if by_name[k].architecture == c.architecture
                and by_name[k].weights.shape == c.weights.shape
                and cosine(by_name[k].weights, c.weights) > duplicate_cosine
            ),
            None,
        )
        if twin is not None:
            reasons[name] = f"near-duplicate of {twin!r} (cosine > {duplicate_cosine:g})"
        else:
            kept.append(name)
    return accepted, sorted(kept, key=order.__getitem__), reasons, intervals
