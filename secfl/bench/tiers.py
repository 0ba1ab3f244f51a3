"""Hardware tiers' figures for ``secfl bench strategies`` (issue 9; docs/strategies.md).

MNIST-1D, 60 clients (IID), three equal-count tiers by capacity score training width
multipliers 0.25, 0.5 and 1.0 of one 1-D CNN (channels [32, 32], hidden [64]), every
member of a tier in every round, mode ``none``, seeded. Per seed three runs, nothing else
changed:

* ``transfer``: the tiers with cross-tier transfer (distillation on ``data.shared``);
* ``no_transfer``: the same tiers, ``transfer: null``;
* ``single_small``: one tier of all 60 clients training the 0.25 model (what a federation
  must use when every client has to train one model in time).

Keys: ``tier_transfer_gain_points``, 100 x (smallest tier's accuracy with transfer minus
without), and ``tiers_large_gain_points``, 100 x (largest tier's accuracy with transfer
minus the single small model's), both means over seeds of the mean of the last three
evaluations (one evaluation of these federations moves by a point or two between rounds);
the last-round figures and every run's accuracies are under ``details``.
``quick``: seed 0 only, same sizes; ``smoke``: 12 clients, 2 rounds, 400 samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secfl.bench.harness import run_in_processes, timed_run
from secfl.config import RunConfig, config_from_dict

VARIANTS = ("transfer", "no_transfer", "single_small")
WIDTHS = (("small", 0.25), ("medium", 0.5), ("large", 1.0))

GOALS = {
    "tier_transfer_gain_points": ">= 1 (smallest tier, transfer on minus off, mean of 3 seeds)",
    "tiers_large_gain_points": "> 0 (largest tier over the single small model, mean of seeds)",
}


@dataclass(frozen=True)
class TierSizes:
    clients: int
    rounds: int
    samples: int
    every: int


TIERS_FULL = TierSizes(clients=60, rounds=40, samples=4000, every=4)
TIERS_SMOKE = TierSizes(clients=12, rounds=2, samples=400, every=1)


@dataclass(frozen=True)
class TierCase:
    variant: str
    seed: int
    smoke: bool

    @property
    def name(self) -> str:
        return f"tiers-{self.variant}-s{self.seed}{'-smoke' if self.smoke else ''}"


def tiers_config(
    variant: str, seed: int, sizes: TierSizes = TIERS_FULL, *, protection: str = "none"
) -> RunConfig:
    """The benchmark's run for ``variant`` (``examples/mnist1d_tiers.yaml`` at these sizes,
    every tier member in every round)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiers variant {variant!r}; allowed {VARIANTS}")
    tiers = [{"name": n, "width": w} for n, w in WIDTHS]
    if variant == "single_small":
        tiers = tiers[:1]
    transfer = (
        None
        if variant != "transfer"
        else {
            "source": "shared",
            "steps": 5,
            "lr": 0.02,
            "temperature": 1.0,
            "prox": 0.01,
            "start_round": 1 if sizes is TIERS_SMOKE else 5,
        }
    )
    raw: dict[str, Any] = {
        "name": f"tiers-{variant}",
        "seed": seed,
        "rounds": sizes.rounds,
        "security": {"randomness": "seeded"},
        "data": {
            "dataset": "mnist1d",
            "num_samples": sizes.samples,
            "num_clients": sizes.clients,
            "partition": {"kind": "iid"},
            "shared": {"per_class": 20 if sizes is TIERS_FULL else 2},
        },
        "model": {"kind": "cnn", "channels": [32, 32], "hidden": [64], "groups": 4},
        "client": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 2, "batch_size": 16},
        "server": {
            "optimizer": "fedavg",
            "strategy": {
                "kind": "tiers",
                "devices": {"count": sizes.clients, "availability": 1.0},
                "tiers": tiers,
                "fraction": 1.0,
                "transfer": transfer,
            },
        },
        "aggregation": {"protection": protection, "min_cohort": 3},
        "evaluation": {"every": sizes.every, "per_client": False},
    }
    return config_from_dict(raw)


def run_tier_case(case: TierCase, workdir: str) -> dict[str, Any]:
    """One run: per tier final and tail accuracy (``multitask.summary``), wall time."""
    from secfl.strategies.multitask import summary

    config = tiers_config(case.variant, case.seed, TIERS_SMOKE if case.smoke else TIERS_FULL)
    timed = timed_run(config, Path(workdir) / case.name, quiet=True)
    return {
        **summary(timed.result.history),
        "seconds": timed.seconds,
        "cpu_seconds": timed.cpu_seconds,
    }


def aggregate_tiers(results: dict[TierCase, dict[str, Any]], seeds: tuple[int, ...]) -> dict:
    smoke = next(iter(results)).smoke

    def acc(variant: str, tier: str, key: str) -> list[float]:
        return [float(results[TierCase(variant, s, smoke)]["tasks"][tier][key]) for s in seeds]

    small, large = WIDTHS[0][0], WIDTHS[-1][0]
    tail = "final_accuracy_tail_mean"
    gain = 100.0 * (
        np.mean(acc("transfer", small, tail)) - np.mean(acc("no_transfer", small, tail))
    )
    large_gain = 100.0 * (
        np.mean(acc("transfer", large, tail)) - np.mean(acc("single_small", small, tail))
    )
    last = "final_accuracy"
    return {
        "tier_transfer_gain_points": float(gain),
        "tiers_large_gain_points": float(large_gain),
        "details": {
            "seeds": list(seeds),
            "accuracy_tail_mean": {
                v: {t: acc(v, t, tail) for t in results[TierCase(v, seeds[0], smoke)]["tasks"]}
                for v in VARIANTS
            },
            "accuracy_last_round": {
                v: {t: acc(v, t, last) for t in results[TierCase(v, seeds[0], smoke)]["tasks"]}
                for v in VARIANTS
            },
            "tier_transfer_gain_points_last_round": 100.0
            * float(
                np.mean(acc("transfer", small, last)) - np.mean(acc("no_transfer", small, last))
            ),
            "tiers_large_gain_points_last_round": 100.0
            * float(
                np.mean(acc("transfer", large, last)) - np.mean(acc("single_small", small, last))
            ),
            "run_seconds": {c.name: r["seconds"] for c, r in results.items()},
            "cpu_seconds": sum(r["cpu_seconds"] for r in results.values()),
        },
    }


def measure_tiers(quick: bool, smoke: bool, workers: int) -> dict[str, Any]:
    """The two tier keys and their details (see the module docstring)."""
    import tempfile

    seeds = (0,) if quick or smoke else (0, 1, 2)
    sizes = TIERS_SMOKE if smoke else TIERS_FULL
    cases = [TierCase(v, s, smoke) for s in seeds for v in VARIANTS]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_in_processes(run_tier_case, cases, Path(tmp), 1 if smoke else workers)
    figures = aggregate_tiers(results, seeds)
    figures["details"].update(
        {
            "clients": sizes.clients,
            "rounds": sizes.rounds,
            "mnist1d_samples": sizes.samples,
            "widths": dict(WIDTHS),
            "runs_wall_s": time.perf_counter() - started,
        }
    )
    return figures
