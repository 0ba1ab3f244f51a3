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

    Calling the object returns per-sample gradients of the per-record cross-entropy by
    torch.func (the reference the tests compare against).
    """

    def __init__(self, model: nn.Module, *, engine: EngineName = "auto") -> None:
        if engine not in ENGINES:
            raise PrivacyError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model = model
        self._loss = nn.CrossEntropyLoss()

        def sample_loss(
            params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor],
            x: torch.Tensor,
            y: torch.Tensor,
        ) -> torch.Tensor:
            logits = functional_call(self.model, (params, buffers), (x.unsqueeze(0),))
            return self._loss(logits, y.unsqueeze(0))

        self._per_sample = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))
        self._layerwise: LayerwiseClipping | None = None
        self.fallback_reason: str | None = None
        if engine == "torch.func":
            self.fallback_reason = "torch.func engine requested"
        else:
            reason = layerwise_unsupported_reason(model)
            if reason is None:
                self._layerwise = LayerwiseClipping(model)
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

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
        buffers = {k: b.detach() for k, b in self.model.named_buffers()}
        result: dict[str, torch.Tensor] = self._per_sample(params, buffers, x, y)
        return result

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float) -> ClippedSum:
        """Sum over the batch of per-sample gradients clipped to ``max_grad_norm``, the
        per-sample norms, and the summed loss, by the chosen engine."""
        if self._layerwise is not None:
            try:
                return self._layerwise.clipped_sum(x, y, max_grad_norm)
            except LayerwiseUnsupported as error:
                self._layerwise = None
                self.fallback_reason = str(error)
                _log.warning("DP-SGD per-sample engine: falling back to torch.func (%s)", error)
        per_sample = self(x, y)
        norms = per_sample_norms(per_sample)
        summed = clip_and_sum(per_sample, max_grad_norm)
        with torch.no_grad():
            loss_sum = float(nn.functional.cross_entropy(self.model(x), y, reduction="sum"))
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
) -> DpSgdResult:
    """``settings.steps_per_round`` DP-SGD steps on ``(x, y)``; returns the DP event."""
    n = int(x.shape[0])
    if n < 1:
        raise PrivacyError(f"{party} has no records to train on")
    engine = engine or PerSampleGradients(model)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    total_size = sum(p.numel() for _, p in named)
    expected_batch = settings.sample_rate * n
    noise_std = settings.noise_multiplier * settings.max_grad_norm
    model.train()
    losses: list[float] = []
    for step in range(settings.steps_per_round):
        batch = torch.from_numpy(poisson_batch(sampling_stream, n, settings.sample_rate))
        if batch.numel() > 0:
            result = engine.clipped_sum(x[batch], y[batch], settings.max_grad_norm)
            summed = result.grads
            losses.append(result.loss_sum / batch.numel())
        else:
            summed = {k: torch.zeros_like(p) for k, p in named}
        # one secfl-gauss/1 draw for every coordinate, scaled in float64 and added in place
        # to the engine's fresh clipped sums, which become the parameters' gradients
        noise = gaussian_noise(noise_stream, total_size).mul_(noise_std / expected_batch)
        offset = 0
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
            p.grad = grad
            offset += size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
    event = settings.round_event(round_index=round_index, party=party, attempt=attempt)
    mean_loss = float(np.mean(losses)) if losses else math.nan
    return DpSgdResult(mean_loss=mean_loss, steps=settings.steps_per_round, event=event)
