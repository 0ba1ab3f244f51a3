"""Local training: plain SGD/Adam over the client's records, optionally distilled from the
global model as teacher (:mod:`secfl.client.distill`); and the FedSGD-style gradient of the
local objective at the global weights (``client.update_kind: gradients``). DP-SGD is in
:mod:`secfl.privacy.dpsgd`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfl.config import ClientConfig
from secfl.data.datasets import Dataset
from secfl.errors import ModelError
from secfl.randomness import RandomStream


@dataclass(frozen=True)
class LocalResult:
    num_samples: int
    mean_loss: float
    steps: int


def make_optimizer(model: nn.Module, config: ClientConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def train_locally(
    model: nn.Module,
    data: Dataset,
    config: ClientConfig,
    stream: RandomStream,
    *,
    teacher: torch.Tensor | None = None,
) -> LocalResult:
    """``config.epochs`` passes over ``data`` in shuffled mini-batches; the batch order comes
    from ``stream`` (not secret: it only fixes the order). With ``config.distill`` the loss
    is the distillation objective against ``teacher``, the frozen global model's logits on
    ``data`` (:func:`secfl.client.distill.teacher_logits`)."""
    from secfl.client.distill import distillation_loss

    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    n = len(data)
    distill = config.distill
    if distill is not None and (teacher is None or teacher.shape[0] != n):
        raise ModelError(
            "client.distill needs the teacher's logits on every training record "
            f"({n}), got {None if teacher is None else tuple(teacher.shape)}"
        )
    order_rng = stream.numpy_generator()
    optimizer = make_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(config.epochs):
        order = torch.from_numpy(order_rng.permutation(n))
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            if distill is None or teacher is None:
                loss = loss_fn(model(x[batch]), y[batch])
            else:
                loss = distillation_loss(
                    model(x[batch]),
                    y[batch],
                    teacher[batch],
                    temperature=distill.temperature,
                    alpha=distill.alpha,
                )
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return LocalResult(num_samples=n, mean_loss=total / max(steps, 1), steps=steps)


def local_gradient(model: nn.Module, data: Dataset, config: ClientConfig) -> LocalResult:
    """The mean gradient over ``data`` of the local objective at the model's current (the
    global) weights, left in the parameters' ``.grad``; no parameter changes.

    US20210182661A1 has the slave device compute gradients of the version of the model it
    received, on its private data, and the master update its model with them: one pass at
    the global weights (FedSGD, McMahan et al. 2017), not the accumulated gradient of local
    steps (that would be the weights update divided by the learning rate). The objective is
    the mean cross-entropy plus ``weight_decay / 2 * ||w||^2`` (the decay SGD applies); it
    is computed in chunks of ``batch_size`` records summed exactly, so the result does not
    depend on the batch size beyond float rounding."""
    n = len(data)
    if n < 1:
        raise ModelError("client has no records to compute a gradient on")
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    model.train()
    model.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, n, config.batch_size):
        loss = nn.functional.cross_entropy(
            model(x[start : start + config.batch_size]),
            y[start : start + config.batch_size],
            reduction="sum",
        )
        (loss / n).backward()
        total += float(loss.detach())
    if config.weight_decay > 0:
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.add_(p, alpha=config.weight_decay)
    return LocalResult(num_samples=n, mean_loss=total / n, steps=0)


def flatten_gradients(model: nn.Module) -> np.ndarray:
    """The parameters' ``.grad`` as one float32 vector in :func:`flatten_parameters` order
    (zeros for a parameter the objective does not reach)."""
    with torch.no_grad():
        parts = [
            (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
            for p in model.parameters()
        ]
        return torch.cat(parts).numpy().astype(np.float32, copy=True)


def evaluate(
    model: nn.Module, data: Dataset, *, batch_size: int = 1024
) -> tuple[np.ndarray, float]:
    """Per-record correctness (bool array) and mean cross-entropy of ``model`` on ``data``."""
    model.eval()
    correct = np.empty(len(data), dtype=bool)
    loss_sum = 0.0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            xb = torch.from_numpy(data.x[start : start + batch_size])
            yb = torch.from_numpy(data.y[start : start + batch_size])
            logits = model(xb)
            loss_sum += float(loss_fn(logits, yb))
            correct[start : start + batch_size] = (logits.argmax(dim=1) == yb).numpy()
    return correct, loss_sum / max(len(data), 1)
