"""Local training: plain SGD/Adam over the client's records (DP-SGD wraps this later)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfl.config import ClientConfig
from secfl.data.datasets import Dataset
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
    model: nn.Module, data: Dataset, config: ClientConfig, stream: RandomStream
) -> LocalResult:
    """``config.epochs`` passes over ``data`` in shuffled mini-batches; the batch order comes
    from ``stream`` (not secret: it only fixes the order)."""
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    n = len(data)
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
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return LocalResult(num_samples=n, mean_loss=total / max(steps, 1), steps=steps)


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
