"""The built-in poisoning attacks, with their parameters pinned (issue 6, ``docs/attacks.md``).

Statistics of "the benign updates" are computed in float64 over every benign update the
adversary knows: the round's honest updates (omniscient) plus the malicious clients' own
benign updates (the ``benign`` argument). Standard deviations are population ones (ddof 0).
Every crafted update is returned as float32, like a client's update.

Notation: n = participants of the round, f = malicious participants of the round,
mu / sigma = coordinate-wise mean / standard deviation of the benign updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from secfl.attacks.base import AttackContext, register_attack
from secfl.errors import ConfigError, DataError

Updates = Mapping[int, np.ndarray]


def _stack(*groups: Updates) -> np.ndarray:
    rows = [np.asarray(u, dtype=np.float64) for group in groups for _, u in sorted(group.items())]
    if not rows:
        raise ConfigError("an attack needs at least one benign update to craft from")
    return np.stack(rows)


def benign_population(benign: Updates, honest: Updates) -> np.ndarray:
    """Every benign update the adversary knows, as rows: honest (if any) then its own."""
    return _stack(honest, benign)


def honest_or_own(benign: Updates, honest: Updates) -> np.ndarray:
    """The honest updates if the adversary sees them, else its own benign updates."""
    return _stack(honest) if honest else _stack(benign)


def _same_for_all(benign: Updates, vector: np.ndarray) -> dict[int, np.ndarray]:
    out = vector.astype(np.float32)
    return {client: out.copy() for client in benign}


def _number(name: str, value: Any, *, low: float, high: float = math.inf) -> float:
    """``value`` as a float in the open interval (low, high), else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and low < number < high):
        raise ConfigError(f"{name}={value!r} is not allowed: allowed ({low}, {high})")
    return number


# ---------------------------------------------------------------------------- sign flip


@register_attack("sign_flip")
class SignFlip:
    """Each malicious client sends ``scale`` times its own benign update (scale -5)."""

    name = "sign_flip"

    def __init__(self, *, scale: float = -5.0) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale >= 0:
            raise ConfigError(f"sign_flip.scale={scale!r} is not allowed: a negative number")
        self.scale = float(scale)

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, "scale": self.scale}

    def craft(
        self, round_index: int, benign: Updates, honest: Updates, ctx: AttackContext
    ) -> dict[int, np.ndarray]:
        return {
            c: (self.scale * np.asarray(u, dtype=np.float64)).astype(np.float32)
            for c, u in benign.items()
        }


# ---------------------------------------------------------------------------- gaussian


@register_attack("gaussian")
class GaussianNoise:
    """Each malicious client sends an independent draw of N(0, (scale * sigma_j)^2) per
    coordinate j, sigma = coordinate std of the honest updates (omniscient), else of the
    colluders' own benign updates; scale 3. Draws come from the adversary's stream."""

    name = "gaussian"

    def __init__(self, *, scale: float = 3.0) -> None:
        self.scale = _number("gaussian.scale", scale, low=0.0)

    def describe(self) -> dict[str, Any]:
        return {
            "attack": self.name,
            "scale": self.scale,
            "std_of": "honest updates (the colluders' own if not omniscient)",
        }

    def craft(
        self, round_index: int, benign: Updates, honest: Updates, ctx: AttackContext
    ) -> dict[int, np.ndarray]:
        sigma = honest_or_own(benign, honest).std(axis=0)
        ctx.notes["mean_sigma"] = float(sigma.mean())
        return {
            c: (self.scale * sigma * ctx.stream.normal(sigma.size)).astype(np.float32)
            for c in sorted(benign)
        }


# ---------------------------------------------------------------------------- label flip


@register_attack("label_flip")
class LabelFlip:
    """Data attack: the malicious clients train on labels y -> C - 1 - y (9 - y for ten
    classes) and send the update that training gives."""

    name = "label_flip"

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, "mapping": "y -> num_classes - 1 - y"}

    def poison_data(
        self, x: np.ndarray, y: np.ndarray, num_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return x.copy(), (num_classes - 1 - np.asarray(y)).astype(y.dtype)

    def craft(
        self, round_index: int, benign: Updates, honest: Updates, ctx: AttackContext
    ) -> dict[int, np.ndarray]:
        return {c: np.asarray(u, dtype=np.float32).copy() for c, u in benign.items()}


# ---------------------------------------------------------------------------- ALIE


def alie_z_max(n: int, f: int) -> tuple[float, int]:
    """(z_max, s) of Baruch et al. 2019 ("A Little Is Enough", NeurIPS, Sec. 3):
    s = floor(n/2 + 1) - f supporters needed, z_max = Phi^{-1}((n - s) / n).

    A round in which the adversary holds a majority (s < 1) uses s = 1: the formula is not
    defined there, and z_max then keeps every malicious update within the benign spread.
    """
    if n < 1 or f < 0 or f > n:
        raise ConfigError(f"ALIE needs 0 <= f <= n and n >= 1, got n={n}, f={f}")
    s = max(math.floor(n / 2 + 1) - f, 1)
    if s >= n:  # a single participant: (n - s)/n = 0
        return 0.0, s
    return NormalDist().inv_cdf((n - s) / n), s


@register_attack("alie")
class Alie:
    """Baruch et al. 2019: every colluder sends mu - z_max * sigma (coordinate-wise over the
    benign updates), z_max from :func:`alie_z_max` for the round's n and f."""

    name = "alie"

    def __init__(self, *, z: float | None = None) -> None:
        self.z = None if z is None else _number("alie.z", z, low=0.0)

    def describe(self) -> dict[str, Any]:
        return {
            "attack": self.name,
            "z": self.z if self.z is not None else "Phi^-1((n - s)/n), s = floor(n/2+1) - f",
        }

    def craft(
        self, round_index: int, benign: Updates, honest: Updates, ctx: AttackContext
    ) -> dict[int, np.ndarray]:
        population = benign_population(benign, honest)
        if self.z is None:
            z, s = alie_z_max(ctx.num_participants, ctx.num_malicious)
            ctx.notes["s"] = s
        else:
            z = self.z
        ctx.notes["z"] = z
        return _same_for_all(benign, population.mean(axis=0) - z * population.std(axis=0))


# ---------------------------------------------------------------------------- IPM


def ipm_mean_reversing_epsilon(n: int, f: int) -> float:
    """epsilon = 2 (n - f) / f: then f copies of -epsilon * mu_h plus n - f honest updates
    averaging mu_h sum to -(n - f) mu_h, the plain mean of all n is -(n - f)/n * mu_h."""
    if not 0 < f <= n:
        raise ConfigError(f"IPM needs 0 < f <= n, got n={n}, f={f}")
    return 2.0 * (n - f) / f


@register_attack("ipm")
class InnerProductManipulation:
    """Xie, Koyejo and Gupta 2020 (inner-product manipulation, UAI 2019 / PMLR 115): every
    colluder sends -epsilon * mu_h, mu_h = mean of the honest updates (omniscient; else of
    the colluders' own). ``epsilon``: a positive number (0.5) or ``"mean_reversing"``, which
    uses :func:`ipm_mean_reversing_epsilon` for the round's n and f."""

    name = "ipm"

    def __init__(self, *, epsilon: float | str = 0.5) -> None:
        if epsilon != "mean_reversing":
            epsilon = _number("ipm.epsilon ('mean_reversing' or a number)", epsilon, low=0.0)
        self.epsilon: float | str = epsilon

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attack": self.name, "epsilon": self.epsilon}
        if self.epsilon == "mean_reversing":
            out["epsilon_formula"] = "2 (n - f) / f"
        return out

    def craft(
        self, round_index: int, benign: Updates, honest: Updates, ctx: AttackContext
    ) -> dict[int, np.ndarray]:
        if isinstance(self.epsilon, str):
            epsilon = ipm_mean_reversing_epsilon(ctx.num_participants, ctx.num_malicious)
        else:
            epsilon = self.epsilon
        ctx.notes["epsilon"] = epsilon
        return _same_for_all(benign, -epsilon * honest_or_own(benign, honest).mean(axis=0))


# ---------------------------------------------------------------------------- min-max / min-sum

Perturbation = Literal["unit", "std", "sign"]
PERTURBATIONS: tuple[Perturbation, ...] = ("unit", "std", "sign")
Rule = Literal["min_max", "min_sum"]


def perturbation_vector(kind: str, population: np.ndarray) -> np.ndarray:
    """p of Shejwalkar and Houmansadr 2021 (Sec. IV-B): unit -mu/||mu||, std -sigma,
    sign -sign(mu) (a zero mean gives the zero vector)."""
    mu = population.mean(axis=0)
    if kind == "unit":
        norm = float(np.linalg.norm(mu))
        return -mu / norm if norm > 0 else np.zeros_like(mu)
    if kind == "std":
        return -population.std(axis=0)
    if kind == "sign":
        return -np.sign(mu)
    raise ConfigError(f"perturbation {kind!r} is not allowed: one of {list(PERTURBATIONS)}")


def _squared_distances(rows: np.ndarray, point: np.ndarray) -> np.ndarray:
    diff = rows - point
    return np.einsum("ij,ij->i", diff, diff)


def pairwise_squared_distances(rows: np.ndarray) -> np.ndarray:
    """||b_i - b_j||^2 for every pair of rows (float64, via the Gram matrix, clipped >= 0)."""
    sq = np.einsum("ij,ij->i", rows, rows)
    gram = rows @ rows.T
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def agr_agnostic_bound(rule: str, population: np.ndarray) -> float:
    """The right-hand side of the constraint, in squared distances: min-max
    max_{i,j} ||b_i - b_j||^2; min-sum max_i sum_j ||b_i - b_j||^2."""
    pairwise = pairwise_squared_distances(population)
    if rule == "min_max":
        return float(pairwise.max())
    if rule == "min_sum":
        return float(pairwise.sum(axis=1).max())
    raise ConfigError(f"rule {rule!r} is not allowed: 'min_max' or 'min_sum'")


def agr_agnostic_score(rule: str, population: np.ndarray, malicious: np.ndarray) -> float:
    """The left-hand side: min-max max_i ||mal - b_i||^2; min-sum sum_i ||mal - b_i||^2."""
    distances = _squared_distances(population, malicious)
    return float(distances.max() if rule == "min_max" else distances.sum())


def search_gamma(
    rule: str,
    population: np.ndarray,
    perturbation: np.ndarray,
    *,
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> tuple[float, bool]:
    """(gamma, saturated): the largest gamma found with mal = mu + gamma * p within the
    rule's bound, by the halving search of Shejwalkar and Houmansadr (Algorithm 1 and their
    code): gamma starts at ``gamma_init`` with step ``gamma_init / 2``; a success moves up
    by the step, a failure down, the step halves, and the search stops once the last
    success and the next candidate differ by at most ``tolerance``. It explores
    [0, 2 gamma_init); ``saturated`` says every test succeeded (gamma* may be larger)."""
    mu = population.mean(axis=0)
    bound = agr_agnostic_bound(rule, population)
    gamma, step, success = gamma_init, gamma_init / 2.0, 0.0
    failed = False
    while abs(success - gamma) > tolerance:
        if agr_agnostic_score(rule, population, mu + gamma * perturbation) <= bound:
            success = gamma
            gamma += step
        else:
            failed = True
            gamma -= step
        step /= 2.0
    return success, not failed


class _AgrAgnostic:
    """Shejwalkar and Houmansadr, NDSS 2021, AGR-agnostic attacks: every colluder sends
    mu + gamma * p; ``perturbation`` ``worst`` tries unit, std and sign and keeps the one
    with the largest ||mal - mu|| = gamma * ||p||."""

    name: str
    rule: Rule

    def __init__(
        self, *, perturbation: str = "worst", gamma_init: float = 10.0, tolerance: float = 1e-5
    ) -> None:
        if perturbation != "worst" and perturbation not in PERTURBATIONS:
            raise ConfigError(
                f"{self.name}.perturbation={perturbation!r} is not allowed: one of "
                f"{['worst', *PERTURBATIONS]}"
            )
        self.perturbation = perturbation
        self.gamma_init = _number(f"{self.name}.gamma_init", gamma_init, low=0.0)
        self.tolerance = _number(f"{self.name}.tolerance", tolerance, low=0.0, high=1.0)

    def describe(self) -> dict[str, Any]:
        return {
            "attack": self.name,
            "perturbation": self.perturbation,
            "worst_by": "largest ||mal - mu||" if self.perturbation == "worst" else None,
            "gamma_init": self.gamma_init,
            "tolerance": self.tolerance,
        }

    def craft_vector(self, population: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The malicious vector for this benign population, and what was chosen."""
        mu = population.mean(axis=0)
        kinds = PERTURBATIONS if self.perturbation == "worst" else (self.perturbation,)
        best: tuple[float, np.ndarray, dict[str, Any]] | None = None
        for kind in kinds:
            p = perturbation_vector(kind, population)
            gamma, saturated = search_gamma(
                self.rule, population, p, gamma_init=self.gamma_init, tolerance=self.tolerance
            )
            deviation = gamma * float(np.linalg.norm(p))
            if best is None or deviation > best[0]:
                info = {"perturbation": kind, "gamma": gamma, "deviation": deviation}
                if saturated:
                    info["gamma_saturated"] = True
                best = (deviation, mu + gamma * p, info)
        if best is None:  # pragma: no cover - kinds is never empty
            raise ConfigError("no perturbation to try")
        return best[1], best[2]

    def craft(
        self, round_index: int, benign: Updates, honest: Updates, ctx: AttackContext
    ) -> dict[int, np.ndarray]:
        vector, info = self.craft_vector(benign_population(benign, honest))
        ctx.notes.update(info)
        return _same_for_all(benign, vector)


@register_attack("min_max")
class MinMax(_AgrAgnostic):
    """Constraint: max_i ||mal - b_i|| <= max_{i,j} ||b_i - b_j||."""

    name = "min_max"
    rule: Rule = "min_max"


@register_attack("min_sum")
class MinSum(_AgrAgnostic):
    """Constraint: sum_i ||mal - b_i||^2 <= max_i sum_j ||b_i - b_j||^2."""

    name = "min_sum"
    rule: Rule = "min_sum"


# ---------------------------------------------------------------------------- backdoor


def apply_trigger(x: np.ndarray, *, value: float = 1.0, size: int = 2) -> np.ndarray:
    """A copy of inputs ``x`` (a batch) with the trigger stamped on every record.

    Images ``(n, C, H, W)``: the ``size`` x ``size`` top-left corner of every channel is set
    to ``value`` (digits: pixels (0,0), (0,1), (1,0), (1,1) set to 1.0, the top of its [0, 1]
    scale). Signals ``(n, C, L)`` and feature rows ``(n, L)``: the first ``size`` samples.
    """
    x = np.asarray(x)
    if x.ndim == 4:
        if x.shape[2] < size or x.shape[3] < size:
            raise DataError(f"backdoor trigger of size {size} does not fit images {x.shape[1:]}")
        out = x.copy()
        out[:, :, :size, :size] = value
        return out
    if x.ndim in (2, 3):
        if x.shape[-1] < size:
            raise DataError(f"backdoor trigger of size {size} does not fit inputs {x.shape[1:]}")
        out = x.copy()
        out[..., :size] = value
        return out
    raise DataError(
        f"backdoor trigger: inputs of shape {x.shape[1:]} are not supported; allowed "
        "(C, H, W) images, (C, L) signals or (L,) feature rows"
    )


@register_attack("backdoor")
class ModelReplacementBackdoor:
    """Bagdasaryan et al. 2020 (AISTATS, "How to backdoor federated learning"), model
    replacement: the malicious clients stamp a ``trigger_size`` x ``trigger_size`` corner
    trigger (:func:`apply_trigger`) on a ``poison_fraction`` of their records and relabel them
    ``target``, train, and send their update boosted by ``boost`` (default n/f of the round,
    so that the plain mean of the updates is about the backdoored update)."""

    name = "backdoor"

    def __init__(
        self,
        *,
        target: int = 0,
        poison_fraction: float = 0.5,
        trigger_value: float = 1.0,
        trigger_size: int = 2,
        boost: float | None = None,
    ) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ConfigError(f"backdoor.target={target!r} is not allowed: a class index >= 0")
        if isinstance(trigger_size, bool) or not isinstance(trigger_size, int) or trigger_size < 1:
            raise ConfigError(f"backdoor.trigger_size={trigger_size!r} is not allowed: >= 1")
        if isinstance(trigger_value, bool) or not isinstance(trigger_value, int | float):
            raise ConfigError(f"backdoor.trigger_value must be a number, got {trigger_value!r}")
        self.target = target
        self.poison_fraction = _number("backdoor.poison_fraction", poison_fraction, low=0.0)
        if self.poison_fraction > 1.0:
            raise ConfigError(
                f"backdoor.poison_fraction={poison_fraction!r} is not allowed: (0, 1]"
            )
        self.trigger_value = float(trigger_value)
        self.trigger_size = trigger_size
        self.boost = None if boost is None else _number("backdoor.boost", boost, low=0.0)

    def describe(self) -> dict[str, Any]:
        return {
            "attack": self.name,
            "target": self.target,
            "poison_fraction": self.poison_fraction,
            "trigger": f"{self.trigger_size}x{self.trigger_size} top-left corner",
            "trigger_value": self.trigger_value,
            "boost": self.boost if self.boost is not None else "n/f",
        }

    def apply_trigger(self, x: np.ndarray) -> np.ndarray:
        """Triggered copies of ``x`` (for training the backdoor and for measuring it)."""
        return apply_trigger(x, value=self.trigger_value, size=self.trigger_size)

    def poisoned_indices(self, num_records: int) -> np.ndarray:
        """The records that carry the trigger: ceil(fraction * m) evenly spaced indices
        (deterministic, so every class a client holds is hit in proportion)."""
        count = min(num_records, math.ceil(self.poison_fraction * num_records))
        return np.floor(np.arange(count) * (num_records / max(count, 1))).astype(np.int64)

    def poison_data(
        self, x: np.ndarray, y: np.ndarray, num_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.target >= num_classes:
            raise ConfigError(
                f"backdoor.target={self.target} is not a class of a {num_classes}-class dataset"
            )
        index = self.poisoned_indices(len(y))
        x_out, y_out = np.array(x, copy=True), np.array(y, copy=True)
        x_out[index] = self.apply_trigger(x[index])
        y_out[index] = self.target
        return x_out, y_out

    def craft(
        self, round_index: int, benign: Updates, honest: Updates, ctx: AttackContext
    ) -> dict[int, np.ndarray]:
        boost = self.boost if self.boost is not None else ctx.num_participants / ctx.num_malicious
        ctx.notes["boost"] = boost
        return {
            c: (boost * np.asarray(u, dtype=np.float64)).astype(np.float32)
            for c, u in benign.items()
        }
