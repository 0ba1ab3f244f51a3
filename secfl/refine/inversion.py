"""Model inversion: synthetic inputs that a teacher classifies as chosen target classes.

DeepInversion (Yin et al., CVPR 2020) without BatchNorm: the objective is the teacher's
cross-entropy towards the target class, image priors (total variation along every spatial
axis, an l2 penalty) and, when the clients released them, matching of per-layer activation
moments (:mod:`secfl.refine.moments`). The teacher is a list of models whose logits are
averaged (an ensemble); which models may be inverted is the guard's business
(:mod:`secfl.refine.guard`), not this module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from secfl.randomness import RandomStream
from secfl.refine.moments import ActivationMoments, MomentProbe

#: Default ``input_spread``: the synthetic inputs' std over the population's. 1.05 kept the
#: memorisation ratio at 1.02-1.37 in the refine benchmark; with ``refine.shared`` the model
#: is also fine-tuned on real records and its inversions sit nearer the training records
#: (MNIST-1D: 0.986 at 1.05, 0.990 at 1.12, 1.08-1.18 at 1.2; docs/refinement.md).
INPUT_SPREAD = 1.05
INPUT_SPREAD_WITH_SHARED_TUNING = 1.2


def default_input_spread(shared_tuning: bool) -> float:
    return INPUT_SPREAD_WITH_SHARED_TUNING if shared_tuning else INPUT_SPREAD


@dataclass(frozen=True)
class InversionSettings:
    per_class: int = 10
    steps: int = 200
    lr: float = 0.1
    tv: float = 1e-3
    l2: float = 1e-4
    #: Weight of the activation-moment matching term (0 turns it off).
    feature_stats: float = 1.0
    #: The inputs' per-feature std is matched to this multiple of the population's (0: not
    #: matched). Exactly the data's spread puts samples as near the training records as
    #: unseen records are; a little wider keeps them off the records.
    input_spread: float = INPUT_SPREAD
    #: Input features whose std is at most this fraction of the median feature's std (border
    #: pixels that are constant in the data) are held at their mean: synthetic samples stay
    #: on the data's support instead of inventing signal there (0 turns it off).
    support_floor: float = 0.05
    #: Weight of the teacher-disagreement term (DENSE / FedFTG style diversity); needs a
    #: student. 0 turns it off.
    adversarial: float = 0.0

    @classmethod
    def of(cls, block: Any, *, shared_tuning: bool = False) -> InversionSettings:
        """From a ``refine.server_inversion`` / ``refine.client_inversion`` config block;
        ``shared_tuning``: ``refine.shared`` is on (it decides the default ``input_spread``)."""
        return cls(
            per_class=block.per_class,
            steps=block.steps,
            lr=block.lr,
            tv=block.tv,
            l2=block.l2,
            feature_stats=block.feature_stats,
            input_spread=default_input_spread(shared_tuning)
            if block.input_spread is None
            else block.input_spread,
            support_floor=block.support_floor,
            adversarial=block.adversarial,
        )


@dataclass(frozen=True, eq=False)
class SyntheticSet:
    """Synthetic inputs ``x`` (float32, shaped like the real inputs) and target labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbours along every axis after (batch, channel)."""
    terms = []
    for axis in range(2, x.dim()):
        if x.shape[axis] > 1:
            length = x.shape[axis] - 1
            terms.append((x.narrow(axis, 1, length) - x.narrow(axis, 0, length)).abs().mean())
    return torch.stack(terms).sum() if terms else x.new_zeros(())


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The mean of the models' logits (FedDF's ensemble)."""
    return torch.stack([m(x) for m in models]).mean(dim=0)


def invert(
    teachers: Sequence[nn.Module],
    *,
    input_shape: tuple[int, ...],
    classes: Sequence[int],
    settings: InversionSettings,
    stream: RandomStream,
    moments: ActivationMoments | None = None,
    moments_model: nn.Module | None = None,
    student: nn.Module | None = None,
) -> SyntheticSet:
    """``settings.per_class`` synthetic inputs per class in ``classes``, optimised so that the
    teacher ensemble assigns each its target class (see the module docstring).

    ``moments_model`` is the model whose activations ``moments`` describe (the broadcast
    model of the statistics round); the hidden-layer moments are matched on its activations,
    never on a model they were not computed under. Default: ``teachers[0]``."""
    if not teachers:
        raise ValueError("model inversion needs at least one teacher model")
    targets = np.repeat(np.asarray(classes, dtype=np.int64), settings.per_class)
    init = stream.numpy_generator().standard_normal((len(targets), *input_shape))
    outside: torch.Tensor | None = None
    held: torch.Tensor | None = None
    if moments is not None and moments.input_mean is not None:
        mean = moments.input_mean.reshape(input_shape)
        std = np.sqrt(np.maximum(moments.input_var.reshape(input_shape), 1e-6))
        init = mean + std * init
        if settings.support_floor > 0:
            off = std <= settings.support_floor * float(np.median(std))
            if off.any():
                outside = torch.from_numpy(off)
                held = torch.from_numpy(mean.astype(np.float32))
                init = np.where(off, mean, init)
    x = torch.tensor(init, dtype=torch.float32, requires_grad=True)
    y = torch.from_numpy(targets)
    if student is not None:
        student.eval()
    probed = teachers[0] if moments_model is None else moments_model
    # a probed model outside the ensemble needs its own forward pass every step
    extra = None if any(probed is t for t in teachers) else probed
    frozen = [*teachers, *([] if extra is None else [extra])]
    for model in frozen:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    probe = None
    if moments is not None and settings.feature_stats > 0:
        probe = MomentProbe(probed)
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    try:
        for _ in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            if probe is not None:
                probe.start(x)
                if extra is not None:
                    extra(x)
            logits = ensemble_logits(teachers, x)
            loss = F.cross_entropy(logits, y)
            loss = loss + settings.tv * total_variation(x) + settings.l2 * x.pow(2).mean()
            if probe is not None and moments is not None:
                loss = loss + settings.feature_stats * probe.matching_loss(
                    moments, input_spread=settings.input_spread
                )
            if student is not None and settings.adversarial > 0:
                # push samples to where the student still disagrees with the teacher
                t = F.softmax(logits, dim=1)
                s = F.log_softmax(student(x), dim=1)
                loss = loss - settings.adversarial * F.kl_div(s, t, reduction="batchmean")
            loss.backward()
            optimizer.step()
            if outside is not None and held is not None:
                with torch.no_grad():
                    x.copy_(torch.where(outside, held, x))
    finally:
        if probe is not None:
            probe.close()
        for model in frozen:
            for p in model.parameters():
                p.requires_grad_(True)
    return SyntheticSet(x.detach().numpy().astype(np.float32), targets)
