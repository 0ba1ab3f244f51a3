"""Accountants: library implementations composed over a list of :class:`DpEvent`.

No privacy maths is written here; each accountant translates events into its library's
terms and asks the library for epsilon:

* ``opacus_prv`` — Opacus ``PRVAccountant``, privacy random variables (Gopi, Lee & Wutschitz
  2021); the default for sample-level DP-SGD.
* ``opacus_rdp`` — Opacus ``RDPAccountant``, Rényi DP of the subsampled Gaussian (Mironov
  2017; Mironov, Talwar & Zhang 2019).
* ``dpa_pld`` — Google ``dp_accounting`` privacy-loss-distribution accountant; the default
  for Gaussian user-level events.
* ``dpa_rdp`` — Google ``dp_accounting`` ``RdpAccountant`` (Zhu & Wang 2019 for Poisson
  subsampling).

Composition is commutative, so events with the same (noise multiplier, sampling rate) are
merged by summing their steps before the library sees them: the value is the same and the
libraries run faster. ``amplified=False`` accounts every event as if its sampling rate were 1
(the figure against parties who know who was sampled). Results are memoised per
(accountant, merged history, delta), so a client's cumulative epsilon is recomputed from its
full history every round without paying for the same history twice.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from secfl.errors import PrivacyError
from secfl.privacy.events import DpEvent

#: One library call's input: ((noise_multiplier, sampling_rate, steps), ...), sorted.
History = tuple[tuple[float, float, int], ...]


def merged_history(events: Sequence[DpEvent], *, amplified: bool = True) -> History:
    """Events grouped by (noise multiplier, sampling rate) with their steps summed."""
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        if event.mechanism != "subsampled_gaussian":
            raise PrivacyError(f"no registered accountant handles mechanism {event.mechanism!r}")
        if event.steps == 0:
            continue
        q = event.sampling_rate if amplified else 1.0
        key = (float(event.noise_multiplier), float(q))
        steps[key] = steps.get(key, 0) + int(event.steps)
    return tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))


@dataclass(frozen=True)
class AccountantSpec:
    name: str
    library: str
    summary: str
    epsilon: Callable[[History, float], float]


def _opacus_epsilon(mechanism: str, history: History, delta: float) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = PRVAccountant() if mechanism == "prv" else RDPAccountant()
    accountant.history = [(s, q, n) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def _dpa_event(history: History):  # type: ignore[no-untyped-def]
    import dp_accounting as dpa

    parts = []
    for sigma, q, n in history:
        single = dpa.GaussianDpEvent(sigma)
        if q < 1.0:
            single = dpa.PoissonSampledDpEvent(q, single)
        parts.append(dpa.SelfComposedDpEvent(single, n))
    return dpa.ComposedDpEvent(parts)


def _dpa_epsilon(mechanism: str, history: History, delta: float) -> float:
    import dp_accounting as dpa

    accountant = dpa.pld.PLDAccountant() if mechanism == "pld" else dpa.rdp.RdpAccountant()
    accountant.compose(_dpa_event(history))
    return float(accountant.get_epsilon(delta))


_REGISTRY: dict[str, AccountantSpec] = {}


def register_accountant(spec: AccountantSpec) -> None:
    """Add an accountant to the registry (later: discrete-mechanism bounds)."""
    _REGISTRY[spec.name] = spec


for _spec in (
    AccountantSpec(
        "opacus_prv", "opacus", "PRV (Gopi et al. 2021)", functools.partial(_opacus_epsilon, "prv")
    ),
    AccountantSpec(
        "opacus_rdp", "opacus", "RDP (Mironov 2017)", functools.partial(_opacus_epsilon, "rdp")
    ),
    AccountantSpec(
        "dpa_pld", "dp_accounting", "PLD (dp-accounting)", functools.partial(_dpa_epsilon, "pld")
    ),
    AccountantSpec(
        "dpa_rdp", "dp_accounting", "RDP (Zhu & Wang 2019)", functools.partial(_dpa_epsilon, "rdp")
    ),
):
    register_accountant(_spec)

ACCOUNTANT_NAMES = ("opacus_prv", "opacus_rdp", "dpa_pld", "dpa_rdp")


def accountant(name: str) -> AccountantSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise PrivacyError(f"unknown accountant {name!r}; registered: {sorted(_REGISTRY)}")
    return spec


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(name: str, history: History, delta: float) -> float:
    if not history:
        return 0.0
    # Opacus' RDP helper logs non-convergence warnings for tiny orders; they are excluded
    # orders, not errors, and would flood the console every round.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return accountant(name).epsilon(history, delta)
    finally:
        logger.setLevel(level)


def epsilon(name: str, events: Sequence[DpEvent], delta: float, *, amplified: bool = True) -> float:
    """Epsilon at ``delta`` of composing ``events`` with accountant ``name``."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    return _cached_epsilon(name, merged_history(events, amplified=amplified), float(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    name: str,
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``tolerance``) whose ``steps``-fold composition at
    ``sampling_rate`` costs at most ``target_epsilon`` at ``delta`` under accountant ``name``.

    Bisection over the library's own epsilon (what Opacus' ``get_noise_multiplier`` does),
    run through the same accountant the ledger uses, so the calibrated value and the ledger
    agree by construction.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise PrivacyError(f"steps must be >= 1 to calibrate noise, got {steps}")

    def cost(sigma: float) -> float:
        return _cached_epsilon(name, ((sigma, sampling_rate, steps),), float(delta))

    low, high = 0.0, 1.0
    while cost(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise PrivacyError(
                f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} "
                f"(sampling rate {sampling_rate}, {steps} steps)"
            )
    while high - low > tolerance * max(low, 0.05):
        mid = (low + high) / 2.0
        if cost(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
