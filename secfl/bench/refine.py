"""Benchmark ``refine``: what inversion-based refinement adds over FedAvg (issue 7).

Digits and MNIST-1D, 10 clients, Dirichlet(0.1) and IID partitions, the same rounds for every
variant, 3 seeds (``--quick``: 1 seed, same sizes and keys). Variants, all through
:func:`secfl.runner.run` with configs built here (seeded randomness, evaluation at the last
round only):

* ``fedavg``: no refine block (mode ``none``);
* ``shared``: ``refine.shared`` (fine-tuning on the public shared set) alone;
* ``inversion``: server inversion (distillation on synthetic data, teachers = the client
  models) plus client-side inversion; no shared data used by refinement;
* ``both``: shared-set tuning and both inversions;
* ``inversion_masking``: mode ``masking`` with sub-cohorts (``trust.defense: vote``, all 10
  clients per round, ``min_cohort`` 3: three sub-cohorts), teachers = the sub-cohort models;
  its baseline ``fedavg_masking`` is the same masking + trust config without refine;
* ``inversion_ckks``: mode ``ckks``, aggregate-only inversion (``teacher: aggregate``); its
  baseline ``fedavg_ckks`` is the same ckks config without refine.

A *gain* is 100 x (variant accuracy - baseline accuracy) at the final round, same dataset,
partition and seed, averaged over seeds. A run's *fidelity* is the accuracy, on the last
round's synthetic set (``refine.synthetic.x`` / ``.y`` of the final checkpoint) against its
target labels, of a scikit-learn logistic regression the benchmark trains on the run's real
training records (the clients' data). ``synthetic_fidelity`` is, per inversion variant, the
mean over datasets, partitions and seeds, worst variant at top level;
``synthetic_fidelity_<dataset>`` is the worst variant and partition of one dataset, beside
``classifier_real_accuracy_<dataset>``, the same judge's accuracy on that dataset's real test
records (its ceiling: a linear model reads MNIST-1D's shifted signals at about 0.33).
``memorisation_ratio`` is the smallest ``refine.memorisation.ratio`` of any refined round of
any run. ``refine_seconds_per_round``
is the mean of ``row["refine"]["seconds"]`` over every refined round of every run.

Each top-level key holds the gated figure (the worst case where the issue says so); the
details nest under ``by_dataset``, ``by_mode``, ``by_variant`` and ``runs``. Runs go to a pool
of worker processes (one torch thread each, ``WORKERS``), so the wall time depends on the
machine's load (``machine``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secfl.bench.harness import (
    BenchSettings,
    bench_workdir,
    register_benchmark,
    run_in_processes,
    timed_run,
)

DATASETS = ("digits", "mnist1d")
PARTITIONS: dict[str, dict[str, Any]] = {
    "dirichlet0.1": {"kind": "dirichlet", "alpha": 0.1},
    "iid": {"kind": "iid"},
}
NONIID = "dirichlet0.1"
IID = "iid"

#: Variant -> (protection mode, refine block or None).
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "fedavg": ("none", None),
    "shared": ("none", {"shared": {}}),
    "inversion": ("none", {"server_inversion": {}, "client_inversion": {}}),
    "both": ("none", {"shared": {}, "server_inversion": {}, "client_inversion": {}}),
    "fedavg_masking": ("masking", None),
    "inversion_masking": (
        "masking",
        {"server_inversion": {"teacher": "cohorts"}, "client_inversion": {}},
    ),
    "fedavg_ckks": ("ckks", None),
    "inversion_ckks": (
        "ckks",
        {"server_inversion": {"teacher": "aggregate"}, "client_inversion": {}},
    ),
}
#: Refined variant -> the variant its gain is measured against (same mode, no refine).
BASELINE = {
    "shared": "fedavg",
    "inversion": "fedavg",
    "both": "fedavg",
    "inversion_masking": "fedavg_masking",
    "inversion_ckks": "fedavg_ckks",
}
#: Inversion variant per protection mode (``by_mode``).
INVERSION_BY_MODE = {"none": "inversion", "masking": "inversion_masking", "ckks": "inversion_ckks"}

ROUNDS = 10
CLIENTS = 10
CLIENTS_PER_ROUND = 5
#: Masking with sub-cohorts: every client each round, sub-cohorts of at least 3 (g = 3).
MASKING_CLIENTS_PER_ROUND = 10
MASKING_MIN_COHORT = 3
MNIST1D_SAMPLES = 5000
#: Worker processes for the runs (each trains with one torch thread).
WORKERS = max(1, min(2, os.cpu_count() or 1))

GOALS = {
    "gain_noniid_points_shared": "reported",
    "gain_noniid_points_inversion": ">= 2",
    "gain_noniid_points_both": ">= gain_noniid_points_shared",
    "gain_iid_points": ">= -0.5",
    "synthetic_fidelity": ">= 0.5 (mean over datasets; per dataset reported beside)",
    "memorisation_ratio": ">= 1",
    "refine_seconds_per_round": "reported",
}


@dataclass(frozen=True)
class Case:
    dataset: str
    variant: str
    partition: str
    seed: int
    rounds: int
    smoke: bool = False

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.variant}-{self.partition}-r{self.rounds}-s{self.seed}"

    @property
    def mode(self) -> str:
        return VARIANTS[self.variant][0]


def _dataset_block(dataset: str, smoke: bool) -> dict[str, Any]:
    """``data`` / ``model`` / ``client`` settings of a dataset (examples/digits.yaml and
    examples/mnist1d.yaml's CNN, 10 clients)."""
    if dataset == "digits":
        return {
            "data": {"dataset": "digits"},
            "model": {"kind": "mlp", "hidden": [128, 64]},
            "client": {"epochs": 1 if smoke else 5},
        }
    if dataset == "mnist1d":
        return {
            "data": {"dataset": "mnist1d", "num_samples": 1000 if smoke else MNIST1D_SAMPLES},
            "model": {"kind": "cnn", "channels": [32, 32], "hidden": [64], "groups": 4},
            "client": {"epochs": 1 if smoke else 3},
        }
    raise ValueError(f"unknown dataset {dataset!r}; allowed: {DATASETS}")


def _smoke_refine(refine: dict[str, Any]) -> dict[str, Any]:
    """The refine block at tiny sizes: the same code paths in a fraction of a second."""
    small = {"per_class": 2, "steps": 5}
    out: dict[str, Any] = {}
    for key, block in refine.items():
        if key == "shared":
            out[key] = {**block, "steps": 3}
        elif key == "server_inversion":
            out[key] = {**block, **small, "distill_steps": 3, "moments": {"every": 1}}
        else:
            out[key] = {**block, **small}
    return out


def case_config(case: Case) -> Any:
    """The run config of ``case`` (a :class:`secfl.config.RunConfig`)."""
    from secfl.config import config_from_dict

    mode, refine = VARIANTS[case.variant]
    block = _dataset_block(case.dataset, case.smoke)
    per_round = MASKING_CLIENTS_PER_ROUND if mode == "masking" else CLIENTS_PER_ROUND
    raw: dict[str, Any] = {
        "name": case.name,
        "seed": case.seed,
        "rounds": case.rounds,
        "security": {"randomness": "seeded"},
        "data": {
            **block["data"],
            "num_clients": CLIENTS,
            "partition": PARTITIONS[case.partition],
            "shared": {"per_class": 5},
        },
        "model": block["model"],
        "client": {
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "batch_size": 16,
            **block["client"],
        },
        "server": {
            "optimizer": "fedavg",
            "sampling": {"kind": "fixed", "clients_per_round": per_round},
        },
        "aggregation": {
            "protection": mode,
            "min_cohort": MASKING_MIN_COHORT if mode == "masking" else 3,
        },
        # evaluate once, at the last round (the runner always evaluates the last round)
        "evaluation": {"every": case.rounds, "per_client": False},
    }
    if mode == "masking":
        raw["trust"] = {"defense": "vote"}
    if refine is not None:
        raw["refine"] = _smoke_refine(refine) if case.smoke else refine
    return config_from_dict(raw)


# ---------------------------------------------------------------------------- one run


def real_data_classifier(train_x: np.ndarray, train_y: np.ndarray, *, seed: int) -> Any:
    """A logistic regression (another model family than the federation's networks) fitted
    on the real records ``(train_x, train_y)``.

    On the raw inputs, without standardisation: pixels and signal samples share one scale,
    and dividing by the tiny spread of near-constant border pixels would let the noise an
    inversion leaves there decide the class."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    classifier.fit(train_x.reshape(len(train_x), -1), train_y)
    return classifier


def classifier_accuracy(classifier: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(classifier.predict(x.reshape(len(x), -1)) == y))


def synthetic_fidelity(
    synthetic_x: np.ndarray,
    synthetic_y: np.ndarray,
    train_x: np.ndarray,
    train_y: np.ndarray,
    *,
    seed: int,
) -> float:
    """Accuracy on ``(synthetic_x, synthetic_y)`` of :func:`real_data_classifier` trained on
    ``(train_x, train_y)``: whether the synthetic samples carry their classes' real
    features rather than patterns only the inverted network reads. It is bounded in
    practice by the classifier's accuracy on real test records (reported beside it)."""
    classifier = real_data_classifier(train_x, train_y, seed=seed)
    return classifier_accuracy(classifier, synthetic_x, synthetic_y)


def run_case(case: Case, workdir: str) -> dict[str, Any]:
    """Run ``case``: final accuracy, refine seconds and memorisation ratios of every refined
    round, and the fidelity of the last synthetic set (inversion variants)."""
    from secfl.data.federated import build_federated_data
    from secfl.randomness import Randomness
    from secfl.record.checkpoint import read_checkpoint

    config = case_config(case)
    folder = Path(workdir) / case.name
    timed = timed_run(config, folder)
    result, seconds, cpu_seconds = timed.result, timed.seconds, timed.cpu_seconds
    refined = [row["refine"] for row in result.history if "refine" in row]
    ratios = [float(r["memorisation"]["ratio"]) for r in refined if "memorisation" in r]
    out: dict[str, Any] = {
        "case": asdict(case),
        "accuracy": float(result.history[-1]["accuracy"]),
        "rounds_completed": len(result.history),
        "rounds_refined": len(refined),
        "refine_seconds": [float(r["seconds"]) for r in refined],
        "memorisation_ratios": ratios,
        "fidelity": None,
        "classifier_test_accuracy": None,
        "synthetic": 0,
        "seconds": seconds,
        # one torch thread per run: CPU time is about the wall time on an idle core
        "cpu_seconds": cpu_seconds,
    }
    arrays = read_checkpoint(folder).arrays
    if "refine.synthetic.x" in arrays:
        data = build_federated_data(
            config.data, Randomness(config.security.randomness, config.seed)
        )
        train_x = np.concatenate([c.x for c in data.clients])
        train_y = np.concatenate([c.y for c in data.clients])
        sx = np.asarray(arrays["refine.synthetic.x"])
        sy = np.asarray(arrays["refine.synthetic.y"])
        classifier = real_data_classifier(train_x, train_y, seed=case.seed)
        out["fidelity"] = classifier_accuracy(classifier, sx, sy)
        # the same classifier on real held-out records: the ceiling the fidelity is read against
        out["classifier_test_accuracy"] = classifier_accuracy(classifier, data.test.x, data.test.y)
        out["synthetic"] = len(sy)
    return out


def run_cases(cases: Sequence[Case], workdir: Path, workers: int) -> dict[Case, dict[str, Any]]:
    """Every case once, in ``workers`` processes (1: in this one). Each run has its own
    folder; nothing is shared between runs beyond the dataset files on disk."""
    return run_in_processes(run_case, cases, workdir, workers)


# ---------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    rounds: int
    datasets: tuple[str, ...] = DATASETS
    smoke: bool = False

    def cases(self) -> list[Case]:
        # slow modes first, so the pool's two workers finish together
        order = sorted(VARIANTS, key=lambda v: {"ckks": 0, "masking": 1, "none": 2}[VARIANTS[v][0]])
        return [
            Case(dataset, variant, partition, seed, self.rounds, self.smoke)
            for dataset in self.datasets
            for variant in order
            for partition in PARTITIONS
            for seed in self.seeds
        ]


def plan_for(settings: BenchSettings) -> Plan:
    if settings.smoke:  # every key and code path in seconds; MNIST-1D only in full runs
        return Plan(seeds=(0,), rounds=2, datasets=("digits",), smoke=True)
    return Plan(seeds=(0,) if settings.quick else (0, 1, 2), rounds=ROUNDS)


def _mean(values: Iterable[float]) -> float:
    return float(statistics.fmean(values))


def _gain_entry(
    results: Mapping[Case, Mapping[str, Any]], plan: Plan, dataset: str, variant: str, part: str
) -> dict[str, Any]:
    per_seed = []
    for seed in plan.seeds:
        case = Case(dataset, variant, part, seed, plan.rounds, plan.smoke)
        base = Case(dataset, BASELINE[variant], part, seed, plan.rounds, plan.smoke)
        per_seed.append(100.0 * (results[case]["accuracy"] - results[base]["accuracy"]))
    return {
        "gain_points": _mean(per_seed),
        "gain_by_seed": per_seed,
        "accuracy_by_seed": [
            results[Case(dataset, variant, part, s, plan.rounds, plan.smoke)]["accuracy"]
            for s in plan.seeds
        ],
        "baseline": BASELINE[variant],
        "baseline_accuracy_by_seed": [
            results[Case(dataset, BASELINE[variant], part, s, plan.rounds, plan.smoke)]["accuracy"]
            for s in plan.seeds
        ],
    }


def summarise(results: Mapping[Case, Mapping[str, Any]], plan: Plan) -> dict[str, Any]:
    """The gated figures (flat) and their details from the runs of ``plan``."""
    by_dataset: dict[str, Any] = {}
    for dataset in plan.datasets:
        accuracy = {
            variant: {
                part: {
                    "mean": _mean(
                        results[Case(dataset, variant, part, s, plan.rounds, plan.smoke)][
                            "accuracy"
                        ]
                        for s in plan.seeds
                    ),
                    "by_seed": [
                        results[Case(dataset, variant, part, s, plan.rounds, plan.smoke)][
                            "accuracy"
                        ]
                        for s in plan.seeds
                    ],
                }
                for part in PARTITIONS
            }
            for variant in VARIANTS
        }
        gains = {
            variant: {
                part: _gain_entry(results, plan, dataset, variant, part) for part in PARTITIONS
            }
            for variant in BASELINE
        }
        by_dataset[dataset] = {"accuracy": accuracy, "gains": gains}

    def gain(dataset: str, variant: str, part: str) -> float:
        value: float = by_dataset[dataset]["gains"][variant][part]["gain_points"]
        return value

    def worst_over_datasets(variant: str, part: str) -> tuple[float, str]:
        return min((gain(d, variant, part), d) for d in plan.datasets)

    figures: dict[str, float] = {}
    where: dict[str, str] = {}
    for key, variant in (
        ("gain_noniid_points_shared", "shared"),
        ("gain_noniid_points_inversion", "inversion"),
        ("gain_noniid_points_both", "both"),
    ):
        figures[key], where[key] = worst_over_datasets(variant, NONIID)
    by_mode = {
        mode: {
            "variant": variant,
            "gain_noniid_points": worst_over_datasets(variant, NONIID)[0],
            "gain_iid_points": worst_over_datasets(variant, IID)[0],
            "by_dataset": {
                d: {"noniid": gain(d, variant, NONIID), "iid": gain(d, variant, IID)}
                for d in plan.datasets
            },
        }
        for mode, variant in INVERSION_BY_MODE.items()
    }
    iid = {variant: worst_over_datasets(variant, IID) for variant in BASELINE}
    worst_iid = min(iid, key=lambda v: iid[v][0])
    figures["gain_iid_points"] = iid[worst_iid][0]
    where["gain_iid_points"] = f"{worst_iid}/{iid[worst_iid][1]}"

    # per variant: refine seconds, memorisation, fidelity (pooled over datasets, partitions
    # and seeds; per dataset and partition below)
    by_variant: dict[str, Any] = {}
    fidelity_means: list[tuple[float, str]] = []
    for variant in BASELINE:
        runs = [r for c, r in results.items() if c.variant == variant]
        seconds = [s for r in runs for s in r["refine_seconds"]]
        ratios = [x for r in runs for x in r["memorisation_ratios"]]
        entry: dict[str, Any] = {
            "mode": VARIANTS[variant][0],
            "baseline": BASELINE[variant],
            "gain_iid_points_worst": iid[variant][0],
            "refine_seconds_per_round": _mean(seconds) if seconds else 0.0,
            "memorisation_ratio_min": min(ratios) if ratios else None,
            "memorisation_ratio_median": float(np.median(ratios)) if ratios else None,
            "fidelity": {},
        }
        if any(r["fidelity"] is not None for r in runs):
            for dataset in plan.datasets:
                for part in PARTITIONS:
                    per_seed = [
                        results[Case(dataset, variant, part, s, plan.rounds, plan.smoke)][
                            "fidelity"
                        ]
                        for s in plan.seeds
                    ]
                    # a run that never made a synthetic set (no round was refined) is named
                    # under ``runs_without_synthetic``, not averaged as a zero
                    scored = [f for f in per_seed if f is not None]
                    if not scored:
                        continue
                    mean = _mean(scored)
                    reference = [
                        results[Case(dataset, variant, part, s, plan.rounds, plan.smoke)][
                            "classifier_test_accuracy"
                        ]
                        for s in plan.seeds
                    ]
                    entry["fidelity"][f"{dataset}/{part}"] = {
                        "mean": mean,
                        "by_seed": per_seed,
                        "classifier_test_accuracy_by_seed": reference,
                    }
                    fidelity_means.append((mean, f"{variant}/{dataset}/{part}"))
        by_variant[variant] = entry

    all_ratios = [(x, c.name) for c, r in results.items() for x in r["memorisation_ratios"]]
    where["runs_without_synthetic"] = ", ".join(
        sorted(
            c.name
            for c, r in results.items()
            if VARIANTS[c.variant][1] is not None
            and "server_inversion" in (VARIANTS[c.variant][1] or {})
            and r["fidelity"] is None
        )
    )
    # fidelity: per variant, the mean over datasets (each dataset's own judge), partitions and
    # seeds; the worst variant at top level. Per dataset beside it, with the judge's accuracy
    # on that dataset's real test records (its ceiling: 0.33 on MNIST-1D, 0.96 on digits)
    pooled: dict[str, list[float]] = {}
    per_dataset: dict[str, list[float]] = {d: [] for d in plan.datasets}
    for mean, name in fidelity_means:
        variant, dataset, _part = name.split("/")
        pooled.setdefault(variant, []).append(mean)
        per_dataset[dataset].append(mean)
    fidelity_by_variant = {v: _mean(xs) for v, xs in pooled.items()}
    worst_fidelity = min(fidelity_by_variant, key=lambda v: fidelity_by_variant[v])
    figures["synthetic_fidelity"] = fidelity_by_variant[worst_fidelity]
    where["synthetic_fidelity"] = worst_fidelity
    for dataset in plan.datasets:
        figures[f"synthetic_fidelity_{dataset}"] = min(per_dataset[dataset])
        figures[f"classifier_real_accuracy_{dataset}"] = _mean(
            r["classifier_test_accuracy"]
            for c, r in results.items()
            if c.dataset == dataset and r["classifier_test_accuracy"] is not None
        )
    figures["memorisation_ratio"], where["memorisation_ratio"] = min(all_ratios)
    all_seconds = [s for r in results.values() for s in r["refine_seconds"]]
    figures["refine_seconds_per_round"] = _mean(all_seconds)

    fedavg = {
        d: {part: by_dataset[d]["accuracy"]["fedavg"][part]["mean"] for part in PARTITIONS}
        for d in plan.datasets
    }
    return {
        "figures": figures,
        "details": {
            "worst_cases": where,
            "fedavg_accuracy": fedavg,
            "by_dataset": by_dataset,
            "by_mode": by_mode,
            "by_variant": by_variant,
            "runs": {c.name: dict(r) for c, r in results.items()},
        },
    }


def measure(settings: BenchSettings, workdir: Path, workers: int) -> dict[str, Any]:
    plan = plan_for(settings)
    started = time.perf_counter()
    results = run_cases(plan.cases(), workdir, workers)
    summary = summarise(results, plan)
    summary["details"]["plan"] = {
        "seeds": list(plan.seeds),
        "rounds": plan.rounds,
        "datasets": list(plan.datasets),
        "partitions": PARTITIONS,
        "clients": CLIENTS,
        "clients_per_round": CLIENTS_PER_ROUND,
        "masking_clients_per_round": MASKING_CLIENTS_PER_ROUND,
        "masking_min_cohort": MASKING_MIN_COHORT,
        "mnist1d_samples": MNIST1D_SAMPLES,
        "variants": {v: {"mode": m, "refine": r} for v, (m, r) in VARIANTS.items()},
        "runs": len(results),
        "workers": workers,
        "runs_wall_s": time.perf_counter() - started,
        # the runs' CPU time over the workers: what the matrix would take on idle cores
        "idle_estimate_s": sum(r["cpu_seconds"] for r in results.values()) / workers,
        "run_seconds_by_mode": {
            mode: _mean(r["seconds"] for c, r in results.items() if c.mode == mode)
            for mode in ("none", "masking", "ckks")
        },
    }
    return summary


@register_benchmark(
    "refine",
    "inversion-based refinement over FedAvg on digits and MNIST-1D (Dirichlet 0.1 and IID, "
    "modes none, masking with sub-cohorts, ckks): gains, synthetic fidelity, memorisation",
)
def bench_refine(settings: BenchSettings) -> dict[str, Any]:
    workers = 1 if settings.smoke else WORKERS
    with bench_workdir() as workdir:
        measured = measure(settings, workdir, workers)
    figures = measured["figures"]
    return {**figures, "goals": dict(GOALS), "details": measured["details"]}
