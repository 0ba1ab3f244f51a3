"""Sample-level DP-SGD (Abadi et al. 2016) with a vectorised ``torch.func`` engine.

One step:

1. **Poisson sampling** — every record joins the batch independently with probability q.
   The coins are ``stream.uniform(n) < q`` from the client's :class:`RandomStream` (OS
   CSPRNG, or the AES-CTR DRBG in ``seeded`` mode). This is the same distribution Opacus'
   ``UniformWithReplacementSampler`` draws (``torch.rand(n) < q`` per step, Binomial(n, q)
   batch sizes, possibly empty) but with coins that are secret, as the amplification
   theorem assumes (Mironov, Talwar & Zhang 2019; Zhu & Wang 2019).
2. **per-sample gradients** — ``vmap(grad(loss))`` over the batch (tested against Opacus'
   ``GradSampleModule`` to 1e-6).
3. **clip** each per-sample gradient to L2 norm C over all parameters (Opacus' flat
   clipping: factor min(1, C / (norm + 1e-6))).
4. **noise** — N(0, (sigma C)^2) per coordinate, from ``stream.normal`` (Box–Muller in
   float64 on CSPRNG/DRBG uniforms; DESIGN 3b), never torch's or numpy's generators.
5. **average** by the *expected* batch size q n (as Opacus does for Poisson batches, so the
   batch size itself, which depends on the data, is never used).

Model validation uses Opacus' ``ModuleValidator``: BatchNorm and other layers that mix
samples are an error, or with ``fix`` are replaced by Opacus' fix with a logged notice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from secfl.errors import PrivacyError
from secfl.privacy.events import DpEvent
from secfl.privacy.layerwise import (
    CLIP_EPSILON,
    ClippedSum,
    LayerwiseClipping,
    LayerwiseUnsupported,
    RecordLoss,
    layerwise_unsupported_reason,
)
from secfl.privacy.noise import gaussian_noise
from secfl.randomness import RandomStream

_log = logging.getLogger(__name__)


def validate_model(model: nn.Module, *, fix: bool) -> tuple[nn.Module, list[str]]:
    """``(model, notices)``: the model if Opacus accepts it; with ``fix``, Opacus'
    ``ModuleValidator.fix`` applied and one notice per problem it fixed. Without ``fix`` an
    incompatible model raises :class:`PrivacyError` naming the layers."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        return model, []
    described = [str(p) for p in problems]
    if not fix:
        raise PrivacyError(
            "the model has layers DP-SGD cannot use: "
            + "; ".join(described)
            + ". Use GroupNorm instead of BatchNorm, or set "
            "privacy.sample_level.incompatible_layers: fix to apply Opacus' fix"
        )
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise PrivacyError(
            "Opacus' ModuleValidator.fix left incompatible layers: "
            + "; ".join(str(p) for p in remaining)
        )
    return fixed, [f"Opacus ModuleValidator.fix applied: {d}" for d in described]


EngineName = Literal["auto", "layerwise", "torch.func"]
ENGINES: tuple[str, ...] = ("auto", "layerwise", "torch.func")


class PerSampleGradients:
    """The per-sample gradient engine of one model.

    ``engine="auto"`` (the default, used in real runs) picks the layerwise book-keeping
    engine (:mod:`secfl.privacy.layerwise`: per-sample norms and the clipped sum from one
    forward/backward pass) when every trainable layer has a rule, else the torch.func
    reference (``vmap(grad(...))``); the choice and its reason are in :attr:`engine_name`
    and :attr:`fallback_reason` and logged. A layerwise step that meets something it cannot
    account for (a layer run twice, an output changed in place) switches this model to
    torch.func for good, with a logged warning, and recomputes the step.

    Calling the object returns per-sample gradients of the per-record loss by torch.func
    (the reference the tests compare against). The loss is the cross-entropy, or ``loss``
    (a :data:`~secfl.privacy.layerwise.RecordLoss`, such as client distillation, whose
    record i depends only on record i and the teacher's logits for it, which every call
    then passes as ``teacher``). Either engine clips whatever per-record gradient the loss
    has, so the sample-level accounting is the same for any such loss.
    """

    def __init__(
        self, model: nn.Module, *, engine: EngineName = "auto", loss: RecordLoss | None = None
    ) -> None:
        if engine not in ENGINES:
            raise PrivacyError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model = model
        self.loss = loss
        self._loss = nn.CrossEntropyLoss()

        def sample_loss(
            params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor],
            x: torch.Tensor,
            y: torch.Tensor,
        ) -> torch.Tensor:
            logits = functional_call(self.model, (params, buffers), (x.unsqueeze(0),))
            return self._loss(logits, y.unsqueeze(0))

        def sample_record_loss(
            params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor],
            x: torch.Tensor,
            y: torch.Tensor,
            teacher: torch.Tensor,
        ) -> torch.Tensor:
            if loss is None:
                raise PrivacyError("no per-record loss was given")
            logits = functional_call(self.model, (params, buffers), (x.unsqueeze(0),))
            return loss(logits, y.unsqueeze(0), teacher.unsqueeze(0)).sum()

        self._per_sample = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))
        self._per_sample_record = vmap(grad(sample_record_loss), in_dims=(None, None, 0, 0, 0))
        self._layerwise: LayerwiseClipping | None = None
        self.fallback_reason: str | None = None
        if engine == "torch.func":
            self.fallback_reason = "torch.func engine requested"
        else:
            reason = layerwise_unsupported_reason(model)
            if reason is None:
                self._layerwise = LayerwiseClipping(model, loss=loss)
            elif engine == "layerwise":
                raise PrivacyError(f"the layerwise engine cannot handle this model: {reason}")
            else:
                self.fallback_reason = reason
        if self.fallback_reason is not None and engine == "auto":
            _log.info("DP-SGD per-sample engine: torch.func (%s)", self.fallback_reason)
        else:
            _log.debug("DP-SGD per-sample engine: %s", self.engine_name)

    @property
    def engine_name(self) -> str:
        return "layerwise" if self._layerwise is not None else "torch.func"

    def _check_teacher(self, x: torch.Tensor, teacher: torch.Tensor | None) -> None:
        if (self.loss is None) != (teacher is None):
            raise PrivacyError(
                "teacher logits go with a per-record loss and only with one: "
                f"loss {'set' if self.loss is not None else 'not set'}, "
                f"teacher {'given' if teacher is not None else 'not given'}"
            )
        if teacher is not None and teacher.shape[0] != x.shape[0]:
            raise PrivacyError(
                f"teacher logits for {teacher.shape[0]} records, batch of {x.shape[0]}"
            )

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, *, teacher: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        self._check_teacher(x, teacher)
        params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
        buffers = {k: b.detach() for k, b in self.model.named_buffers()}
        result: dict[str, torch.Tensor]
        if teacher is None:
            result = self._per_sample(params, buffers, x, y)
        else:
            result = self._per_sample_record(params, buffers, x, y, teacher)
        return result

    def clipped_sum(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        max_grad_norm: float,
        *,
        teacher: torch.Tensor | None = None,
    ) -> ClippedSum:
        """Sum over the batch of per-sample gradients clipped to ``max_grad_norm``, the
        per-sample norms, and the summed loss, by the chosen engine."""
        self._check_teacher(x, teacher)
        if self._layerwise is not None:
            try:
                return self._layerwise.clipped_sum(x, y, max_grad_norm, teacher=teacher)
            except LayerwiseUnsupported as error:
                self._layerwise = None
                self.fallback_reason = str(error)
                _log.warning("DP-SGD per-sample engine: falling back to torch.func (%s)", error)
        per_sample = self(x, y, teacher=teacher)
        norms = per_sample_norms(per_sample)
        summed = clip_and_sum(per_sample, max_grad_norm)
        with torch.no_grad():
            if self.loss is None:
                loss_sum = float(nn.functional.cross_entropy(self.model(x), y, reduction="sum"))
            else:
                loss_sum = float(self.loss(self.model(x), y, teacher).sum())
        return ClippedSum(grads=summed, norms=norms, loss_sum=loss_sum)


def per_sample_norms(per_sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm over all parameters of each sample's gradient."""
    squared = torch.stack(
        [g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in per_sample.values()]
    ).sum(dim=0)
    return torch.sqrt(squared)


def clip_and_sum(
    per_sample: dict[str, torch.Tensor], max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """Sum over the batch of per-sample gradients clipped to L2 norm ``max_grad_norm``."""
    norms = per_sample_norms(per_sample)
    factor = (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor, g) for k, g in per_sample.items()}


def poisson_batch(stream: RandomStream, n: int, sample_rate: float) -> np.ndarray:
    """Indices of the records in one Poisson-sampled batch (each with prob. ``sample_rate``)."""
    return np.flatnonzero(stream.bernoulli(sample_rate, n))


@dataclass(frozen=True)
class DpSgdSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    epochs: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.epochs < 1:
            raise PrivacyError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def steps_per_round(self) -> int:
        """Opacus' convention: an epoch is 1/q steps (rounded), at least one."""
        return self.epochs * max(1, round(1.0 / self.sample_rate))

    def round_event(self, *, round_index: int, party: str, attempt: int) -> DpEvent:
        """The DP event of one round of local DP-SGD under these settings."""
        return DpEvent(
            mechanism="subsampled_gaussian",
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sample_rate,
            steps=self.steps_per_round,
            sensitivity=self.max_grad_norm,
            level="sample",
            round=round_index,
            party=party,
            attempt=attempt,
        )


@dataclass(frozen=True)
class DpSgdResult:
    mean_loss: float
    steps: int
    event: DpEvent


def _private_gradients(
    engine: PerSampleGradients,
    named: list[tuple[str, nn.Parameter]],
    x: torch.Tensor,
    y: torch.Tensor,
    teacher: torch.Tensor | None,
    settings: DpSgdSettings,
    *,
    sampling_stream: RandomStream,
    noise_stream: RandomStream,
) -> tuple[list[torch.Tensor], float | None]:
    """One DP-SGD gradient (Poisson batch, clipped sum, noise, divided by the expected batch
    size), one tensor per parameter of ``named``, and the batch's mean loss (None if empty)."""
    n = int(x.shape[0])
    total_size = sum(p.numel() for _, p in named)
    expected_batch = settings.sample_rate * n
    noise_std = settings.noise_multiplier * settings.max_grad_norm
    batch = torch.from_numpy(poisson_batch(sampling_stream, n, settings.sample_rate))
    loss: float | None = None
    if batch.numel() > 0:
        result = engine.clipped_sum(
            x[batch],
            y[batch],
            settings.max_grad_norm,
            teacher=None if teacher is None else teacher[batch],
        )
        summed = result.grads
        loss = result.loss_sum / batch.numel()
    else:
        summed = {k: torch.zeros_like(p) for k, p in named}
    # one secfl-gauss/1 draw for every coordinate, scaled in float64 and added in place
    # to the engine's fresh clipped sums, which become the parameters' gradients
    noise = gaussian_noise(noise_stream, total_size).mul_(noise_std / expected_batch)
    offset = 0
    grads: list[torch.Tensor] = []
    for name, p in named:
        grad = summed[name]
        if grad.shape != p.shape or grad.dtype != p.dtype:
            raise PrivacyError(
                f"the per-sample engine returned a {grad.dtype} gradient of shape "
                f"{tuple(grad.shape)} for {name}, a {p.dtype} parameter of shape "
                f"{tuple(p.shape)}"
            )
        size = p.numel()
        grad.div_(expected_batch).add_(noise[offset : offset + size].view_as(grad))
        grads.append(grad)
        offset += size
    return grads, loss


def train_dp_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    settings: DpSgdSettings,
    *,
    sampling_stream: RandomStream,
    noise_stream: RandomStream,
    round_index: int,
    attempt: int,
    party: str,
    engine: PerSampleGradients | None = None,
    on_step: Callable[[int], None] | None = None,
    teacher: torch.Tensor | None = None,
) -> DpSgdResult:
    """``settings.steps_per_round`` DP-SGD steps on ``(x, y)``; returns the DP event.
    ``teacher`` holds the frozen teacher's logits on every record of ``x`` when the
    engine's loss is client distillation."""
    n = int(x.shape[0])
    if n < 1:
        raise PrivacyError(f"{party} has no records to train on")
    engine = engine or PerSampleGradients(model)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    model.train()
    losses: list[float] = []
    for step in range(settings.steps_per_round):
        grads, loss = _private_gradients(
            engine,
            named,
            x,
            y,
            teacher,
            settings,
            sampling_stream=sampling_stream,
            noise_stream=noise_stream,
        )
        if loss is not None:
            losses.append(loss)
        for (_, p), gradient in zip(named, grads, strict=True):
            p.grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
    event = settings.round_event(round_index=round_index, party=party, attempt=attempt)
    mean_loss = float(np.mean(losses)) if losses else math.nan
    return DpSgdResult(mean_loss=mean_loss, steps=settings.steps_per_round, event=event)


def dp_mean_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: DpSgdSettings,
    *,
    sampling_stream: RandomStream,
    noise_stream: RandomStream,
    round_index: int,
    attempt: int,
    party: str,
    engine: PerSampleGradients | None = None,
) -> DpSgdResult:
    """The private gradient at the model's current weights (``client.update_kind:
    gradients`` under DP-SGD), left in the parameters' ``.grad``; no parameter changes.

    It is the mean of ``settings.steps_per_round`` DP-SGD gradients, every one drawn
    exactly as :func:`train_dp_sgd` draws them (Poisson batch, per-sample clipping, noise)
    but all at the same weights: the mechanism is the one the round's DP event describes,
    and the mean is post-processing, so the event and the ledger are unchanged. Each term is
    an unbiased estimate of the mean clipped gradient over the records; ``1/q`` of them per
    epoch cover the records once in expectation."""
    n = int(x.shape[0])
    if n < 1:
        raise PrivacyError(f"{party} has no records to compute a gradient on")
    engine = engine or PerSampleGradients(model)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    model.train()
    total = [torch.zeros_like(p) for _, p in named]
    losses: list[float] = []
    for _ in range(settings.steps_per_round):
        grads, loss = _private_gradients(
            engine,
            named,
            x,
            y,
            None,
            settings,
            sampling_stream=sampling_stream,
            noise_stream=noise_stream,
        )
        if loss is not None:
            losses.append(loss)
        for acc, gradient in zip(total, grads, strict=True):
            acc.add_(gradient)
    for (_, p), acc in zip(named, total, strict=True):
        p.grad = acc.div_(settings.steps_per_round)
    event = settings.round_event(round_index=round_index, party=party, attempt=attempt)
    mean_loss = float(np.mean(losses)) if losses else math.nan
    return DpSgdResult(mean_loss=mean_loss, steps=settings.steps_per_round, event=event)
