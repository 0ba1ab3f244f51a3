"""The random model sharing pool's figures for ``secfl bench strategies`` (issue 9).

The pool of ``examples/digits_pool.yaml`` (four base models on digits: two MLPs [64] that
differ only in initialisation, an MLP [32] and an MLP [128, 64]; two drawn a round; 30
clients, every one each round; ``min_cohort`` 5), mode ``none`` (the strategy only chooses
cohorts; the protection modes change no model), seeded randomness, at most 40 rounds,
stopping once every model has converged (test error <= 0.05, or moving < 0.01 over 3
evaluations). Keys (worst seed at top level, per seed under ``details.pool``):

* ``pool_models_converged``: how many of the four base models passed the convergence test;
* ``pool_acceptable_set_size``: how many models' Clopper-Pearson interval (95%) overlaps the
  best model's (before the duplicate rule; the shared models after it are in details).

``quick``: seed 0 only; ``smoke``: 12 clients, ``min_cohort`` 3, 3 rounds.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from secfl.config import RunConfig, config_from_dict

MODELS: list[dict[str, Any]] = [
    {"name": "mlp64-a", "model": {"kind": "mlp", "hidden": [64]}, "init_seed": 0},
    {"name": "mlp64-b", "model": {"kind": "mlp", "hidden": [64]}, "init_seed": 1},
    {"name": "mlp32", "model": {"kind": "mlp", "hidden": [32]}},
    {"name": "mlp128x64", "model": {"kind": "mlp", "hidden": [128, 64]}},
]


def pool_config(seed: int, *, smoke: bool) -> RunConfig:
    clients, rounds, min_cohort = (12, 3, 3) if smoke else (30, 40, 5)
    raw = {
        "name": "bench-pool",
        "seed": seed,
        "rounds": rounds,
        "security": {"randomness": "seeded"},
        "data": {"dataset": "digits", "num_clients": clients, "partition": {"kind": "iid"}},
        "client": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 2, "batch_size": 8},
        "server": {
            "optimizer": "fedavg",
            "strategy": {
                "kind": "pool",
                "models": MODELS,
                "models_per_round": 2,
                "convergence": {"error_bound": 0.05, "tolerance": 0.01, "window": 3},
                "stop_when_converged": True,
                "confidence": 0.95,
                "duplicate_cosine": 0.99,
            },
        },
        "aggregation": {"protection": "none", "min_cohort": min_cohort},
        "evaluation": {"every": 1, "per_client": False},
    }
    return config_from_dict(raw)


def measure_pool(quick: bool, smoke: bool) -> dict[str, Any]:
    """Run the pool for each seed; the two keys and their details."""
    from secfl.runner import run

    seeds = (0,) if quick or smoke else (0, 1, 2)
    per_seed: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            out = Path(tmp) / f"pool-s{seed}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # mode none's plaintext warning
                result = run(pool_config(seed, smoke=smoke), out)
            selection = json.loads((out / "pool.json").read_text())
            per_seed[str(seed)] = {
                "rounds_run": len(result.history),
                "stopped": result.stopped,
                "converged": selection["converged"],
                "acceptable": selection["acceptable"],
                "shared": selection["shared"],
                "eliminated": selection["eliminated"],
                "accuracy": {n: m["accuracy"] for n, m in selection["models"].items()},
                "clopper_pearson": {
                    n: m["clopper_pearson"] for n, m in selection["models"].items()
                },
                "rounds_trained": {n: m["rounds_trained"] for n, m in selection["models"].items()},
            }
    return {
        "pool_models_converged": min(len(s["converged"]) for s in per_seed.values()),
        "pool_acceptable_set_size": min(len(s["acceptable"]) for s in per_seed.values()),
        "details": {
            "seeds": list(seeds),
            "models": [m["name"] for m in MODELS],
            "per_seed": per_seed,
            "wall_s": time.perf_counter() - started,
        },
    }
