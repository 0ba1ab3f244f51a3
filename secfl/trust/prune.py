"""Post-aggregation pruning of dormant units (Fine-Pruning style; ``trust.prune``).

Liu, Dolan-Gavitt and Garg (RAID 2018, "Fine-Pruning") observed that a backdoor lives in
capacity that clean inputs leave unused: units dormant on clean data that the trigger
drives. Here the server, after every round, feeds the public shared dataset
(``data.shared``) through the new global model, measures the mean absolute activation of
every input unit of the model's fully-connected (``nn.Linear``) layers, and sets to zero
the weights fed by the units whose mean activation is below ``tau`` times the median of
their layer. For the first layer of an MLP the units are the input features, so a weight
column fed by a feature that is (nearly) zero in every public record is reset each round:
honest training cannot move such a weight (its gradient is the feature times the error),
so only records unlike the public ones (a trigger stamped on otherwise blank pixels) give
it a value.

The decision uses nothing but the revealed global model and the public shared set, so it
is the same in every protection mode (``none``, ``ckks``, ``masking``): it needs no
per-client vector and no knowledge of any attack. It is stateless (recomputed each round
from the current weights), so a resumed run prunes exactly as an uninterrupted one.

Limits: a trigger on features that are active in the public data is untouched; convolution
weights are shared across positions, so pixel-level dormancy cannot be expressed in them
(for a CNN only its fully-connected head is pruned).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from secfl.data.datasets import Dataset
from secfl.encode.flatten import flatten_parameters, load_parameters
from secfl.errors import ConfigError

PruneLayers = Literal["first", "all"]


@dataclass(frozen=True)
class PruneReport:
    """One round's pruning: per pruned layer (index among the model's ``nn.Linear``
    layers) the dormant input units, how many weights were non-zero before the reset, and
    the L2 norm of what was removed."""

    units: dict[int, list[int]] = field(default_factory=dict)
    zeroed: int = 0
    removed_norm: float = 0.0


def dormant_share(update: np.ndarray, mask: np.ndarray) -> float:
    """The share of ``update``'s L2 norm on the weights ``mask`` selects (0 for a zero
    update)."""
    update = np.asarray(update, dtype=np.float64)
    total = float(np.linalg.norm(update))
    return float(np.linalg.norm(update[mask])) / total if total > 0 else 0.0


def dormant_units(activity: np.ndarray, tau: float) -> np.ndarray:
    """Indices of the units whose mean absolute activation ``activity`` is at most ``tau``
    times the layer's median (a unit that is exactly zero on every record is dormant for
    any ``tau`` >= 0; a layer whose median is zero prunes only exact zeros)."""
    activity = np.asarray(activity, dtype=np.float64)
    bound = tau * float(np.median(activity))
    return np.flatnonzero(activity <= bound)


class DormantPruner:
    """Reset the weights fed by units dormant on the public shared dataset."""

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        shared: Dataset,
        *,
        layers: PruneLayers = "first",
        tau: float = 0.05,
    ) -> None:
        if len(shared) == 0:
            raise ConfigError(
                "trust.prune measures activations on the public shared dataset, but "
                "data.shared.per_class=0 leaves it empty: allowed per_class >= 1"
            )
        if not 0 <= tau < 1:
            raise ConfigError(f"trust.prune.tau={tau!r} is not allowed: [0, 1)")
        if layers not in ("first", "all"):
            raise ConfigError(f"trust.prune.layers={layers!r}; allowed 'first', 'all'")
        self._model = model_factory()
        self._linear = [m for m in self._model.modules() if isinstance(m, nn.Linear)]
        if not self._linear:
            raise ConfigError("trust.prune needs a model with fully-connected (Linear) layers")
        self._x = torch.from_numpy(np.ascontiguousarray(shared.x, dtype=np.float32))
        offsets, offset = {}, 0
        for parameter in self._model.parameters():
            offsets[id(parameter)] = offset
            offset += parameter.numel()
        self._size = offset
        #: Where each Linear layer's weight starts in the flat parameter vector.
        self._offsets = [offsets[id(layer.weight)] for layer in self._linear]
        self.layers = layers
        self.tau = float(tau)

    def _activity(self) -> list[np.ndarray]:
        """Mean |input| of every Linear layer over the shared records."""
        seen: list[torch.Tensor] = []

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
            seen.append(inputs[0].detach().flatten(1).abs().mean(dim=0))

        handles = [layer.register_forward_hook(hook) for layer in self._linear]
        try:
            self._model.eval()
            with torch.no_grad():
                self._model(self._x)
        finally:
            for handle in handles:
                handle.remove()
        return [s.double().numpy() for s in seen]

    def _dormant(self, weights: np.ndarray) -> dict[int, np.ndarray]:
        """Per chosen Linear layer (index), its input units dormant at ``weights``."""
        load_parameters(self._model, np.asarray(weights, dtype=np.float32))
        activity = self._activity()
        chosen = range(len(self._linear)) if self.layers == "all" else range(1)
        found = {i: dormant_units(activity[i], self.tau) for i in chosen}
        return {i: units for i, units in found.items() if units.size}

    def mask(self, weights: np.ndarray) -> np.ndarray:
        """Boolean mask over the flat parameter vector: the weights fed by units dormant on
        the shared set at the global model ``weights`` (what :meth:`prune` would reset)."""
        mask = np.zeros(self._size, dtype=bool)
        for index, units in self._dormant(weights).items():
            rows, columns = self._linear[index].weight.shape
            flat = np.arange(rows)[:, None] * columns + units[None, :]
            mask[self._offsets[index] + flat.ravel()] = True
        return mask

    def prune(self, weights: np.ndarray) -> PruneReport:
        """Zero, in place in the flat float32 ``weights``, the weights fed by dormant units."""
        dormant_by_layer = self._dormant(weights)
        units: dict[int, list[int]] = {}
        zeroed, removed = 0, 0.0
        with torch.no_grad():
            for index, dormant in dormant_by_layer.items():
                columns = self._linear[index].weight[:, torch.from_numpy(dormant)]
                zeroed += int(torch.count_nonzero(columns))
                removed += float(torch.sum(columns.double() ** 2))
                self._linear[index].weight[:, torch.from_numpy(dormant)] = 0.0
                units[index] = [int(u) for u in dormant]
        if zeroed:
            weights[...] = flatten_parameters(self._model)
        return PruneReport(units=units, zeroed=zeroed, removed_norm=removed**0.5)
