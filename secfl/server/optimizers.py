"""Server optimisers applied to the aggregated (weighted mean) update.

FedAvg: ``w += lr * delta``. FedAvgM (Hsu et al. 2019): server momentum. FedAdam (Reddi et
al., ICLR 2021, "Adaptive Federated Optimization"): Adam on the pseudo-gradient ``delta``
with adaptivity ``tau``. State is a dict of arrays so checkpoints capture it exactly.

Clients send weight deltas (``client.update_kind: weights``, the pseudo-gradient above) or
mean gradients at the global weights (``gradients``, US20210182661A1's gradient option);
:meth:`ServerOptimizer.apply_update` turns a mean gradient into the descent direction
``-g``, so FedAvg at ``server.lr`` is gradient descent ``w -= lr * g`` (FedSGD) and FedAvgM
/ FedAdam are server momentum / Adam on the gradients.
"""

from __future__ import annotations

import numpy as np

from secfl.config import RunConfig, ServerConfig
from secfl.errors import CheckpointError, ConfigError


class ServerOptimizer:
    name = "fedavg"

    def __init__(self, config: ServerConfig, size: int) -> None:
        self.config = config
        self.size = size
        self.state: dict[str, np.ndarray] = {}

    def step(self, weights: np.ndarray, delta: np.ndarray) -> None:
        """Update ``weights`` in place from the mean update ``delta``."""
        weights += np.float32(self.config.lr) * delta

    def apply_update(self, weights: np.ndarray, mean_update: np.ndarray, *, kind: str) -> None:
        """Step from the aggregated client update of ``kind`` (``client.update_kind``):
        a weights delta as is, a mean gradient as its descent direction."""
        if kind == "weights":
            self.step(weights, mean_update)
        elif kind == "gradients":
            self.step(weights, -mean_update)
        else:
            raise ConfigError(f"client.update_kind={kind!r}: allowed 'weights', 'gradients'")

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if set(state) != set(self.state):
            raise CheckpointError(
                f"{self.name} state has keys {sorted(state)}, expected {sorted(self.state)}"
            )
        for key, value in state.items():
            if value.shape != self.state[key].shape:
                raise CheckpointError(f"{self.name} state {key!r} has shape {value.shape}")
            self.state[key][...] = value


class FedAvgM(ServerOptimizer):
    name = "fedavgm"

    def __init__(self, config: ServerConfig, size: int) -> None:
        super().__init__(config, size)
        self.state = {"momentum": np.zeros(size, dtype=np.float32)}

    def step(self, weights: np.ndarray, delta: np.ndarray) -> None:
        m = self.state["momentum"]
        m *= np.float32(self.config.momentum)
        m += delta
        weights += np.float32(self.config.lr) * m


class FedAdam(ServerOptimizer):
    name = "fedadam"

    def __init__(self, config: ServerConfig, size: int) -> None:
        super().__init__(config, size)
        self.state = {
            "m": np.zeros(size, dtype=np.float32),
            "v": np.zeros(size, dtype=np.float32),
        }

    def step(self, weights: np.ndarray, delta: np.ndarray) -> None:
        c = self.config
        m, v = self.state["m"], self.state["v"]
        m *= np.float32(c.beta1)
        m += np.float32(1 - c.beta1) * delta
        v *= np.float32(c.beta2)
        v += np.float32(1 - c.beta2) * delta * delta
        weights += np.float32(c.lr) * m / (np.sqrt(v) + np.float32(c.tau))


_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": ServerOptimizer,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
}


def check_update_kind(config: RunConfig) -> None:
    """Refuse what cannot consume gradient updates: the trust module compares each update
    with a reference *weights delta* trained on the shared data (FLTrust), which points
    against a gradient, so every honest client would look like an attacker."""
    if config.client.update_kind != "gradients":
        return
    if config.trust is not None and config.trust.defense != "none":
        raise ConfigError(
            f"trust.defense={config.trust.defense!r} with client.update_kind='gradients' is "
            "refused: the trust module's reference and thresholds are weights deltas, not "
            "gradients; use update_kind 'weights' or trust.defense 'none'"
        )


def make_server_optimizer(config: ServerConfig, size: int) -> ServerOptimizer:
    return _OPTIMIZERS[config.optimizer](config, size)
