"""Per-layer activation moments: the feature statistics model inversion matches.

DP models have no BatchNorm, so the running statistics DeepInversion matches do not exist.
Instead each client computes, on its own records and under the broadcast global model, one
*moment vector* per record: for the input and for the output of every activation module (in
``model.modules()`` order), the per-feature value and its square (features are units of a
fully-connected layer, or channels averaged over positions of a convolution), followed by
one *count coordinate* of constant value ``COUNT_FRACTION * clip``. Each record's vector is
clipped to L2 norm ``clip``; the client sums them and adds Gaussian noise of standard
deviation ``noise_multiplier * clip`` from its CSPRNG stream (the Gaussian mechanism on a
sum of sensitivity ``clip`` under add/remove of one record, charged to the client's
record-level ledger), and the sum is securely aggregated like an update
(:mod:`secfl.refine.collect`). The server only ever sees the noised population sums.

Clipping scales a record's vector by ``f = min(1, clip / norm)``. Dividing the summed
moments by the record count would shrink every mean and second moment by the average
``f`` (on a trained MNIST-1D CNN at ``clip`` 20, 89% of the records are clipped and the
released standard deviations were a fraction of the data's). The count coordinate sums to
``COUNT_FRACTION * clip * sum(f)``, so dividing by it instead gives the ``f``-weighted mean
of the unscaled vectors (a self-normalised clipped mean): no shrinkage, only records with
large activations weigh less.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfl.randomness import RandomStream

#: The count coordinate's value, as a fraction of ``clip``: large enough that its noise
#: (relative error ``noise_multiplier / (COUNT_FRACTION * sum(f))`` per client) is small,
#: small enough that it adds little to a record's norm.
COUNT_FRACTION = 0.25

_ACTIVATION_TYPES = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.LeakyReLU)


def _features(t: torch.Tensor) -> torch.Tensor:
    """(batch, features): units as they are, channels averaged over positions."""
    if t.dim() > 2:
        return t.flatten(2).mean(dim=2)
    return t


def _activation_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _ACTIVATION_TYPES)]


class MomentProbe:
    """Forward hooks that capture the input and every activation's features."""

    def __init__(self, model: nn.Module) -> None:
        self._captured: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._capture) for m in _activation_modules(model)]

    def _capture(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._captured.append(_features(output))

    def start(self, x: torch.Tensor) -> None:
        """Begin a forward pass on ``x`` (captures the input as layer 0)."""
        self._captured = [x.flatten(1)]

    def layers(self) -> list[torch.Tensor]:
        return list(self._captured)

    def matching_loss(
        self, target: ActivationMoments, *, input_spread: float = 1.0
    ) -> torch.Tensor:
        """Sum over layers of ||mean - target mean|| + ||std - target std|| (DeepInversion's
        feature-distribution regulariser, with moments in place of BatchNorm statistics).

        Layer 0 (the raw inputs) is matched to ``input_spread`` times the population's
        per-feature std (0 leaves its std term out): samples spread exactly like the data sit
        as close to the training records as unseen records do, so a spread a little wider
        keeps them off the records (see :mod:`secfl.refine.memorisation`)."""
        layers = self.layers()
        if len(layers) != len(target.mean):
            raise ValueError(
                f"moment layout mismatch: the model has {len(layers)} probed layers, the "
                f"released moments {len(target.mean)}"
            )
        loss = layers[0].new_zeros(())
        for layer, (feats, mean, var) in enumerate(
            zip(layers, target.mean, target.var, strict=True)
        ):
            mu = feats.mean(dim=0)
            loss = loss + torch.linalg.vector_norm(mu - torch.from_numpy(mean))
            scale = input_spread if layer == 0 else 1.0
            if scale > 0:
                sd = (feats.pow(2).mean(dim=0) - mu.pow(2)).clamp_min(1e-8).sqrt()
                loss = loss + torch.linalg.vector_norm(sd - scale * torch.from_numpy(np.sqrt(var)))
        return loss

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def record_moment_vectors(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Per-record moment vectors (rows) and the feature count of each probed layer."""
    probe = MomentProbe(model)
    model.eval()
    try:
        with torch.no_grad():
            xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
            probe.start(xt)
            model(xt)
            layers = probe.layers()
    finally:
        probe.close()
    sizes = [int(f.shape[1]) for f in layers]
    rows = torch.cat([torch.cat([f, f.pow(2)], dim=1) for f in layers], dim=1)
    return rows.numpy().astype(np.float64), sizes


def moment_dimension(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Length of a release: the moment vector plus the count coordinate."""
    rows, _ = record_moment_vectors(model, np.zeros((1, *input_shape), dtype=np.float32))
    return int(rows.shape[1]) + 1


def noised_moment_sum(
    model: nn.Module,
    x: np.ndarray,
    *,
    clip: float,
    noise_multiplier: float,
    stream: RandomStream,
) -> np.ndarray:
    """The client's release: sum of per-record vectors (moments, then the count coordinate)
    clipped to ``clip``, plus N(0, (noise_multiplier * clip)^2) per coordinate from
    ``stream`` (CSPRNG)."""
    moments, _ = record_moment_vectors(model, x)
    count = np.full((len(moments), 1), COUNT_FRACTION * clip)
    rows = np.concatenate([moments, count], axis=1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    total = rows.sum(axis=0)
    if noise_multiplier > 0:
        total = total + noise_multiplier * clip * stream.normal(total.size)
    return total


@dataclass(frozen=True, eq=False)
class ActivationMoments:
    """Population mean and variance of every probed layer's features (layer 0 = input)."""

    mean: tuple[np.ndarray, ...]
    var: tuple[np.ndarray, ...]

    @property
    def input_mean(self) -> np.ndarray:
        return self.mean[0]

    @property
    def input_var(self) -> np.ndarray:
        return self.var[0]

    @classmethod
    def from_mean_vector(cls, vector: np.ndarray, sizes: list[int]) -> ActivationMoments:
        """From the population mean of the moment vectors (values, then squares, per
        layer). Noise can make a second moment smaller than the squared mean; variances
        are floored at a small positive value."""
        if vector.size != 2 * sum(sizes):
            raise ValueError(
                f"moment vector has {vector.size} values, the layout needs {2 * sum(sizes)}"
            )
        means, variances, at = [], [], 0
        for size in sizes:
            mu = vector[at : at + size]
            second = vector[at + size : at + 2 * size]
            at += 2 * size
            means.append(mu.astype(np.float32))
            variances.append(np.maximum(second - mu**2, 1e-4).astype(np.float32))
        return cls(tuple(means), tuple(variances))

    @classmethod
    def from_release(
        cls, total: np.ndarray, sizes: list[int], *, clip: float
    ) -> ActivationMoments | None:
        """From released sums (:func:`noised_moment_sum`, summed or averaged over clients:
        any common scale cancels): the moment sums over the count coordinate. ``None`` when
        the noised count is not positive (too few records for the noise)."""
        if total.size != 2 * sum(sizes) + 1:
            raise ValueError(
                f"moment release has {total.size} values, the layout needs "
                f"{2 * sum(sizes) + 1} (moments and the count coordinate)"
            )
        count = float(total[-1]) / (COUNT_FRACTION * clip)
        if not count > 0:
            return None
        return cls.from_mean_vector(total[:-1] / count, sizes)

    @classmethod
    def of_data(cls, model: nn.Module, x: np.ndarray) -> ActivationMoments:
        """Exact moments of ``x`` (no clipping or noise): for tests and public data only."""
        rows, sizes = record_moment_vectors(model, x)
        return cls.from_mean_vector(rows.mean(axis=0), sizes)
