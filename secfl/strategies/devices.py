"""A simulated device population and the cost of a task on each device (issue 9).

Each device has a compute speed (FLOP/s) and an upload bandwidth (bytes/s), log-normal
around configured medians, drawn once from the seed (``strategy.devices``: experiment design,
seeded in every randomness mode so that a policy and its baseline see the same devices), and
is available in a round with a fixed probability, drawn per round from the run's randomness
(``strategy.availability``: it follows the mode, like dropouts).

A task's cost on a device is its local training work (epochs x the device's records x the
model's training FLOPs per record) over the device's speed, plus the upload of one update
(the model's float32 size) over its bandwidth. Times are simulated seconds: nothing here
reads the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfl.config import DevicePopulationConfig
from secfl.errors import ConfigError
from secfl.randomness import Randomness

#: Bytes per parameter of an uploaded update (float32 before any encoding).
UPDATE_BYTES_PER_PARAMETER = 4
#: Training FLOPs per multiply-accumulate of the forward pass: forward 2, backward 4.
TRAINING_FLOPS_PER_MAC = 6


@dataclass(frozen=True, eq=False)
class DevicePopulation:
    """``count`` devices: ``speed`` in FLOP/s, ``bandwidth`` in bytes/s, and the probability
    ``availability`` that a device can take part in a round."""

    speed: np.ndarray
    bandwidth: np.ndarray
    availability: float

    def __post_init__(self) -> None:
        if self.speed.shape != self.bandwidth.shape or self.speed.ndim != 1:
            raise ConfigError(
                f"speed {self.speed.shape} and bandwidth {self.bandwidth.shape} must be "
                "vectors of one length"
            )
        if not (np.all(self.speed > 0) and np.all(self.bandwidth > 0)):
            raise ConfigError("device speeds and bandwidths must be > 0")
        if not 0 < self.availability <= 1:
            raise ConfigError(f"availability must be in (0, 1], got {self.availability}")

    @property
    def count(self) -> int:
        return int(self.speed.size)

    @classmethod
    def draw(cls, spec: DevicePopulationConfig, randomness: Randomness) -> DevicePopulation:
        """Log-normal speeds and bandwidths from the seed's ``strategy.devices`` stream."""
        z = randomness.stream("strategy.devices").normal(2 * spec.count)
        return cls(
            speed=spec.speed_median * np.exp(spec.speed_sigma * z[: spec.count]),
            bandwidth=spec.bandwidth_median * np.exp(spec.bandwidth_sigma * z[spec.count :]),
            availability=spec.availability,
        )

    def available(self, randomness: Randomness, round_index: int) -> np.ndarray:
        """Which devices can take part in round ``round_index`` (Bernoulli per device)."""
        stream = randomness.stream("strategy.availability", round_index=round_index)
        return stream.bernoulli(self.availability, self.count)


@dataclass(frozen=True, eq=False)
class TaskWorkload:
    """What one participation in a task costs: ``epochs`` passes over a device's
    ``records`` at ``flops_per_record`` each, then an upload of ``upload_bytes``."""

    name: str
    flops_per_record: float
    epochs: int
    upload_bytes: int
    records: np.ndarray

    def device_times(self, population: DevicePopulation) -> np.ndarray:
        """Simulated seconds of compute plus upload for every device."""
        if self.records.shape != population.speed.shape:
            raise ConfigError(
                f"task {self.name!r} has records for {self.records.size} devices, the "
                f"population {population.count}"
            )
        compute = self.epochs * self.records * self.flops_per_record / population.speed
        return compute + self.upload_bytes / population.bandwidth


def forward_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one record's forward pass through the linear and
    convolution layers (the rest is negligible for these models), counted on a zero input."""
    total = 0

    def count(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        weight = getattr(module, "weight", None)
        if weight is None:
            return
        if isinstance(module, nn.Linear):
            total += int(weight.numel()) * int(output[0].numel() // module.out_features)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            # each output position of each output channel costs one kernel of MACs
            positions = int(output[0].numel() // module.out_channels)
            total += int(weight.numel()) * positions

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def workload_of(
    name: str,
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    epochs: int,
    records: np.ndarray,
) -> TaskWorkload:
    """A task's workload from its model (training FLOPs per record, update size)."""
    parameters = sum(int(p.numel()) for p in model.parameters())
    return TaskWorkload(
        name=name,
        flops_per_record=float(TRAINING_FLOPS_PER_MAC * forward_macs(model, input_shape)),
        epochs=epochs,
        upload_bytes=UPDATE_BYTES_PER_PARAMETER * parameters,
        records=np.asarray(records, dtype=np.float64),
    )
