"""Skellam mechanism: bounds against exact numerical divergences, the sampler against the
Skellam/Poisson laws, and the discrete accountant against Opacus for the Gaussian limit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import stats

from secfl.errors import PrivacyError
from secfl.privacy import (
    DpEvent,
    PartyLedger,
    accountant_for,
    calibrate_noise_multiplier,
    epsilon,
)
from secfl.privacy.discrete import (
    RDP_ORDERS,
    poisson_subsampled_rdp,
    rdp_to_epsilon,
    sample_poisson,
    sample_skellam,
    skellam_divergence_numerical,
    skellam_rdp,
    subsampled_skellam_numerical,
)
from secfl.privacy.events import Amplification
from secfl.randomness import Randomness

# --- the Agarwal et al. bound against the exact divergence -----------------------------


@pytest.mark.parametrize("mu", [5.0, 50.0, 500.0, 5000.0])
@pytest.mark.parametrize("shift", [1, 2, 5, 20])
def test_skellam_bound_dominates_exact_divergence(mu: float, shift: int) -> None:
    for alpha in (2, 3, 5, 10, 32):
        bound = skellam_rdp(alpha, mu, shift, shift)
        exact = skellam_divergence_numerical(alpha, mu, shift)
        assert exact > 0
        assert bound >= exact, (alpha, mu, shift, bound, exact)
        # Sensible: never more than the discreteness surcharge 3 D1/(4 mu) loose in
        # absolute terms beyond the Gaussian term, and close in relative terms for large mu.
        assert bound <= exact + 3.0 * shift / (4.0 * mu) + alpha * shift**2 / (4.0 * mu)
        if mu >= 500:
            assert bound <= 1.10 * exact, (alpha, mu, shift, bound, exact)
        if mu >= 5000:
            assert bound <= 1.01 * exact, (alpha, mu, shift, bound, exact)


@pytest.mark.parametrize("alpha", [2, 10, 32])
@pytest.mark.parametrize("shift", [1, 5])
def test_leading_term_matches_exact_divergence_at_large_mu(alpha: int, shift: int) -> None:
    mu = 5000.0
    leading = alpha * shift**2 / (4.0 * mu)
    exact = skellam_divergence_numerical(alpha, mu, shift)
    assert abs(exact / leading - 1.0) < 0.02


def test_numerical_divergence_matches_a_direct_sum() -> None:
    # Reference for the reference: D_alpha by brute force over scipy's pmf (mu and the order
    # small enough that the direct sum neither underflows nor needs truncation care).
    mu, shift, alpha = 8.0, 3, 4
    k = np.arange(-80, 81)
    p = stats.skellam.pmf(k - shift, mu, mu)
    q = stats.skellam.pmf(k, mu, mu)
    direct = math.log(float(np.sum(p**alpha * q ** (1 - alpha)))) / (alpha - 1)
    assert math.isclose(skellam_divergence_numerical(alpha, mu, shift), direct, rel_tol=1e-9)


def test_skellam_rdp_rejects_invalid_parameters() -> None:
    with pytest.raises(PrivacyError, match="alpha"):
        skellam_rdp(1, 10.0, 1.0, 1.0)
    with pytest.raises(PrivacyError, match="alpha"):
        skellam_rdp(2.5, 10.0, 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="mu"):
        skellam_rdp(2, 0.0, 1.0, 1.0)
    with pytest.raises(PrivacyError, match="l1"):
        skellam_rdp(2, 10.0, float("nan"), 1.0)


# --- Zhu & Wang amplification against the exact subsampled divergence ------------------


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
@pytest.mark.parametrize(("mu", "shift"), [(5.0, 1), (5.0, 5), (50.0, 2), (500.0, 20)])
def test_zhu_wang_bound_dominates_exact_subsampled_divergence(
    q: float, mu: float, shift: int
) -> None:
    def base(alpha: int) -> float:
        return skellam_rdp(alpha, mu, shift, shift)

    for alpha in (2, 3, 6, 16):
        bound = poisson_subsampled_rdp(alpha, q, base)
        exact = subsampled_skellam_numerical(alpha, q, mu, shift)
        assert bound >= exact, (q, mu, shift, alpha, bound, exact)


@pytest.mark.parametrize(("mu", "shift"), [(5.0, 1), (50.0, 2), (500.0, 5)])
def test_amplification_happens_for_small_q(mu: float, shift: int) -> None:
    def base(alpha: int) -> float:
        return skellam_rdp(alpha, mu, shift, shift)

    for alpha in (2, 4, 8, 16):
        amplified = poisson_subsampled_rdp(alpha, 0.01, base)
        assert amplified < 0.1 * base(alpha), (alpha, amplified, base(alpha))
        assert poisson_subsampled_rdp(alpha, 1.0, base) == base(alpha)


def test_zhu_wang_bound_stays_finite_for_large_rdp() -> None:
    # e^((l-1) eps(l)) overflows float64 here; the log-space sum must not.
    value = poisson_subsampled_rdp(512, 0.1, lambda a: 5.0 * a)
    assert math.isfinite(value) and value > 0


def test_rdp_to_epsilon_matches_opacus_conversion_and_is_not_negative() -> None:
    orders = list(RDP_ORDERS)
    rdp = compute_rdp(q=0.05, noise_multiplier=1.2, steps=300, orders=[float(a) for a in orders])
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert math.isclose(rdp_to_epsilon(orders, rdp, 1e-5), float(expected), rel_tol=1e-12)
    assert rdp_to_epsilon([2, 3], [0.0, 0.0], 0.5) == 0.0


# --- the sampler -----------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.7, 3.0, 40.0, 5e4, 1e12])
def test_skellam_moments(mu: float) -> None:
    n = 400_000
    x = sample_skellam(Randomness("seeded", 5).stream(f"moments-{mu}"), mu, n)
    assert x.dtype == np.int64 and x.shape == (n,)
    sd = math.sqrt(2.0 * mu)
    # mean: 5 standard errors; variance: var(s^2)/sigma^4 = (2 + kurtosis)/n with
    # excess kurtosis 1/(2 mu) for Sk(mu, mu): 6 standard errors.
    assert abs(float(x.mean())) < 5.0 * sd / math.sqrt(n)
    var_se = math.sqrt((2.0 + 1.0 / (2.0 * mu)) / n)
    assert abs(float(x.astype(np.float64).var()) / (2.0 * mu) - 1.0) < 6.0 * var_se


def _chi_square_p_value(x: np.ndarray, law: stats.rv_discrete) -> float:
    """Chi-square goodness of fit of integer draws ``x`` to ``law``, every bin with >= 20
    expected counts (the tails pooled into the outermost bins)."""
    n = x.size
    lo, hi = int(x.min()), int(x.max())
    support = np.arange(lo, hi + 1)
    observed = np.bincount(x - lo).astype(np.float64)
    expected = law.pmf(support) * n
    keep = np.flatnonzero(expected >= 20)
    first, last = keep[0], keep[-1]
    obs = observed[first : last + 1].copy()
    exp = expected[first : last + 1].copy()
    obs[0] += observed[:first].sum()
    exp[0] = law.cdf(support[first]) * n
    obs[-1] += observed[last + 1 :].sum()
    exp[-1] = law.sf(support[last] - 1) * n
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    return float(stats.chi2.sf(chi2, obs.size - 1))


@pytest.mark.parametrize("mu", [3.0, 40.0])
def test_skellam_goodness_of_fit(mu: float) -> None:
    # mu = 3 exercises the inversion sampler, mu = 40 the PTRS branch.
    x = sample_skellam(Randomness("seeded", 9).stream(f"gof-{mu}"), mu, 200_000)
    assert _chi_square_p_value(x, stats.skellam(mu, mu)) > 1e-4


@pytest.mark.parametrize("mu", [0.3, 9.99, 10.0, 123.4])
def test_poisson_goodness_of_fit(mu: float) -> None:
    # both sides of the switch from inversion to PTRS at mu = 10
    x = sample_poisson(Randomness("seeded", 13).stream(f"pois-{mu}"), mu, 200_000)
    assert x.min() >= 0
    assert _chi_square_p_value(x, stats.poisson(mu)) > 1e-4


def test_goodness_of_fit_detects_a_wrong_law() -> None:
    # The test above can fail: Poisson(40.4) draws are rejected as Poisson(40).
    x = sample_poisson(Randomness("seeded", 13).stream("wrong"), 40.4, 200_000)
    assert _chi_square_p_value(x, stats.poisson(40.0)) < 1e-6


def test_huge_mean_is_exact_in_float64() -> None:
    # At mu ~ 1e15 the naive PTRS would round k to multiples of 0.125 and lose the log-pmf
    # to cancellation; the standardised draws must still look standard normal.
    mu = 1e15 + 0.25
    n = 200_000
    x = sample_poisson(Randomness("seeded", 3).stream("huge"), mu, n)
    z = (x - math.floor(mu)).astype(np.float64) / math.sqrt(mu)
    z -= (mu - math.floor(mu)) / math.sqrt(mu)
    assert abs(float(z.mean())) < 5.0 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 6.0 * math.sqrt(2.0 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4


def test_sampler_is_deterministic_for_seeded_streams() -> None:
    for mu in (2.5, 77.0, 1e9):
        a = sample_skellam(Randomness("seeded", 1).stream("noise", party="client:3"), mu, 5000)
        b = sample_skellam(Randomness("seeded", 1).stream("noise", party="client:3"), mu, 5000)
        c = sample_skellam(Randomness("seeded", 2).stream("noise", party="client:3"), mu, 5000)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_sampler_edge_cases_and_errors() -> None:
    stream = Randomness("seeded", 0).stream("edge")
    assert np.array_equal(sample_skellam(stream, 0.0, 7), np.zeros(7, dtype=np.int64))
    assert sample_skellam(stream, 5.0, 0).shape == (0,)
    for bad in (-1.0, float("nan"), float("inf"), 2.0**60):
        with pytest.raises(PrivacyError):
            sample_skellam(stream, bad, 3)
    with pytest.raises(PrivacyError):
        sample_poisson(stream, 5.0, -1)


@settings(max_examples=25, deadline=None)
@given(
    mu=st.floats(min_value=0.01, max_value=1e14, allow_nan=False),
    size=st.integers(min_value=1, max_value=300),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_sampler_properties(mu: float, size: int, seed: int) -> None:
    x = sample_skellam(Randomness("seeded", seed).stream("prop"), mu, size)
    assert x.dtype == np.int64 and x.shape == (size,)
    # 12 standard deviations: P(violation) < 1e-32 per draw.
    assert np.all(np.abs(x) <= 12.0 * math.sqrt(2.0 * mu) + 12.0)


# --- events and accounting -------------------------------------------------------------


def _skellam(
    sigma: float,
    q: float,
    steps: int,
    *,
    l2: float = 64.0,
    l1: float = 512.0,
    round_index: int = 1,
    amplification: Amplification = "poisson",
) -> DpEvent:
    return DpEvent(
        mechanism="skellam",
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        sensitivity=l2,
        level="user",
        round=round_index,
        party="server",
        amplification=amplification,
        l1_sensitivity=l1,
    )


def _gaussian(sigma: float, q: float, steps: int, round_index: int = 1) -> DpEvent:
    return DpEvent(
        mechanism="subsampled_gaussian",
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        sensitivity=1.0,
        level="user",
        round=round_index,
        party="server",
    )


def test_huge_mu_skellam_matches_the_gaussian() -> None:
    sigma, q, steps, delta = 3.0, 1.0, 10, 1e-5
    # D2 = 2^20 makes mu = (sigma D2)^2 / 2 ~ 5e12: the discreteness term vanishes.
    event = _skellam(sigma, q, steps, l2=2.0**20, l1=2.0**30)
    assert event.skellam_mu == pytest.approx((sigma * 2.0**20) ** 2 / 2.0)
    skellam_eps = epsilon("secfl_rdp", [event], delta)
    # Same orders: Opacus' Gaussian RDP on RDP_ORDERS, converted by Opacus.
    orders = [float(a) for a in RDP_ORDERS]
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    gaussian_same_orders, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert abs(skellam_eps / float(gaussian_same_orders) - 1.0) < 1e-3
    # And against the registered opacus_rdp accountant (its own, finer order grid).
    opacus = epsilon("opacus_rdp", [_gaussian(sigma, q, steps)], delta)
    assert abs(skellam_eps / opacus - 1.0) < 0.02, (skellam_eps, opacus)
    # secfl_rdp on a Gaussian event is Opacus' RDP on the same orders.
    own = epsilon("secfl_rdp", [_gaussian(sigma, q, steps)], delta)
    assert math.isclose(own, float(gaussian_same_orders), rel_tol=1e-9)


def test_small_mu_costs_more_than_the_gaussian() -> None:
    # D2 = 1: mu = sigma^2/2 is small and the discreteness term is visible.
    coarse = epsilon("secfl_rdp", [_skellam(3.0, 1.0, 10, l2=1.0, l1=1.0)], 1e-5)
    gaussian = epsilon("secfl_rdp", [_gaussian(3.0, 1.0, 10)], 1e-5)
    assert coarse > 1.05 * gaussian


def test_amplified_is_below_unamplified_and_only_for_poisson() -> None:
    events = [_skellam(1.2, 0.05, 50)]
    amplified = epsilon("secfl_rdp", events, 1e-5, amplified=True)
    unamplified = epsilon("secfl_rdp", events, 1e-5, amplified=False)
    assert 0 < amplified < 0.5 * unamplified
    full = [_skellam(1.2, 1.0, 50, amplification="none")]
    assert epsilon("secfl_rdp", full, 1e-5, amplified=True) == pytest.approx(unamplified)


def test_ledger_with_skellam_events_uses_secfl_rdp() -> None:
    ledger = PartyLedger(
        party="server", level="user", delta=1e-5, accountant_name="dpa_pld", n=1000
    )
    for r in range(1, 4):
        ledger.add(_skellam(1.1, 0.1, 5, round_index=r))
    expected = epsilon("secfl_rdp", [_skellam(1.1, 0.1, 15)], 1e-5, amplified=False)
    assert math.isclose(ledger.epsilon(), expected, rel_tol=1e-12)
    assert ledger.epsilon_amplified() < ledger.epsilon()
    summary = ledger.summary()
    assert summary["accountant"] == "secfl_rdp"
    assert summary["accountant_configured"] == "dpa_pld"
    assert summary["epsilon"] == pytest.approx(expected)
    with pytest.raises(PrivacyError, match=r"'skellam'.*secfl_rdp"):
        epsilon("dpa_pld", ledger.events, 1e-5)


def test_mixed_history_composes() -> None:
    gaussian = [_gaussian(1.0, 0.1, 30)]
    skellam = [_skellam(1.0, 0.1, 30)]
    assert accountant_for("dpa_pld", gaussian) == "dpa_pld"
    assert accountant_for("dpa_pld", [*gaussian, *skellam]) == "secfl_rdp"
    assert accountant_for("secfl_rdp", gaussian) == "secfl_rdp"
    mixed = epsilon("secfl_rdp", [*gaussian, *skellam], 1e-5)
    alone_g = epsilon("secfl_rdp", gaussian, 1e-5)
    alone_s = epsilon("secfl_rdp", skellam, 1e-5)
    assert mixed > max(alone_g, alone_s)
    assert mixed < alone_g + alone_s  # RDP composition, not a sum of epsilons
    # a Gaussian-only ledger keeps reporting its library's figure
    ledger = PartyLedger(
        party="server", level="user", delta=1e-5, accountant_name="dpa_pld", n=1000
    )
    ledger.add(gaussian[0])
    assert ledger.summary()["accountant"] == "dpa_pld"
    assert ledger.epsilon() == epsilon("dpa_pld", gaussian, 1e-5, amplified=False)


def test_identical_events_merge_and_distinct_l1_do_not() -> None:
    a = epsilon("secfl_rdp", [_skellam(1.0, 1.0, 4), _skellam(1.0, 1.0, 6, round_index=2)], 1e-5)
    b = epsilon("secfl_rdp", [_skellam(1.0, 1.0, 10)], 1e-5)
    assert a == b
    tight = epsilon("secfl_rdp", [_skellam(0.5, 1.0, 10, l2=2.0, l1=2.0)], 1e-5)
    loose = epsilon("secfl_rdp", [_skellam(0.5, 1.0, 10, l2=2.0, l1=40.0)], 1e-5)
    assert loose > tight


def test_calibrate_skellam_noise_multiplier() -> None:
    sigma = calibrate_noise_multiplier(
        "dpa_pld",
        target_epsilon=3.0,
        delta=1e-5,
        sampling_rate=0.1,
        steps=100,
        mechanism="skellam",
        sensitivity=16.0,
        l1_sensitivity=128.0,
    )
    cost = epsilon("secfl_rdp", [_skellam(sigma, 0.1, 100, l2=16.0, l1=128.0)], 1e-5)
    assert 2.85 <= cost <= 3.0
    lower = epsilon("secfl_rdp", [_skellam(sigma * 0.97, 0.1, 100, l2=16.0, l1=128.0)], 1e-5)
    assert lower > 3.0
    # the Gaussian call signature is unchanged
    gaussian = calibrate_noise_multiplier(
        "opacus_rdp", target_epsilon=3.0, delta=1e-5, sampling_rate=0.1, steps=100
    )
    assert epsilon("opacus_rdp", [_gaussian(gaussian, 0.1, 100)], 1e-5) <= 3.0


def test_skellam_event_validation() -> None:
    with pytest.raises(PrivacyError, match="l1_sensitivity"):
        _skellam(1.0, 0.1, 1, l1=float("nan"))
    with pytest.raises(PrivacyError, match="l1_sensitivity"):
        DpEvent("skellam", 1.0, 0.1, 1, 4.0, "user", 1, "server")
    with pytest.raises(PrivacyError, match="below the L2 sensitivity"):
        _skellam(1.0, 0.1, 1, l2=4.0, l1=2.0)
    with pytest.raises(PrivacyError, match="only to skellam"):
        DpEvent("subsampled_gaussian", 1.0, 0.1, 1, 1.0, "user", 1, "server", l1_sensitivity=1.0)
    with pytest.raises(PrivacyError, match="skellam_mu"):
        _ = _gaussian(1.0, 0.1, 1).skellam_mu
    with pytest.raises(PrivacyError, match="unknown"):
        DpEvent("laplace", 1.0, 0.1, 1, 1.0, "user", 1, "server")


def test_event_dicts_round_trip_and_old_dicts_load() -> None:
    event = _skellam(1.3, 0.2, 7, l2=8.0, l1=40.0)
    raw = event.to_dict()
    assert raw["skellam_mu"] == pytest.approx((1.3 * 8.0) ** 2 / 2.0)
    assert raw["noise_std"] == pytest.approx(1.3 * 8.0)
    assert DpEvent.from_dict(raw) == event
    gaussian = _gaussian(1.0, 0.1, 3)
    raw_g = gaussian.to_dict()
    assert "l1_sensitivity" not in raw_g and "skellam_mu" not in raw_g
    assert DpEvent.from_dict(raw_g) == gaussian
    old = {
        "mechanism": "subsampled_gaussian",
        "noise_multiplier": 1.0,
        "sampling_rate": 0.1,
        "steps": 3,
        "sensitivity": 1.0,
        "level": "user",
        "round": 1,
        "party": "server",
        "attempt": 0,
        "amplification": "poisson",
        "noise_std": 1.0,
    }
    assert DpEvent.from_dict(old) == gaussian
    ledger = PartyLedger(party="server", level="user", delta=1e-5, accountant_name="dpa_pld", n=10)
    ledger.load_state([raw, raw_g])
    assert ledger.events == [event, gaussian]
