"""Hardware tiers (issue 9; Alipay's 2020 alliance-learning patent): profiles, tiering,
merging, width variants and cross-tier transfer.

The patent's second member device (the server) groups the first member devices (clients)
by their hardware performance parameters and gives each group an initial global model
adapted to that hardware; each group then runs federated learning on its own. Here:

* every client declares a profile (memory, compute speed, upload bandwidth), simulated from
  the seed (:func:`draw_profiles`: the device population of
  :mod:`secfl.strategies.devices` plus a log-normal memory);
* a capacity score (the mean of the three log ratios to their configured medians) is cut
  into tiers by quantiles (equal counts by default) or absolute thresholds
  (:func:`assign_tiers`);
* a tier smaller than ``aggregation.min_cohort`` is merged into a neighbour and the merged
  tier trains the smaller of the two models, which every member can train
  (:func:`merge_tiers`): no secure cohort is ever below the minimum anonymity set;
* tier k trains the run's ``model`` at width multiplier ``tiers[k].width``
  (:func:`scaled_model_config`);
* after each round every tier's model is distilled from the ensemble of the other tiers'
  models on public inputs (:func:`transfer_between_tiers`): the data shared set and/or
  samples inverted from the tiers' models. Only revealed aggregates are used, so this is
  post-processing in every protection mode.

The run loop is :mod:`secfl.strategies.tiers_run`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from secfl.config import ModelConfig, TiersStrategy, TierTransferConfig
from secfl.errors import ConfigError
from secfl.randomness import Randomness, RandomStream
from secfl.refine.tune import distill
from secfl.strategies.devices import DevicePopulation


@dataclass(frozen=True, eq=False)
class HardwareProfiles:
    """Each client's declared hardware: ``memory_mib``, and the population's compute speed
    (FLOP/s) and upload bandwidth (bytes/s)."""

    memory_mib: np.ndarray
    population: DevicePopulation

    def __post_init__(self) -> None:
        if self.memory_mib.shape != self.population.speed.shape:
            raise ConfigError(
                f"memory {self.memory_mib.shape} and speed {self.population.speed.shape} must "
                "describe the same clients"
            )
        if not np.all(self.memory_mib > 0):
            raise ConfigError("device memory must be > 0")

    @property
    def count(self) -> int:
        return self.population.count


def draw_profiles(spec: TiersStrategy, randomness: Randomness) -> HardwareProfiles:
    """Speeds and bandwidths as the scheduler draws them; memory log-normal from its own
    stream of the design purpose ``strategy.devices`` (seeded in every mode)."""
    population = DevicePopulation.draw(spec.devices, randomness)
    z = randomness.stream("strategy.devices", party="memory").normal(spec.devices.count)
    return HardwareProfiles(spec.memory_median * np.exp(spec.memory_sigma * z), population)


def capacity_score(profiles: HardwareProfiles, spec: TiersStrategy) -> np.ndarray:
    """Mean of log(memory / memory_median), log(speed / speed_median) and
    log(bandwidth / bandwidth_median): 0 is the configured median device, +1 a device e
    times better on every resource."""
    return (
        np.log(profiles.memory_mib / spec.memory_median)
        + np.log(profiles.population.speed / spec.devices.speed_median)
        + np.log(profiles.population.bandwidth / spec.devices.bandwidth_median)
    ) / 3.0


def assign_tiers(
    score: np.ndarray, *, rule: str, cuts: Sequence[float] | None, tiers: int
) -> np.ndarray:
    """The tier index (0 = smallest model) of every client: ``quantiles`` cuts the score at
    its ``cuts`` quantiles (None: ``k / tiers``, equal counts); ``thresholds`` at the
    ``cuts`` score values. A score equal to a cut goes to the higher tier."""
    if tiers < 1:
        raise ConfigError(f"tiers must be >= 1, got {tiers}")
    if tiers == 1:
        return np.zeros(score.size, dtype=np.int64)
    if rule == "quantiles":
        levels = [k / tiers for k in range(1, tiers)] if cuts is None else list(cuts)
        edges = np.quantile(score, levels)
    elif rule == "thresholds":
        if cuts is None:
            raise ConfigError("the thresholds rule needs cut points (server.strategy.cuts)")
        edges = np.asarray(cuts, dtype=np.float64)
    else:
        raise ConfigError(f"unknown tiering rule {rule!r}; allowed: quantiles, thresholds")
    if edges.size != tiers - 1:
        raise ConfigError(f"{edges.size} cut points for {tiers} tiers; allowed {tiers - 1}")
    return np.searchsorted(edges, score, side="right").astype(np.int64)


@dataclass(frozen=True)
class Tier:
    """A tier that runs: the model variant it trains (``variant``: index into the
    configured tiers), its members (client ids, sorted) and the configured tiers merged
    into it (``merged``, its own variant included)."""

    variant: int
    members: tuple[int, ...]
    merged: tuple[int, ...]


def merge_tiers(tier_of: np.ndarray, *, tiers: int, min_cohort: int) -> list[Tier]:
    """Group clients by tier; drop empty tiers; while a tier has fewer than ``min_cohort``
    members, merge the smallest such tier into its lower neighbour (its upper one for the
    lowest tier). The merged tier trains the lower variant, which every member can train.

    Raises :class:`ConfigError` when all clients together are fewer than ``min_cohort``:
    no tier may run with a smaller anonymity set."""
    if tier_of.size < min_cohort:
        raise ConfigError(
            f"{tier_of.size} clients are fewer than aggregation.min_cohort={min_cohort}: "
            "no tier can run; allowed >= min_cohort clients"
        )
    groups = [
        Tier(k, tuple(int(i) for i in np.flatnonzero(tier_of == k)), (k,))
        for k in range(tiers)
        if np.any(tier_of == k)
    ]
    while True:
        small = [i for i, g in enumerate(groups) if len(g.members) < min_cohort]
        if not small:
            return groups
        at = min(small, key=lambda i: (len(groups[i].members), i))
        into = at - 1 if at > 0 else at + 1
        low, high = sorted((at, into))
        a, b = groups[low], groups[high]
        merged = Tier(a.variant, tuple(sorted(a.members + b.members)), a.merged + b.merged)
        groups[low : high + 1] = [merged]


def scaled_model_config(model: ModelConfig, width: float) -> ModelConfig:
    """``model`` with every hidden layer and convolution channel count multiplied by
    ``width`` (rounded, at least 1): the width variants of one architecture."""
    if not 0 < width <= 4:
        raise ConfigError(f"width multiplier must be in (0, 4], got {width}")

    def scale(sizes: list[int]) -> list[int]:
        return [max(1, round(s * width)) for s in sizes]

    return model.model_copy(
        update={"hidden": scale(list(model.hidden)), "channels": scale(list(model.channels))}
    )


def parameter_count(model: nn.Module) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def ensemble_disagreement(
    student: nn.Module, teachers: Sequence[nn.Module], x: np.ndarray, *, temperature: float
) -> float:
    """KL(softmax(mean teacher logits / T) || softmax(student logits / T)) on ``x``,
    averaged over records: how far the student's predictions are from the ensemble's."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        for m in (student, *teachers):
            m.eval()
        target = F.softmax(torch.stack([t(xt) for t in teachers]).mean(0) / temperature, dim=1)
        log_p = F.log_softmax(student(xt) / temperature, dim=1)
        return float(F.kl_div(log_p, target, reduction="batchmean"))


def transfer_between_tiers(
    students: Sequence[nn.Module],
    teachers: Sequence[nn.Module],
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    *,
    settings: TierTransferConfig,
    streams: Sequence[RandomStream],
    learners: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Every tier ``i`` in ``learners`` (default: all) distils the ensemble of the other
    tiers' models into its own from ``weights[i]`` on inputs ``x`` (KL at the temperature
    plus the proximal term towards ``weights[i]``). ``teachers[j]`` must already hold
    ``weights[j]`` (the revealed aggregates of this round; a tier learns from the others'
    models before any of them changed). Returns the new weights (unchanged for
    non-learners)."""
    n = len(weights)
    if not (len(students) == len(teachers) == len(streams) == n):
        raise ConfigError("transfer needs one student, teacher and stream per tier")
    chosen = range(n) if learners is None else learners
    out = [w.copy() for w in weights]
    if n < 2:
        return out
    xs = np.ascontiguousarray(x, dtype=np.float32)
    for i in chosen:
        others = [teachers[j] for j in range(n) if j != i]
        out[i] = distill(
            students[i],
            weights[i],
            others,
            xs,
            steps=settings.steps,
            lr=settings.lr,
            batch_size=min(settings.batch_size, len(xs)),
            temperature=settings.temperature,
            prox=settings.prox,
            stream=streams[i],
            optimizer=settings.optimizer,
        )
    return out


def cohort_size(available: int, *, fraction: float, min_cohort: int) -> int:
    """How many of a tier's ``available`` members train: ``ceil(fraction * available)``,
    at least ``min_cohort``, at most ``available`` (0 when fewer than ``min_cohort`` are
    available: the tier skips the round)."""
    if available < min_cohort:
        return 0
    return min(available, max(min_cohort, math.ceil(fraction * available)))
