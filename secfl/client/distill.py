"""Teacher and student on the client (US20210182661A1, claims 1-2).

The client instantiates the broadcast global model twice: a frozen teacher and the student
it trains on its private records. The student's per-record objective is Hinton et al.'s
("Distilling the knowledge in a neural network", 2015)

    (1 - alpha) * CE(student_i, y_i)
        + alpha * T^2 * KL(softmax(teacher_i / T) || softmax(student_i / T))

where the T^2 keeps the soft term's gradient on the scale of the hard term's as T changes.
Record i's loss depends only on record i and on the teacher (a function of the global
model, which every participant receives), so the per-sample gradient engines of DP-SGD clip
it like the plain cross-entropy and the sample-level accounting does not change.

With ``alpha = 0`` the objective is the cross-entropy bit for bit (``1.0 * ce + 0.0 * kl``
is exact in floating point, forward and backward), which a test checks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from secfl.config import DistillConfig

#: A per-record loss: ``(logits, labels, teacher_logits) -> losses`` of shape (B,).
RecordLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """The student's objective (module docstring), averaged over the batch or per record."""
    ce = F.cross_entropy(logits, labels, reduction=reduction)
    student = F.log_softmax(logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    # KL(teacher || student) per record: sum_k p_t (log p_t - log p_s)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    if reduction == "mean":
        kl = kl.mean()
    return (1.0 - alpha) * ce + (alpha * temperature * temperature) * kl


def record_distillation_loss(config: DistillConfig) -> RecordLoss:
    """The per-record objective for the DP-SGD engines (teacher logits are required)."""
    temperature, alpha = config.temperature, config.alpha

    def loss(
        logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None
    ) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError("the distillation loss needs the teacher's logits")
        return distillation_loss(
            logits,
            labels,
            teacher_logits,
            temperature=temperature,
            alpha=alpha,
            reduction="none",
        )

    return loss


def teacher_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The frozen teacher's logits on the client's records: a copy of ``model`` (loaded with
    the broadcast global weights) in eval mode, without gradients. Computed once per round:
    the teacher never changes during local training."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        parts = [teacher(x[start : start + batch_size]) for start in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


def softened_kl(
    student: nn.Module, teacher: torch.Tensor, x: torch.Tensor, *, temperature: float
) -> float:
    """Mean KL(softmax(teacher / T) || softmax(student / T)) over ``x`` (a diagnostic)."""
    student.eval()
    with torch.no_grad():
        s = F.log_softmax(student(x) / temperature, dim=-1)
        t = F.log_softmax(teacher / temperature, dim=-1)
        return float((t.exp() * (t - s)).sum(dim=-1).mean())
