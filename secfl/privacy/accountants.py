"""Accountants: library implementations, plus one RDP accountant for the discrete mechanism,
composed over a list of :class:`DpEvent`.

The Gaussian accountants write no privacy maths; each translates events into its library's
terms and asks the library for epsilon:

* ``opacus_prv`` — Opacus ``PRVAccountant``, privacy random variables (Gopi, Lee & Wutschitz
  2021); the default for sample-level DP-SGD.
* ``opacus_rdp`` — Opacus ``RDPAccountant``, Rényi DP of the subsampled Gaussian (Mironov
  2017; Mironov, Talwar & Zhang 2019).
* ``dpa_pld`` — Google ``dp_accounting`` privacy-loss-distribution accountant; the default
  for Gaussian user-level events.
* ``dpa_rdp`` — Google ``dp_accounting`` ``RdpAccountant`` (Zhu & Wang 2019 for Poisson
  subsampling).

No library accounts the Skellam mechanism, so one more accountant handles both mechanisms:

* ``secfl_rdp`` — RDP over the integer orders :data:`~secfl.privacy.discrete.RDP_ORDERS`:
  Opacus' ``compute_rdp`` for subsampled Gaussian events, the Agarwal, Kairouz & Liu (2021)
  bound for Skellam events, Poisson amplification for Skellam by Zhu & Wang (2019) Theorem 6
  only for events whose amplification is ``poisson`` when amplified accounting is asked
  for; RDP adds under composition and converts to (eps, delta) by Balle et al. (2020).

Each accountant declares the mechanisms it handles; :func:`accountant_for` falls back to
``secfl_rdp`` when a history holds a mechanism the configured one cannot handle, so one
epsilon always composes the whole history (never a sum of two accountants' figures).

Composition is commutative, so events with the same (mechanism, noise multiplier, sampling
rate, sensitivities) are merged by summing their steps before the accountant sees them: the
value is the same and the libraries run faster. ``amplified=False`` accounts every event as
if its sampling rate were 1 (the figure against parties who know who was sampled). Results
are memoised per (accountant, merged history, delta), so a client's cumulative epsilon is
recomputed from its full history every round without paying for the same history twice.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from secfl.errors import PrivacyError
from secfl.privacy import discrete
from secfl.privacy.events import DpEvent

GAUSSIAN = "subsampled_gaussian"
SKELLAM = "skellam"


class MergedEvent(NamedTuple):
    """Events with equal parameters, their steps summed (what an accountant composes)."""

    mechanism: str
    noise_multiplier: float
    sampling_rate: float
    sensitivity: float
    l1_sensitivity: float | None
    steps: int


#: One accountant call's input: merged events in a canonical order (hashable, memoised).
History = tuple[MergedEvent, ...]

#: A Gaussian library call's input: ((noise_multiplier, sampling_rate, steps), ...), sorted.
GaussianHistory = tuple[tuple[float, float, int], ...]


def merged_history(events: Sequence[DpEvent], *, amplified: bool = True) -> History:
    """Events grouped by (mechanism, noise multiplier, sampling rate, L2 and L1
    sensitivity) with their steps summed; unamplified accounting sets every rate to 1."""
    steps: dict[tuple[str, float, float, float, float | None], int] = {}
    for event in events:
        if event.steps == 0:
            continue
        q = event.sampling_rate if amplified else 1.0
        l1 = None if event.l1_sensitivity is None else float(event.l1_sensitivity)
        key = (
            event.mechanism,
            float(event.noise_multiplier),
            float(q),
            float(event.sensitivity),
            l1,
        )
        steps[key] = steps.get(key, 0) + int(event.steps)
    merged = [MergedEvent(*key, n) for key, n in steps.items()]
    merged.sort(key=lambda e: (e.mechanism, e[1], e[2], e[3], e[4] or 0.0, e[5]))
    return tuple(merged)


def gaussian_history(history: History) -> GaussianHistory:
    """The (sigma, q, steps) triples a Gaussian library composes; the L2 sensitivity does
    not change a Gaussian's privacy (sigma is a multiplier of it), so entries differing
    only there are merged again."""
    steps: dict[tuple[float, float], int] = {}
    for entry in history:
        if entry.mechanism != GAUSSIAN:
            raise PrivacyError(f"a Gaussian library cannot account mechanism {entry.mechanism!r}")
        key = (entry.noise_multiplier, entry.sampling_rate)
        steps[key] = steps.get(key, 0) + entry.steps
    return tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))


@dataclass(frozen=True)
class AccountantSpec:
    name: str
    library: str
    summary: str
    epsilon: Callable[[History, float], float]
    #: DpEvent mechanisms this accountant can compose.
    mechanisms: frozenset[str] = field(default=frozenset({GAUSSIAN}))


def _opacus_epsilon(mechanism: str, history: History, delta: float) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = PRVAccountant() if mechanism == "prv" else RDPAccountant()
    accountant.history = [(s, q, n) for s, q, n in gaussian_history(history)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def _dpa_event(history: History):  # type: ignore[no-untyped-def]
    import dp_accounting as dpa

    parts = []
    for sigma, q, n in gaussian_history(history):
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


def _skellam_rdp_curve(entry: MergedEvent, orders: np.ndarray) -> np.ndarray:
    """Per-step RDP of one merged Skellam entry at ``orders``; Zhu & Wang amplification only
    when its sampling rate is below 1 (only Poisson-sampled events keep a rate below 1)."""
    l1, l2 = entry.l1_sensitivity, entry.sensitivity
    if l1 is None:  # DpEvent refuses this; a hand-built history must not slip through
        raise PrivacyError("a skellam history entry needs its l1_sensitivity")
    mu = (entry.noise_multiplier * l2) ** 2 / 2.0

    @functools.cache
    def base(alpha: int) -> float:
        return discrete.skellam_rdp(alpha, mu, l1, l2)

    q = entry.sampling_rate
    values = []
    for alpha in orders:
        a = int(alpha)
        value = base(a)
        if q < 1.0:
            # Both are valid bounds (quasi-convexity of the Rényi divergence bounds the
            # subsampled mechanism by the unsubsampled one); Thm 6's factor 3 can lose.
            value = min(value, discrete.poisson_subsampled_rdp(a, q, base))
        values.append(value)
    return np.asarray(values, dtype=np.float64)


def rdp_curve(history: History, orders: Sequence[int] = discrete.RDP_ORDERS) -> np.ndarray:
    """Total RDP of composing ``history`` at integer ``orders`` (what ``secfl_rdp`` uses)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    grid = np.asarray(orders, dtype=np.float64)
    total = np.zeros_like(grid)
    for entry in history:
        if entry.mechanism == GAUSSIAN:
            total += np.asarray(
                compute_rdp(
                    q=entry.sampling_rate,
                    noise_multiplier=entry.noise_multiplier,
                    steps=entry.steps,
                    orders=[float(a) for a in grid],
                ),
                dtype=np.float64,
            )
        elif entry.mechanism == SKELLAM:
            total += entry.steps * _skellam_rdp_curve(entry, grid)
        else:
            raise PrivacyError(f"secfl_rdp cannot account mechanism {entry.mechanism!r}")
    return total


def _secfl_rdp_epsilon(history: History, delta: float) -> float:
    return discrete.rdp_to_epsilon(discrete.RDP_ORDERS, rdp_curve(history), delta)


_REGISTRY: dict[str, AccountantSpec] = {}

#: The accountant that handles every mechanism; the fallback of :func:`accountant_for`.
UNIVERSAL_ACCOUNTANT = "secfl_rdp"


def register_accountant(spec: AccountantSpec) -> None:
    """Add an accountant to the registry."""
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
    AccountantSpec(
        UNIVERSAL_ACCOUNTANT,
        "secfl",
        "RDP over integer orders: Opacus compute_rdp (Gaussian), Agarwal et al. 2021 "
        "(Skellam), Zhu & Wang 2019 Thm 6 (Poisson-subsampled Skellam)",
        _secfl_rdp_epsilon,
        frozenset({GAUSSIAN, SKELLAM}),
    ),
):
    register_accountant(_spec)

#: Accountants a configuration may name (``privacy.accountant.*``).
ACCOUNTANT_NAMES = ("opacus_prv", "opacus_rdp", "dpa_pld", "dpa_rdp", UNIVERSAL_ACCOUNTANT)


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


def accountant_for(name: str, events: Sequence[DpEvent]) -> str:
    """``name`` if its accountant handles every event's mechanism, else ``secfl_rdp``."""
    spec = accountant(name)
    if all(event.mechanism in spec.mechanisms for event in events):
        return name
    return UNIVERSAL_ACCOUNTANT


def _check_handles(spec: AccountantSpec, history: History) -> None:
    for entry in history:
        if entry.mechanism not in spec.mechanisms:
            raise PrivacyError(
                f"accountant {spec.name!r} cannot account mechanism {entry.mechanism!r} "
                f"(it handles {sorted(spec.mechanisms)}); use {UNIVERSAL_ACCOUNTANT!r}, "
                "which composes every mechanism"
            )


def epsilon(name: str, events: Sequence[DpEvent], delta: float, *, amplified: bool = True) -> float:
    """Epsilon at ``delta`` of composing ``events`` with accountant ``name``; an event the
    accountant cannot handle is an error (:func:`accountant_for` picks one that can)."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history = merged_history(events, amplified=amplified)
    _check_handles(accountant(name), history)
    return _cached_epsilon(name, history, float(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    name: str,
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    tolerance: float = 0.01,
    mechanism: str = GAUSSIAN,
    sensitivity: float = 1.0,
    l1_sensitivity: float | None = None,
) -> float:
    """The smallest noise multiplier (to ``tolerance``) whose ``steps``-fold composition at
    ``sampling_rate`` costs at most ``target_epsilon`` at ``delta`` under accountant ``name``.

    Bisection over the accountant's own epsilon (what Opacus' ``get_noise_multiplier`` does),
    run through the same accountant the ledger uses, so the calibrated value and the ledger
    agree by construction. For ``mechanism="skellam"`` the noise multiplier is
    sqrt(2 mu) / ``sensitivity`` (``sensitivity`` = integer-domain L2 sensitivity D2,
    ``l1_sensitivity`` = D1) and the accountant is :func:`accountant_for` ``name`` — that is
    ``secfl_rdp`` unless ``name`` itself handles Skellam, as the ledger would compose it.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise PrivacyError(f"steps must be >= 1 to calibrate noise, got {steps}")
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    # Validate the parameters once, as the event the calibrated sigma will produce.
    probe = DpEvent(
        mechanism=mechanism,
        noise_multiplier=1.0,
        sampling_rate=sampling_rate,
        steps=steps,
        sensitivity=sensitivity,
        level="user",
        round=0,
        party="server",
        l1_sensitivity=l1_sensitivity,
    )
    name = accountant_for(name, [probe])

    def cost(sigma: float) -> float:
        entry = MergedEvent(
            mechanism,
            float(sigma),
            float(sampling_rate),
            float(sensitivity),
            None if l1_sensitivity is None else float(l1_sensitivity),
            int(steps),
        )
        return _cached_epsilon(name, (entry,), float(delta))

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
