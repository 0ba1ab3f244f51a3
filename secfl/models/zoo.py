"""Model zoo: an MLP and small CNNs for 8x8 images and 1-D signals.

Normalisation is GroupNorm, never BatchNorm: BatchNorm mixes samples within a batch, which
breaks per-sample gradient clipping in DP-SGD and leaks batch statistics.
"""

from __future__ import annotations

import math

from torch import nn

from secfl.config import ModelConfig
from secfl.errors import ModelError

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _groups(channels: int, wanted: int) -> int:
    """The largest group count <= ``wanted`` that divides ``channels``."""
    for g in range(min(wanted, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class MLP(nn.Module):
    """Flatten, then fully-connected layers with the chosen activation."""

    def __init__(
        self, in_features: int, hidden: list[int], num_classes: int, activation: str
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv -> GroupNorm -> activation blocks (2-D for images, 1-D for signals), pooling
    after each block while the spatial size allows, then a classifier head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: list[int],
        hidden: list[int],
        num_classes: int,
        activation: str,
        groups: int,
    ) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ModelError(
                f"cnn needs inputs shaped (C, L) or (C, H, W), got {input_shape}; use mlp"
            )
        two_d = len(input_shape) == 3
        conv: type[nn.Module] = nn.Conv2d if two_d else nn.Conv1d
        pool: type[nn.Module] = nn.MaxPool2d if two_d else nn.MaxPool1d
        kernel = 3 if two_d else 5
        layers: list[nn.Module] = []
        width, spatial = input_shape[0], list(input_shape[1:])
        for c in channels:
            layers += [
                conv(width, c, kernel_size=kernel, padding=kernel // 2),
                nn.GroupNorm(_groups(c, groups), c),
                _ACTIVATIONS[activation](),
            ]
            if min(spatial) >= 4:
                layers.append(pool(2))
                spatial = [s // 2 for s in spatial]
            width = c
        self.features = nn.Sequential(*layers)
        flat = width * math.prod(spatial)
        self.head = MLP(flat, hidden, num_classes, activation)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x))


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model ``config`` names, for inputs of ``input_shape`` and ``num_classes`` outputs."""
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    if config.kind == "mlp":
        return MLP(math.prod(input_shape), list(config.hidden), num_classes, config.activation)
    return SmallCNN(
        input_shape,
        list(config.channels),
        list(config.hidden),
        num_classes,
        config.activation,
        config.groups,
    )
