"""The server's reference update on the public shared dataset (FLTrust's root update).

Cao, Fang, Liu and Gong (NDSS 2021) let the server train the current global model on a small
clean "root" dataset and use the resulting update as a yardstick that colluding clients
cannot move. Here the root dataset is ``data.shared`` (public, a few records per class);
the update is *evidence* for the vote and the thresholds, never a candidate, and it is never
added to the aggregate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from secfl.data.datasets import Dataset
from secfl.encode.flatten import flatten_parameters, load_parameters
from secfl.errors import ConfigError
from secfl.randomness import Randomness


class ReferenceTrainer:
    """Train a copy of the global model for ``steps`` plain SGD steps on ``shared``.

    The batch order comes from the run's ``trust.reference`` stream for the round and
    attempt (seeded mode: bit-identical on resume; it is not secret, it only orders a public
    dataset)."""

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        shared: Dataset,
        randomness: Randomness,
        *,
        steps: int,
        lr: float,
        batch_size: int,
    ) -> None:
        if len(shared) == 0:
            raise ConfigError(
                "trust needs a reference update on the public shared dataset, but "
                "data.shared.per_class=0 leaves it empty: allowed per_class >= 1"
            )
        if steps < 1 or batch_size < 1 or not lr > 0:
            raise ConfigError(
                f"trust.reference: steps={steps}, batch_size={batch_size} must be >= 1 and "
                f"lr={lr} > 0"
            )
        self._model = model_factory()
        self._x = torch.from_numpy(shared.x)
        self._y = torch.from_numpy(shared.y)
        self.randomness = randomness
        self.steps = steps
        self.lr = lr
        self.batch_size = min(batch_size, len(shared))

    def reference_update(
        self, weights: np.ndarray, *, round_index: int, attempt: int
    ) -> np.ndarray:
        """The float32 delta after training from ``weights`` (the broadcast global model)."""
        start = np.array(weights, dtype=np.float32)
        load_parameters(self._model, start)
        seed = self.randomness.stream(
            "trust.reference", round_index=round_index, attempt=attempt
        ).seed_int()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.SGD(self._model.parameters(), lr=self.lr)
        loss_fn = nn.CrossEntropyLoss()
        self._model.train()
        n = self._y.shape[0]
        order = torch.randperm(n, generator=generator)
        cursor = 0
        for _ in range(self.steps):
            if cursor + self.batch_size > n:
                order = torch.randperm(n, generator=generator)
                cursor = 0
            batch = order[cursor : cursor + self.batch_size]
            cursor += self.batch_size
            optimizer.zero_grad(set_to_none=True)
            loss_fn(self._model(self._x[batch]), self._y[batch]).backward()
            optimizer.step()
        return flatten_parameters(self._model) - start
