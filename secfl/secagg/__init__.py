"""Secure aggregation by pairwise masking: SecAgg (Bonawitz et al. CCS 2017) and SecAgg+
(Bell et al. CCS 2020), as sans-I/O client and server state machines.

The normative description is ``protocols/secagg.md``; the user guide is
``docs/secure_aggregation.md``. Building blocks:

* :mod:`secfl.secagg.params` — one round's parameters (k, t, b) from the config;
* :mod:`secfl.secagg.encoding` — clip, weight, stochastic rounding into Z_{2^b};
* :mod:`secfl.secagg.graph` — complete or random k-regular (Harary) graph;
* :mod:`secfl.secagg.identity` — pinned identity keys;
* :mod:`secfl.secagg.messages` — the wire messages (type ids 100-199);
* :mod:`secfl.secagg.client` / :mod:`secfl.secagg.server` — the state machines;
* :mod:`secfl.secagg.simulation` — wiring into ``secfl run``.
"""

from secfl.secagg.client import SecAggClient, ShareReleaseLog
from secfl.secagg.params import SecAggParams, derive_params
from secfl.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "SecAggClient",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "ShareReleaseLog",
    "derive_params",
]
