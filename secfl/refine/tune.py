"""Server-side tuning of the aggregate: on the public shared set, or by distillation.

Both start from the round's aggregate ``w_a`` and add a proximal term
``prox / 2 * ||w - w_a||^2`` so a few server steps adjust the federation's model instead of
replacing it (US20230083116A1's shared-dataset adjustment; FedDF's ensemble distillation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from secfl.encode.flatten import flatten_parameters, load_parameters
from secfl.randomness import RandomStream


def _proximal(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    return sum(
        ((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)),
        start=torch.zeros(()),
    )


def _batches(n: int, batch_size: int, steps: int, stream: RandomStream) -> list[np.ndarray]:
    rng = stream.numpy_generator()
    out: list[np.ndarray] = []
    order = rng.permutation(n)
    at = 0
    for _ in range(steps):
        if at >= n:
            order, at = rng.permutation(n), 0
        out.append(order[at : at + batch_size])
        at += batch_size
    return out


def finetune_on_shared(
    model: nn.Module,
    weights: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    prox: float,
    stream: RandomStream,
) -> np.ndarray:
    """``steps`` SGD steps of cross-entropy on (x, y) from ``weights``; new weights."""
    load_parameters(model, weights)
    anchor = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for batch in _batches(len(y), batch_size, steps, stream):
        idx = torch.from_numpy(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt[idx]), yt[idx]) + prox / 2 * _proximal(model, anchor)
        loss.backward()
        optimizer.step()
    return flatten_parameters(model)


def distill(
    student: nn.Module,
    weights: np.ndarray,
    teachers: Sequence[nn.Module],
    x: np.ndarray,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    temperature: float,
    prox: float,
    stream: RandomStream,
    optimizer: str = "sgd",
) -> np.ndarray:
    """Distil the teacher ensemble's softened mean logits into ``student`` (started from
    ``weights``) on the inputs ``x``: KL at ``temperature`` (scaled by T^2) plus the
    proximal term. New weights.

    ``optimizer`` ``sgd`` (momentum 0.9) moves the student in proportion to how much the
    teachers disagree with it, so an aggregate the teachers already agree with (IID rounds)
    barely changes; ``adam`` normalises every step and moves each weight by about ``lr``
    whatever the disagreement."""
    load_parameters(student, weights)
    anchor = [p.detach().clone() for p in student.parameters()]
    xt = torch.from_numpy(x)
    with torch.no_grad():
        for t in teachers:
            t.eval()
        targets = torch.stack([t(xt) for t in teachers]).mean(dim=0)
        soft = F.softmax(targets / temperature, dim=1)
    params = list(student.parameters())
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        raise ValueError(f"unknown distillation optimizer {optimizer!r}; allowed: sgd, adam")
    student.train()
    for batch in _batches(len(x), batch_size, steps, stream):
        idx = torch.from_numpy(batch)
        opt.zero_grad(set_to_none=True)
        log_p = F.log_softmax(student(xt[idx]) / temperature, dim=1)
        loss = F.kl_div(log_p, soft[idx], reduction="batchmean") * temperature**2
        loss = loss + prox / 2 * _proximal(student, anchor)
        loss.backward()
        opt.step()
    return flatten_parameters(student)
