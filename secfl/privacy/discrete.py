"""The Skellam mechanism: integer noise for DP under secure aggregation, and its RDP.

In mode ``masking`` every client adds Skellam noise ``Sk(mu_i, mu_i) = Poisson(mu_i) -
Poisson(mu_i)`` (mean 0, variance ``2 mu_i``) to its integer-encoded update before masking.
Skellam is closed under summation, so the securely aggregated sum carries exactly
``Sk(sum mu_i, sum mu_i)`` per coordinate, and that is what is accounted. No accounting
library knows this mechanism, so the bounds are implemented here, each beside a slow,
obviously-right numerical reference that the tests compare it with.

Notation: ``mu`` is the mean of each Poisson (so the noise variance is ``V = 2 mu``); ``D1``
and ``D2`` are the L1 and L2 sensitivities of the integer-valued query (integer domain).

1. **RDP of the Skellam mechanism** (Agarwal, Kairouz & Liu, "The Skellam Mechanism for
   Differentially Private Federated Learning", NeurIPS 2021, Theorem 3.5 / Corollary 3.6,
   stated there for the variance ``V``; rewritten with ``V = 2 mu``), integer ``alpha >= 2``::

       eps(alpha) <= alpha D2^2 / (4 mu)
                     + min( ((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2),  3 D1 / (4 mu) )

   The first term is the Gaussian mechanism's RDP at variance ``2 mu``; the minimum is the
   price of discreteness, and vanishes relative to it as ``mu`` grows.

2. **Poisson subsampling** (Zhu & Wang, "Poisson Subsampled Rényi Differential Privacy",
   ICML 2019, Theorem 6, the general upper bound, valid for any mechanism with RDP curve
   ``eps(.)``), integer ``alpha >= 2``, sampling probability ``q``::

       eps_q(alpha) <= 1/(alpha-1) log[ (1-q)^(alpha-1) (alpha q - q + 1)
                         + C(alpha,2) q^2 (1-q)^(alpha-2) e^(eps(2))
                         + 3 sum_{l=3..alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ]

   evaluated in log space. The accountant also takes the minimum with the unsubsampled
   ``eps(alpha)``, itself a valid bound: Rényi divergence is jointly quasi-convex, so
   ``D((1-q)P + qP' || P) <= D(P' || P)`` and ``D(P || (1-q)P + qP') <= D(P || P')``.

3. **RDP to (eps, delta)** (Balle, Barthe, Gaboardi, Hsu & Sato, "Hypothesis Testing
   Interpretations and Rényi Differential Privacy", AISTATS 2020, Theorem 21; also Canonne,
   Kamath & Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
   Proposition 12)::

       eps = min_alpha  rdp(alpha) + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)

4. **Sampling** (:func:`sample_skellam`): two Poisson draws from the run's CSPRNG stream
   (never numpy's or torch's generators). Means ``mu >= 10`` use Hörmann's transformed
   rejection with squeeze, PTRS ("The transformed rejection method for generating Poisson
   random variables", Insurance: Mathematics and Economics 12, 1993), with the acceptance
   test evaluated through a cancellation-free form of the Poisson log-pmf so that it stays
   exact in float64 up to ``MAX_POISSON_MEAN``; smaller means use inversion of a float64 CDF
   table. Like every sampler driven by 53-bit uniforms, outcomes rarer than about 2^-53
   are not produced; that tail is far below any delta in use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import special

from secfl.errors import PrivacyError
from secfl.randomness import RandomStream

#: Integer Rényi orders the discrete accountant evaluates (Theorem 6 needs integers).
RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 128, 192, 256, 512)

#: Largest Poisson mean the sampler accepts: the integer part of the mean and every draw
#: must be exact in float64 (2^53) with room for the proposal's spread.
MAX_POISSON_MEAN = 2.0**52

#: Means below this use CDF inversion; PTRS is designed for means >= 10 (Hörmann 1993).
_PTRS_MIN_MEAN = 10.0

#: Relative mass below which the numerical divergence stops summing the support.
_TRUNCATION = 1e-30


def _check_order(alpha: int) -> int:
    if isinstance(alpha, bool) or int(alpha) != alpha or alpha < 2:
        raise PrivacyError(f"Rényi order alpha must be an integer >= 2, got {alpha!r}")
    return int(alpha)


def _check_positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise PrivacyError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def skellam_rdp(alpha: int, mu: float, l1: float, l2: float) -> float:
    """RDP at integer order ``alpha`` of adding ``Sk(mu, mu)`` per coordinate to an integer
    query with L1/L2 sensitivities ``l1``/``l2`` (Agarwal, Kairouz & Liu 2021, Thm 3.5)."""
    a = _check_order(alpha)
    mu = _check_positive("mu", mu)
    l1 = _check_positive("l1", l1)
    l2 = _check_positive("l2", l2)
    gaussian_part = a * l2 * l2 / (4.0 * mu)
    discrete_part = min(
        ((2 * a - 1) * l2 * l2 + 6.0 * l1) / (16.0 * mu * mu), 3.0 * l1 / (4.0 * mu)
    )
    return gaussian_part + discrete_part


# --- numerical references -------------------------------------------------------------


def _skellam_logpmf_series(k: np.ndarray, mu: float) -> np.ndarray:
    """log P[Sk(mu, mu) = k] by the Bessel series, summed in log space (never underflows).

    P[k] = e^(-2 mu) sum_j mu^(2j+|k|) / (j! (j+|k|)!); the terms peak near
    j* = (sqrt(k^2 + 4 mu^2) - |k|) / 2 and are summed over a window of +-(40 + 12 sqrt(j*)).
    """
    n = np.abs(k).astype(np.float64)
    peak = (np.sqrt(n * n + 4.0 * mu * mu) - n) / 2.0
    width = 40.0 + 12.0 * np.sqrt(peak + 1.0)
    start = np.maximum(0.0, np.floor(peak - width))
    span = int(np.max(np.ceil(2.0 * width))) + 1
    j = start[:, None] + np.arange(span, dtype=np.float64)[None, :]
    log_mu = math.log(mu)
    terms = (
        (2.0 * j + n[:, None]) * log_mu
        - special.gammaln(j + 1.0)
        - special.gammaln(j + n[:, None] + 1.0)
    )
    result: np.ndarray = special.logsumexp(terms, axis=1) - 2.0 * mu
    return result


def _skellam_logpmf(k: np.ndarray, mu: float) -> np.ndarray:
    """log P[Sk(mu, mu) = k] = log ive(|k|, 2 mu); the series where ``ive`` underflows."""
    k = np.asarray(k, dtype=np.int64)
    with np.errstate(divide="ignore"):
        out = np.log(special.ive(np.abs(k).astype(np.float64), 2.0 * mu))
    small = ~(out > -650.0)  # ive near underflow loses digits; also catches -inf and NaN
    if np.any(small):
        out[small] = _skellam_logpmf_series(k[small], mu)
    return np.asarray(out, dtype=np.float64)


def _log_divergence_sum(
    log_terms: Callable[[np.ndarray], np.ndarray], centre: int, half_width: int
) -> float:
    """log sum_k exp(log_terms(k)) over the integers, truncated where the remaining terms
    are below ``_TRUNCATION`` of the total and decreasing at least geometrically."""
    lo, hi = centre - half_width, centre + half_width
    values = log_terms(np.arange(lo, hi + 1, dtype=np.int64))
    for _ in range(64):
        total = float(special.logsumexp(values))
        grow_lo = _tail_too_heavy(values[1], values[0], total)
        grow_hi = _tail_too_heavy(values[-2], values[-1], total)
        if not (grow_lo or grow_hi):
            return total
        step = hi - lo + 1
        if grow_lo:
            extra = log_terms(np.arange(lo - step, lo, dtype=np.int64))
            values = np.concatenate([extra, values])
            lo -= step
        if grow_hi:
            extra = log_terms(np.arange(hi + 1, hi + 1 + step, dtype=np.int64))
            values = np.concatenate([values, extra])
            hi += step
    raise PrivacyError("numerical Rényi divergence did not converge (support too wide)")


def _tail_too_heavy(inner: float, edge: float, total: float) -> bool:
    """Whether the tail beyond ``edge`` may carry more than ``_TRUNCATION`` of the total,
    bounding it by a geometric series with the ratio of the last two terms."""
    if not math.isfinite(edge):
        return edge > 0  # -inf: nothing there; +inf: keep going (will not converge)
    log_ratio = edge - inner
    if log_ratio >= -1e-3:
        return True
    log_tail = edge + log_ratio - math.log1p(-math.exp(log_ratio))
    return log_tail - total > math.log(_TRUNCATION)


def _renyi_from_logs(
    alpha: int,
    log_p: Callable[[np.ndarray], np.ndarray],
    log_q: Callable[[np.ndarray], np.ndarray],
    centre: int,
    half_width: int,
) -> float:
    """D_alpha(P || Q) = 1/(alpha-1) log sum_k P(k)^alpha Q(k)^(1-alpha)."""

    def terms(k: np.ndarray) -> np.ndarray:
        lp = log_p(k)
        lq = log_q(k)
        out = alpha * lp + (1 - alpha) * lq
        out[np.isneginf(lp)] = -np.inf
        return np.asarray(out, dtype=np.float64)

    value = _log_divergence_sum(terms, centre, half_width) / (alpha - 1)
    return max(0.0, value)


def skellam_divergence_numerical(alpha: int, mu: float, shift: int) -> float:
    """Exact max(D_alpha(Sk + shift || Sk), D_alpha(Sk || Sk + shift)) for ``Sk(mu, mu)``.

    Reference for :func:`skellam_rdp` in one dimension (``l1 = l2 = |shift|``): the sum over
    the integers in log space, the pmf from ``scipy.special.ive`` (the Bessel series where
    it underflows), truncated where the remaining mass is below ~1e-30 of the total.
    """
    a = _check_order(alpha)
    mu = _check_positive("mu", mu)
    s = int(shift)

    def log_q(k: np.ndarray) -> np.ndarray:
        return _skellam_logpmf(k, mu)

    def log_p(k: np.ndarray) -> np.ndarray:
        return _skellam_logpmf(k - s, mu)

    half = int(abs(s) * a + 12.0 * math.sqrt(2.0 * mu) + 20)
    return max(
        _renyi_from_logs(a, log_p, log_q, s, half),
        _renyi_from_logs(a, log_q, log_p, 0, half),
    )


def subsampled_skellam_numerical(alpha: int, q: float, mu: float, shift: int) -> float:
    """Exact max(D_alpha((1-q)P + qP_s || P), D_alpha(P || (1-q)P + qP_s)), P = Sk(mu, mu),
    P_s = P shifted by ``shift``: the Poisson-subsampled Skellam mechanism in one dimension
    (add/remove neighbours), the reference for :func:`poisson_subsampled_rdp`."""
    a = _check_order(alpha)
    mu = _check_positive("mu", mu)
    if not 0 < q <= 1:
        raise PrivacyError(f"sampling rate q must be in (0, 1], got {q}")
    s = int(shift)
    log_q_rate = math.log(q)
    log_keep = math.log1p(-q) if q < 1 else -math.inf

    def log_base(k: np.ndarray) -> np.ndarray:
        return _skellam_logpmf(k, mu)

    def log_mixture(k: np.ndarray) -> np.ndarray:
        return np.logaddexp(
            log_keep + _skellam_logpmf(k, mu), log_q_rate + _skellam_logpmf(k - s, mu)
        )

    half = int(abs(s) * a + 12.0 * math.sqrt(2.0 * mu) + 20)
    return max(
        _renyi_from_logs(a, log_mixture, log_base, s, half),
        _renyi_from_logs(a, log_base, log_mixture, 0, half),
    )


# --- amplification and conversion -----------------------------------------------------


def poisson_subsampled_rdp(alpha: int, q: float, rdp: Callable[[int], float]) -> float:
    """Zhu & Wang (ICML 2019) Theorem 6: RDP at integer ``alpha >= 2`` of a mechanism with
    RDP curve ``rdp`` run on a Poisson sample with rate ``q``; ``q == 1`` is ``rdp(alpha)``."""
    a = _check_order(alpha)
    if not 0 < q <= 1:
        raise PrivacyError(f"sampling rate q must be in (0, 1], got {q}")
    if q == 1.0:
        return float(rdp(a))
    log_q = math.log(q)
    log_keep = math.log1p(-q)
    logs = [
        (a - 1) * log_keep + math.log(a * q - q + 1.0),
        math.log(a * (a - 1) / 2.0) + 2.0 * log_q + (a - 2) * log_keep + float(rdp(2)),
    ]
    if a >= 3:
        ell = np.arange(3, a + 1, dtype=np.float64)
        eps = np.array([float(rdp(int(x))) for x in ell])
        log_binom = (
            special.gammaln(a + 1.0) - special.gammaln(ell + 1.0) - special.gammaln(a - ell + 1.0)
        )
        higher = math.log(3.0) + log_binom + ell * log_q + (a - ell) * log_keep + (ell - 1.0) * eps
        logs.append(float(special.logsumexp(higher)))
    return max(0.0, float(special.logsumexp(logs)) / (a - 1))


def rdp_to_epsilon(
    orders: Sequence[float] | np.ndarray, rdp_values: Sequence[float] | np.ndarray, delta: float
) -> float:
    """Smallest (eps, delta) guarantee implied by an RDP curve (Balle et al. 2020, Thm 21;
    Canonne, Kamath & Steinke 2020, Prop. 12); never negative."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp_values, dtype=np.float64)
    if a.shape != r.shape or a.size == 0:
        raise PrivacyError(f"need one RDP value per order, got {a.size} orders, {r.size} values")
    if np.any(a <= 1):
        raise PrivacyError("Rényi orders must be > 1")
    eps = r + np.log((a - 1.0) / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    eps = eps[~np.isnan(eps)]
    if eps.size == 0:
        return math.inf
    return max(0.0, float(np.min(eps)))


# --- sampling --------------------------------------------------------------------------


def _stirling_error(k: np.ndarray) -> np.ndarray:
    """lgamma(k + 1) - (k + 1/2) log k + k - log(2 pi)/2 for integers k >= 1 (Loader 2000)."""
    out = np.empty_like(k)
    small = k < 16.0
    ks = k[small]
    out[small] = (
        special.gammaln(ks + 1.0) - (ks + 0.5) * np.log(ks) + ks - 0.5 * math.log(2.0 * math.pi)
    )
    kl = k[~small]
    inv = 1.0 / kl
    inv2 = inv * inv
    out[~small] = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))
    return out


def _poisson_logpmf(offset: np.ndarray, mu: float) -> np.ndarray:
    """log P[Poisson(mu) = mu + offset] for integer ``mu + offset >= 1``, without the
    cancellation of ``k log mu - mu - lgamma(k+1)`` (whose terms reach 1e16 for mu ~ 1e15):
    -mu ((1+t) log1p(t) - t) - log(2 pi k)/2 - stirling_error(k), with t = offset/mu."""
    k = mu + offset
    t = offset / mu
    deviance = (mu + offset) * np.log1p(t) - offset
    # Near the mode the difference above cancels (error ~1e-16 |offset|); there use the
    # series mu((1+t)log(1+t) - t) = offset t sum_{n>=2} (-t)^(n-2) / (n (n-1)), |t| < 0.01.
    near = np.abs(t) < 0.01
    if np.any(near):
        tn = t[near]
        series = np.zeros_like(tn)
        for n in range(12, 1, -1):
            series = 1.0 / (n * (n - 1)) - tn * series
        deviance[near] = offset[near] * tn * series
    return np.asarray(
        -deviance - 0.5 * np.log(2.0 * math.pi * k) - _stirling_error(k), dtype=np.float64
    )


def _poisson_ptrs(stream: RandomStream, mu: float, size: int) -> np.ndarray:
    """Hörmann's PTRS, vectorised: only rejected entries are redrawn, in a fixed order."""
    smu = math.sqrt(mu)
    b = 0.931 + 2.53 * smu
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    # k = floor(x + mu) computed as floor(mu) + floor(x + frac(mu)): exact in int64 for any
    # mean below 2^52, where float64 would round x + mu to a multiple of up to 0.5.
    mu_int = math.floor(mu)
    mu_frac = mu - mu_int
    out = np.empty(size, dtype=np.int64)
    filled = 0
    for _ in range(1000):
        need = size - filled
        if need == 0:
            return out
        batch = need + need // 8 + 16
        u = stream.uniform(2 * batch)
        big_u = u[:batch] - 0.5
        v = u[batch:]
        us = 0.5 - np.abs(big_u)
        ok = us > 0.0  # us == 0 (u exactly 0) is a rejected proposal
        us_safe = np.where(ok, us, 0.5)
        step = np.floor((2.0 * a / us_safe + b) * big_u + 0.43 + mu_frac)
        offset = step - mu_frac  # k - mu, exactly, as a float
        accept = ok & (us >= 0.07) & (v <= v_r)
        rest = ok & ~accept & (mu_int + step >= 0) & ~((us < 0.013) & (v > us))
        if np.any(rest):
            idx = np.flatnonzero(rest)
            with np.errstate(divide="ignore"):
                lhs = np.log(v[idx]) + log_inv_alpha - np.log(a / (us[idx] * us[idx]) + b)
            kk = mu_int + step[idx]
            rhs = np.full(idx.size, -mu)  # k == 0
            pos = kk >= 1
            rhs[pos] = _poisson_logpmf(offset[idx][pos], mu)
            accept[idx[lhs <= rhs]] = True
        chosen = step[accept][:need]
        out[filled : filled + chosen.size] = mu_int + chosen.astype(np.int64)
        filled += chosen.size
    raise PrivacyError(f"Poisson sampler did not finish (mu {mu}): the stream is not uniform")


def _poisson_inversion(stream: RandomStream, mu: float, size: int) -> np.ndarray:
    """Inversion of the float64 CDF for means below 10: the table runs until the CDF rounds
    to 1 (at most a few dozen entries), so the search is bounded."""
    k = np.arange(0, 200, dtype=np.float64)
    log_pmf = k * math.log(mu) - mu - special.gammaln(k + 1.0)
    cdf = np.cumsum(np.exp(log_pmf))
    last = int(np.searchsorted(cdf, 1.0, side="left"))
    cdf = cdf[: last + 1].copy()
    cdf[-1] = 1.0
    u = stream.uniform(size)
    return np.searchsorted(cdf, u, side="right").astype(np.int64)


def sample_poisson(stream: RandomStream, mu: float, size: int) -> np.ndarray:
    """``size`` Poisson(``mu``) draws (int64) from ``stream``'s uniforms only."""
    if size < 0:
        raise PrivacyError(f"size must be >= 0, got {size}")
    if not (math.isfinite(mu) and 0.0 <= mu <= MAX_POISSON_MEAN):
        raise PrivacyError(f"Poisson mean must be in [0, {MAX_POISSON_MEAN:.4g}], got {mu!r}")
    if mu == 0.0 or size == 0:
        return np.zeros(size, dtype=np.int64)
    if mu < _PTRS_MIN_MEAN:
        return _poisson_inversion(stream, float(mu), size)
    return _poisson_ptrs(stream, float(mu), size)


def sample_skellam(stream: RandomStream, mu: float, size: int) -> np.ndarray:
    """``size`` draws of ``Sk(mu, mu) = Poisson(mu) - Poisson(mu)`` (int64, variance 2 mu)
    from ``stream`` (the run's CSPRNG, or its seeded DRBG), for ``0 <= mu <= 2^52``."""
    if not (math.isfinite(mu) and mu >= 0.0):
        raise PrivacyError(f"Skellam mu must be finite and >= 0, got {mu!r}")
    both = sample_poisson(stream, mu, 2 * size)
    return both[:size] - both[size:]
