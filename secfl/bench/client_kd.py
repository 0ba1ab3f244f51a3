"""``secfl bench client_kd``: teacher and student on the client (US20210182661A1) against
plain local training, on digits under Dirichlet(0.1) label skew.

Each seed runs the same federation twice, seed-matched (``security.randomness: seeded``, so
the split, partition, initial model, client selection and batch order are the same): plain
local SGD, and local SGD distilled from the broadcast global model (``client.distill``). The
figure ``kd_vs_plain_points`` is the mean over seeds of the final test accuracy with
distillation minus without, in points (100 x accuracy). ``measure_client_kd`` is also what
``secfl bench strategies`` calls for the same key.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from secfl.bench.harness import BenchSettings, register_benchmark, run_in_processes

CLIENTS = 10
DIRICHLET_ALPHA = 0.1
#: Seeds of a full run; ``--quick`` runs the first only (same rounds and keys), as every
#: secfl benchmark's quick mode cuts seeds and repeats, never sizes.
SEEDS = (0, 1, 2)
ROUNDS = 30
SMOKE_ROUNDS = 2
#: The distillation block under test (docs/strategies.md explains the choice).
DISTILL = {"temperature": 2.0, "alpha": 0.5}
WORKERS = 2

GOALS = {"kd_vs_plain_points": "reported (issue 9)"}


@dataclass(frozen=True)
class Case:
    seed: int
    distill: bool
    rounds: int
    smoke: bool = False

    @property
    def name(self) -> str:
        return f"digits-{'kd' if self.distill else 'plain'}-r{self.rounds}-s{self.seed}"


def case_config(case: Case) -> Any:
    """The run config of ``case`` (examples/digits.yaml's model and client, Dirichlet 0.1,
    every client every round, mode none)."""
    from secfl.config import config_from_dict

    client: dict[str, Any] = {
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "batch_size": 16,
        "epochs": 1 if case.smoke else 5,
    }
    if case.distill:
        client["distill"] = dict(DISTILL)
    raw: dict[str, Any] = {
        "name": case.name,
        "seed": case.seed,
        "rounds": case.rounds,
        "security": {"randomness": "seeded"},
        "data": {
            "dataset": "digits",
            "num_clients": CLIENTS,
            "partition": {"kind": "dirichlet", "alpha": DIRICHLET_ALPHA},
            "shared": {"per_class": 5},
        },
        "model": {"kind": "mlp", "hidden": [128, 64]},
        "client": client,
        "server": {"optimizer": "fedavg", "sampling": {"kind": "fixed", "clients_per_round": 10}},
        "aggregation": {"protection": "none", "min_cohort": 3},
        "evaluation": {"every": case.rounds, "per_client": False},
    }
    return config_from_dict(raw)


def run_case(case: Case, workdir: str) -> dict[str, Any]:
    """Run ``case`` and return its final accuracy and timings."""
    from secfl.runner import run

    started, cpu_started = time.perf_counter(), time.process_time()
    result = run(case_config(case), Path(workdir) / case.name)
    return {
        "case": asdict(case),
        "accuracy": float(result.history[-1]["accuracy"]),
        "rounds_completed": len(result.history),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def measure_client_kd(quick: bool, smoke: bool) -> dict[str, Any]:
    """``{"kd_vs_plain_points": float, "details": {...}}``: final accuracy with client
    distillation minus without, in points, mean over seeds (per seed in the details)."""
    seeds = SEEDS[:1] if smoke or quick else SEEDS
    rounds = SMOKE_ROUNDS if smoke else ROUNDS
    workers = 1 if smoke else WORKERS
    cases = [Case(s, kd, rounds, smoke) for s in seeds for kd in (False, True)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_in_processes(run_case, cases, Path(tmp), workers)
    by_seed: dict[str, dict[str, float]] = {}
    for s in seeds:
        plain = results[Case(s, False, rounds, smoke)]["accuracy"]
        kd = results[Case(s, True, rounds, smoke)]["accuracy"]
        by_seed[str(s)] = {"plain": plain, "kd": kd, "points": 100.0 * (kd - plain)}
    points = [row["points"] for row in by_seed.values()]
    figure = statistics.fmean(points)
    if not math.isfinite(figure):
        raise ValueError(f"kd_vs_plain_points is not finite: {points}")
    return {
        "kd_vs_plain_points": figure,
        "details": {
            "by_seed": by_seed,
            "kd_vs_plain_points_min": min(points),
            "kd_vs_plain_points_max": max(points),
            "plan": {
                "dataset": "digits",
                "clients": CLIENTS,
                "partition": {"kind": "dirichlet", "alpha": DIRICHLET_ALPHA},
                "seeds": list(seeds),
                "rounds": rounds,
                "distill": dict(DISTILL),
                "protection": "none",
                "workers": workers,
                "runs_wall_s": time.perf_counter() - started,
            },
            "runs": {c.name: r for c, r in results.items()},
        },
    }


@register_benchmark(
    "client_kd",
    "client-side distillation from the global model (US20210182661A1) versus plain local "
    "training: digits, 10 clients, Dirichlet 0.1, 3 seeds",
)
def bench_client_kd(settings: BenchSettings) -> dict[str, Any]:
    measured = measure_client_kd(settings.quick, settings.smoke)
    return {**measured, "goals": dict(GOALS)}
