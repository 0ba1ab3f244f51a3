"""Gradient inversion: recover training records from an observed update.

Two attacks, both run on whatever the server observed (one client's update in mode ``none``,
the released aggregate or sub-cohort mean under ``masking`` / ``ckks``):

* **analytic, through the first fully-connected layer** — for a layer ``z = W x + b`` and one
  record, ``dL/dW_i = (dL/dz_i) x`` and ``dL/db_i = dL/dz_i``, so every row ``i`` with
  ``dL/db_i != 0`` gives ``x = (dL/dW_i) / (dL/db_i)`` exactly (Phong et al. 2017; Fowl et al.
  2022 build malicious models on the same identity). A one-step update ``-lr * grad`` keeps
  the ratio. With several records a row mixes them, unless (after a ReLU) only one record
  activates it; each row is one candidate.
* **optimisation-based** (Geiping et al. NeurIPS 2020, "Inverting Gradients"): dummy inputs
  with the records' labels (assumed known, which only helps the attacker) are optimised so
  that their gradient has maximal cosine similarity with the observed one, plus total
  variation as an image prior. A multi-step FedAvg update is treated as one gradient.

Quality is PSNR against the true records over the dataset's value range; the baseline is the
PSNR of the public shared set's mean image (what the server knows without observing anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfl.encode.flatten import load_parameters

#: PSNR reported for an exact reconstruction (mean squared error below 1e-10 of the range).
PSNR_CAP = 100.0


def psnr(reconstruction: np.ndarray, truth: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, capped at :data:`PSNR_CAP`."""
    mse = float(np.mean((np.asarray(reconstruction, np.float64) - truth) ** 2))
    if mse <= 1e-10 * data_range**2:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(data_range**2 / mse))


def first_linear(model: nn.Module) -> tuple[int, int, nn.Linear]:
    """(offset of its weight in the flat parameter vector, of its bias, the layer) of the
    model's first fully-connected layer with a bias."""
    offset = 0
    offsets: dict[str, int] = {}
    for name, p in model.named_parameters():
        offsets[name] = offset
        offset += p.numel()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            prefix = f"{name}." if name else ""
            return offsets[prefix + "weight"], offsets[prefix + "bias"], module
    raise ValueError("the model has no fully-connected layer with a bias to invert through")


def invert_analytic(model: nn.Module, update: np.ndarray, *, min_bias: float = 1e-8) -> np.ndarray:
    """Candidates ``dW_i / db_i`` for every row ``i`` of the first fully-connected layer with
    ``|db_i|`` above ``min_bias`` relative to the largest; shape ``(rows, in_features)``."""
    w_at, b_at, layer = first_linear(model)
    rows, cols = layer.out_features, layer.in_features
    d_w = np.asarray(update[w_at : w_at + rows * cols], np.float64).reshape(rows, cols)
    d_b = np.asarray(update[b_at : b_at + rows], np.float64)
    scale = float(np.max(np.abs(d_b))) if d_b.size else 0.0
    if scale == 0.0:
        return np.empty((0, cols))
    keep = np.abs(d_b) > min_bias * scale
    return d_w[keep] / d_b[keep, None]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation over the last two axes (images), 0 for 1-D inputs."""
    if x.dim() < 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


@dataclass(frozen=True)
class OptimisationSettings:
    iterations: int = 200
    lr: float = 0.1
    tv_weight: float = 1e-2
    seed: int = 0


def invert_by_optimisation(
    model: nn.Module,
    weights: np.ndarray,
    update: np.ndarray,
    labels: np.ndarray,
    *,
    input_shape: tuple[int, ...],
    bounds: tuple[float, float],
    settings: OptimisationSettings,
) -> np.ndarray:
    """Geiping et al.: inputs whose gradient at ``weights`` best aligns (cosine) with
    ``-update``; shape ``(len(labels), *input_shape)``."""
    load_parameters(model, np.asarray(weights, np.float32))
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    target = -torch.from_numpy(np.array(update, dtype=np.float32))
    generator = torch.Generator().manual_seed(settings.seed)
    low, high = bounds
    start = low + (high - low) * torch.rand((len(labels), *input_shape), generator=generator)
    dummy = start.clone().requires_grad_(True)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    optimiser = torch.optim.Adam([dummy], lr=settings.lr * (high - low))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(settings.iterations):
        optimiser.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(loss_fn(model(dummy), y), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        cosine = nn.functional.cosine_similarity(flat, target, dim=0, eps=1e-12)
        objective = 1.0 - cosine + settings.tv_weight * total_variation(dummy)
        objective.backward()
        optimiser.step()
        with torch.no_grad():
            dummy.clamp_(low, high)
    return dummy.detach().numpy()


def best_match(
    candidates: np.ndarray, truths: np.ndarray, data_range: float, bounds: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """For each true record, the best PSNR over the candidates (clipped to the data bounds)
    and that candidate's index (-1 without candidates). Matching against the truth is the
    evaluator's privilege; it can only overstate the attack."""
    flat_truth = truths.reshape(len(truths), -1).astype(np.float64)
    if len(candidates) == 0:
        return np.full(len(truths), -math.inf), np.full(len(truths), -1)
    flat = np.clip(candidates.reshape(len(candidates), -1), *bounds).astype(np.float64)
    mse = ((flat_truth[:, None, :] - flat[None, :, :]) ** 2).mean(axis=2)
    best = mse.argmin(axis=1)
    scores = np.array(
        [psnr(flat[j], flat_truth[i], data_range) for i, j in enumerate(best)], dtype=np.float64
    )
    return scores, best
