"""The server role: selection, the round loop, aggregation and server optimisers."""

from secfl.server.aggregate import WeightedSum
from secfl.server.loop import FederatedServer, RoundOutcome
from secfl.server.optimizers import make_server_optimizer
from secfl.server.protection import AggregateResult, PlaintextProtection, Protection, RoundContext
from secfl.server.selection import select_clients

__all__ = [
    "AggregateResult",
    "FederatedServer",
    "PlaintextProtection",
    "Protection",
    "RoundContext",
    "RoundOutcome",
    "WeightedSum",
    "make_server_optimizer",
    "select_clients",
]
