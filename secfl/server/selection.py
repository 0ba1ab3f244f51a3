"""Client selection: a fixed number uniformly, or Poisson sampling with rate q.

Poisson sampling (each client independently with probability q) is what the privacy
amplification theorems for user-level DP assume; its coins come from the run's randomness
(the OS CSPRNG by default), never from a seeded non-cryptographic generator.
"""

from __future__ import annotations

import numpy as np

from secfl.config import FixedSampling, PoissonSampling
from secfl.errors import ConfigError
from secfl.randomness import RandomStream


def select_clients(
    spec: FixedSampling | PoissonSampling, client_ids: list[int], stream: RandomStream
) -> list[int]:
    """The sorted participant ids for one round."""
    n = len(client_ids)
    ids = np.asarray(client_ids)
    if spec.kind == "poisson":
        return sorted(int(i) for i in ids[stream.bernoulli(spec.rate, n)])
    if spec.clients_per_round is not None:
        k = spec.clients_per_round
    elif spec.fraction is not None:
        k = max(1, round(spec.fraction * n))
    else:
        k = n
    if k > n:
        raise ConfigError(
            f"server.sampling.clients_per_round={k} exceeds the {n} clients in the federation"
        )
    return sorted(int(i) for i in ids[stream.permutation(n)[:k]])
