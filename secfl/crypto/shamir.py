"""Vectorised Shamir secret sharing over the prime field GF(2^31 - 1).

Secrets are byte strings; each is cut into 3-byte chunks (field elements below 2^24 < p),
and every chunk is shared with its own random polynomial of degree ``t - 1`` (Shamir 1979),
so any ``t`` shares determine every chunk and any ``t - 1`` shares are uniformly distributed
whatever the secret (information-theoretic hiding, chunk by chunk and hence for the whole
secret). Bonawitz et al. CCS 2017 §4 share each client's self-mask seed and mask private key
this way; Bell et al. CCS 2020 §3 share them among a client's graph neighbours only.

Everything is NumPy over ``uint64`` with p = 2^31 - 1, so every product of two residues is
below 2^62 and never overflows. Reconstruction is batched: the Lagrange coefficients at zero
are computed once per distinct holder set (vectorised modular inverses by Fermat's little
theorem) and shared by every secret and chunk that uses that set; then all secrets are
recovered with one multiply-and-sum. Flower's SecAgg+ recovers secrets one at a time in
pure Python, which is where its server spends most of a round.

x-coordinates are nonzero field elements (secfl uses ``client_id + 1``); a share is the
vector of the polynomial values at ``x`` for every chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from secfl.errors import ConfigError, ProtocolError

PRIME = (1 << 31) - 1
CHUNK_BYTES = 3
_P = np.uint64(PRIME)

#: Draws ``size`` uniform residues in [0, PRIME) (a RandomStream's ``integers``).
RandomResidues = Callable[[int, int], np.ndarray]


def chunks_for(secret_bytes: int) -> int:
    """Field elements per secret of ``secret_bytes`` bytes."""
    return -(-secret_bytes // CHUNK_BYTES)


def secret_to_elements(secrets: np.ndarray) -> np.ndarray:
    """(S, B) uint8 secrets -> (S, ceil(B/3)) uint64 field elements (big-endian chunks)."""
    if secrets.ndim != 2 or secrets.dtype != np.uint8:
        raise ConfigError(
            f"secrets must be a (S, B) uint8 array, got {secrets.shape} {secrets.dtype}"
        )
    s, b = secrets.shape
    m = chunks_for(b)
    padded = np.zeros((s, m * CHUNK_BYTES), dtype=np.uint64)
    padded[:, :b] = secrets
    grouped = padded.reshape(s, m, CHUNK_BYTES)
    return (
        (grouped[:, :, 0] << np.uint64(16)) | (grouped[:, :, 1] << np.uint64(8)) | grouped[:, :, 2]
    )


def elements_to_secret(elements: np.ndarray, secret_bytes: int) -> np.ndarray:
    """Inverse of :func:`secret_to_elements`; refuses elements that are not 3-byte values."""
    if np.any(elements >= np.uint64(1 << 24)):
        raise ProtocolError("reconstructed value is not a valid secret encoding (bad shares)")
    s, m = elements.shape
    out = np.empty((s, m, CHUNK_BYTES), dtype=np.uint8)
    out[:, :, 0] = (elements >> np.uint64(16)) & np.uint64(0xFF)
    out[:, :, 1] = (elements >> np.uint64(8)) & np.uint64(0xFF)
    out[:, :, 2] = elements & np.uint64(0xFF)
    return out.reshape(s, m * CHUNK_BYTES)[:, :secret_bytes]


def _check_xs(xs: np.ndarray) -> None:
    if xs.size and (np.any(xs == 0) or np.any(xs >= _P)):
        raise ConfigError("Shamir x-coordinates must be in [1, 2^31 - 2]")


def split(
    elements: np.ndarray, xs: Sequence[int] | np.ndarray, threshold: int, random: RandomResidues
) -> np.ndarray:
    """Share every row of ``elements`` (S, m) at points ``xs`` (n,) with threshold ``t``.

    Returns (n, S, m) uint64: ``shares[j, s, c]`` is polynomial (s, c) evaluated at ``xs[j]``.
    """
    x = np.asarray(xs, dtype=np.uint64)
    _check_xs(x)
    if len(set(x.tolist())) != x.size:
        raise ConfigError("Shamir x-coordinates must be distinct")
    if not 1 <= threshold <= max(1, x.size):
        raise ConfigError(
            f"threshold must be in [1, {x.size}] (number of holders), got {threshold}"
        )
    if np.any(elements >= _P):
        raise ConfigError("secret elements must be field residues below 2^31 - 1")
    s, m = elements.shape
    coefficients = random(PRIME, (threshold - 1) * s * m).astype(np.uint64)
    coefficients = coefficients.reshape(threshold - 1, s, m)
    # Horner: f(x) = (((a_{t-1} x + a_{t-2}) x + ...) x + a_0), all mod p, for all x at once.
    acc = np.zeros((x.size, s, m), dtype=np.uint64)
    xcol = x[:, None, None]
    for degree in range(threshold - 2, -1, -1):
        acc = (acc + coefficients[degree][None]) % _P
        acc = (acc * xcol) % _P
    return (acc + elements[None]) % _P


def _pow_mod(base: np.ndarray, exponent: int) -> np.ndarray:
    result = np.ones_like(base)
    b = base % _P
    e = exponent
    while e:
        if e & 1:
            result = (result * b) % _P
        b = (b * b) % _P
        e >>= 1
    return result


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """Coefficients at 0 for G holder sets at once: (G, t) points -> (G, t) coefficients.

    lambda_i = prod_{j != i} x_j / (x_j - x_i)  (mod p); the G*t denominators are inverted
    together with one vectorised Fermat exponentiation.
    """
    x = np.asarray(xs, dtype=np.uint64)
    if x.ndim != 2:
        raise ConfigError(f"holder sets must be a (G, t) array, got shape {x.shape}")
    _check_xs(x)
    g, t = x.shape
    num = np.ones((g, t), dtype=np.uint64)
    den = np.ones((g, t), dtype=np.uint64)
    for j in range(t):
        xj = x[:, j : j + 1]
        factor_num = np.broadcast_to(xj, (g, t)).copy()
        factor_den = (xj + _P - x) % _P
        factor_num[:, j] = 1
        factor_den[:, j] = 1
        num = (num * factor_num) % _P
        den = (den * factor_den) % _P
    if np.any(den == 0):
        raise ConfigError("Shamir holder x-coordinates must be distinct")
    return (num * _pow_mod(den, PRIME - 2)) % _P


def reconstruct(xs: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Recover S secrets from t shares each, batched.

    ``xs``: (S, t) the points of each secret's shares; ``shares``: (S, t, m) their values.
    Distinct holder sets get their Lagrange coefficients computed once and shared.
    Returns (S, m) field elements.
    """
    x = np.asarray(xs, dtype=np.uint64)
    y = np.asarray(shares, dtype=np.uint64)
    if x.ndim != 2 or y.ndim != 3 or y.shape[:2] != x.shape:
        raise ConfigError(f"shares {y.shape} do not match points {x.shape}")
    if np.any(y >= _P):
        raise ProtocolError("a share is not a field residue (>= 2^31 - 1)")
    if x.shape[0] == 0:
        return np.zeros((0, y.shape[2]), dtype=np.uint64)
    unique_sets, which = np.unique(x, axis=0, return_inverse=True)
    coefficients = lagrange_at_zero(unique_sets)[which.reshape(-1)]  # (S, t)
    # Products < 2^62; a sum of t of them reduced per term stays < t * 2^31 < 2^64.
    terms = (coefficients[:, :, None] * y) % _P
    return terms.sum(axis=1, dtype=np.uint64) % _P
