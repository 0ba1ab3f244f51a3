"""Benchmark ``trust``: the voted trusted party against every poisoning attack, in every mode.

Digits (``examples/digits_trust.yaml``: 40 rounds of 2 local epochs, MLP), IID and
Dirichlet(0.5) partitions, every attack of ``docs/attacks.md`` with its pinned parameters
(echoed under ``attacks``):

* mode ``none``: 10 clients, f = 2 and 4 colluding, omniscient attackers;
* mode ``ckks``: f = 4, the three attacks worst for ``none`` (by their worst drop), one seed,
  20 rounds (trust preset, flooded scalars);
* mode ``masking``: 30 clients (``examples/digits_trust_masking.yaml``), ``min_cohort`` 5,
  f = 6 and 12;
* baselines (Krum, Multi-Krum, coordinate median, trimmed mean, centered clipping, FLTrust)
  in mode ``none`` on the attacks of the ``ckks`` subset, f = 4, one seed.

A *drop* is 100 x (clean FedAvg accuracy - defended accuracy) at the final round, averaged
over the seeds, where the clean run has the same clients, partition, seed and rounds and no
trust module and no attacker (for ``masking``, plain FedAvg in mode ``none`` with the same 30
clients: secure aggregation itself does not change the mean beyond its 16-bit
quantisation). Each gated key holds the worst case over attacks and partitions. Rates come
from each run's event log: the malicious clients (``adversary_selected``), the elected
trusted party (``trust_vote``) and each participant's verdict (``trust_flag`` /
``trust_kept``; under masking the members of flagged / kept sub-cohorts and
``trust_excluded``). The gated rates pool the per-client decisions of modes ``none`` and
``ckks`` (the vote defense); under masking an honest member of a flagged sub-cohort is
flagged by construction, so its rates are reported under ``details.by_mode.masking``.

``--quick`` runs one seed with the same sizes and keys, the ``masking``, ``ckks`` and
baseline rows on the Dirichlet partition only, and ``ckks`` and the baselines on the one
attack worst for ``none`` (a 20-round ``ckks`` run takes about two minutes); ``--smoke``
(tests) runs a few rounds of a few attacks, ungated. Runs go to a pool of worker processes
(one torch thread each, ``WORKERS``), so the wall time depends on the machine's load
(``machine``)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfl.bench.harness import (
    BenchSettings,
    bench_workdir,
    register_benchmark,
    run_in_processes,
    timed_run,
)

_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NONE_CONFIG = "digits_trust.yaml"
MASKING_CONFIG = "digits_trust_masking.yaml"

#: Attack label -> (registered attack, params). IPM twice: epsilon 0.5 and mean reversing.
ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "sign_flip": ("sign_flip", {}),
    "gaussian": ("gaussian", {}),
    "label_flip": ("label_flip", {}),
    "alie": ("alie", {}),
    "ipm_0.5": ("ipm", {"epsilon": 0.5}),
    "ipm_mean_reversing": ("ipm", {"epsilon": "mean_reversing"}),
    "min_max": ("min_max", {}),
    "min_sum": ("min_sum", {}),
    "backdoor": ("backdoor", {}),
}
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"kind": "iid"},
    "dirichlet0.5": {"kind": "dirichlet", "alpha": 0.5},
}
NONIID = ("dirichlet0.5",)
BASELINES = ("krum", "multi_krum", "median", "trimmed_mean", "centered_clipping", "fltrust")
#: f per mode and the masking federation's size (the issue's matrix).
NONE_F = (2, 4)
MASKING_F = (6, 12)
MASKING_CLIENTS = 30
MASKING_MIN_COHORT = 5
CKKS_ROUNDS = 20
CKKS_F = 4
#: How many of the attacks worst for mode none the ckks subset and the baselines run.
SUBSET_SIZE = 3
#: Worker processes for the runs (each trains with one torch thread).
WORKERS = max(1, min(2, os.cpu_count() or 1))

GOALS = {
    "worst_case_acc_drop_f2": "<= 3",
    "worst_case_acc_drop_f4": "<= 5",
    "worst_case_acc_drop_masking_f6": "<= 5",
    "worst_case_acc_drop_masking_f12": "<= 8 (reported)",
    "backdoor_asr": "<= 0.15",
    "trusted_party_malicious_rate": "<= 0.05",
    "trusted_party_malicious_rate_alie": "reported",
    "honest_flagged_rate_iid": "<= 0.10",
    "honest_flagged_rate_noniid": "<= 0.20",
    "malicious_kept_rate": "<= 0.20",
    "clean_acc_drop": "<= 1",
    "ckks_trust_s_per_client_per_1e6": "reported",
}


@dataclass(frozen=True)
class Case:
    """One federation of the matrix. ``defense`` ``fedavg`` is the clean reference (no
    trust module); ``attack`` ``None`` runs without an adversary."""

    mode: str
    defense: str
    attack: str | None
    f: int
    partition: str
    seed: int
    rounds: int
    clients: int

    @property
    def name(self) -> str:
        attack = self.attack or "clean"
        return (
            f"{self.mode}-{self.defense}-{attack}-f{self.f}-{self.partition}-"
            f"n{self.clients}-r{self.rounds}-s{self.seed}"
        )

    def clean(self) -> Case:
        """The clean FedAvg reference of this case (mode none, same federation)."""
        return Case("none", "fedavg", None, 0, self.partition, self.seed, self.rounds, self.clients)


def case_config(case: Case) -> Any:
    """The run config of ``case`` (a :class:`secfl.config.RunConfig`)."""
    from secfl.config import load_config

    masking = case.mode == "masking"
    base = load_config(_EXAMPLES / (MASKING_CONFIG if masking else NONE_CONFIG))
    overrides: dict[str, Any] = {
        "name": case.name,
        "seed": case.seed,
        "rounds": case.rounds,
        "data.num_clients": case.clients,
        "data.partition": PARTITIONS[case.partition],
        "server.sampling.clients_per_round": case.clients,
        "aggregation.protection": case.mode,
        "adversary": None,
        # the experimenter's per-client accuracy spread is not used here (a quarter of a run)
        "evaluation.per_client": False,
    }
    if case.mode == "ckks":
        overrides["aggregation.ckks"] = {
            "preset": "trust",
            "flooding": {"statistical_bits": 40, "query_budget": 65536},
            "max_weight_share": 0.5,
            "clip_range": 1.0,
        }
    if case.defense == "fedavg":
        overrides["trust"] = None
    else:
        overrides["trust.defense"] = case.defense
    if case.attack is not None:
        attack, params = ATTACKS[case.attack]
        overrides["adversary"] = {
            "attack": attack,
            "count": case.f,
            "collusion": True,
            "omniscient": True,
            "params": params,
        }
    return base.with_overrides(**overrides)


# ---------------------------------------------------------------------------- measures


def backdoor_success_rate(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, attack: Any
) -> float:
    """The share of test inputs whose label is not ``attack.target`` that ``model``
    classifies as the target once ``attack.apply_trigger`` stamps them (Bagdasaryan et al.
    2020's attack success rate, before subtracting the clean model's rate)."""
    keep = np.asarray(y) != attack.target
    if not keep.any():
        return 0.0
    triggered = np.ascontiguousarray(attack.apply_trigger(np.asarray(x)[keep]), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(triggered)).argmax(dim=1).numpy()
    return float(np.mean(predicted == attack.target))


@dataclass
class DecisionCounts:
    """Per-client verdicts in the rounds the adversary was active, from one event log.

    ``votes``: rounds with an elected trusted party; ``trusted_malicious``: of those, rounds
    whose trusted party is malicious (under masking: a sub-cohort holding an attacker).
    ``honest`` / ``malicious``: (client, round) decisions; ``honest_flagged`` and
    ``malicious_kept`` the wrong ones. Under masking a client excluded before the round
    (``trust_excluded``) counts as flagged."""

    votes: int = 0
    trusted_malicious: int = 0
    honest: int = 0
    honest_flagged: int = 0
    malicious: int = 0
    malicious_kept: int = 0

    def add(self, other: DecisionCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def rates(self) -> dict[str, float | None]:
        return {
            "trusted_party_malicious_rate": _ratio(self.trusted_malicious, self.votes),
            "honest_flagged_rate": _ratio(self.honest_flagged, self.honest),
            "malicious_kept_rate": _ratio(self.malicious_kept, self.malicious),
        }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def decision_counts(events: Iterable[Mapping[str, Any]]) -> DecisionCounts:
    """Count the trust module's verdicts against the adversary's clients in an event log
    (modes ``none`` / ``ckks``: ``trust_vote``, ``trust_flag``, ``trust_kept``; masking:
    ``trust_vote`` over sub-cohorts, ``trust_cohort_flag``, ``trust_cohort_kept``,
    ``trust_excluded``). Without ``adversary_selected`` every client is honest. Only the
    last attempt of a round counts."""
    malicious: set[int] = set()
    window: tuple[int, int] | None = None
    rounds: dict[int, dict[str, Any]] = {}
    for event in events:
        kind = event.get("event")
        if kind == "adversary_selected":
            malicious = {int(c) for c in event["clients"]}
            span = event.get("setting", {}).get("rounds")
            window = (int(span[0]), int(span[1])) if span else None
            continue
        if kind not in (
            "trust_vote",
            "trust_flag",
            "trust_kept",
            "trust_cohort_flag",
            "trust_cohort_kept",
            "trust_excluded",
        ):
            continue
        index, attempt = int(event["round"]), int(event["attempt"])
        slot = rounds.get(index)
        if slot is None or attempt > slot["attempt"]:
            slot = {"attempt": attempt, "trusted": None, "flagged": set(), "kept": set()}
            rounds[index] = slot
        elif attempt < slot["attempt"]:
            continue
        if kind == "trust_vote":
            party = event["trusted_party"]
            if party is None:
                slot["trusted"] = None
            elif event.get("candidates") == "sub-cohorts":
                slot["trusted"] = {int(c) for c in event["members"][str(party)]}
            else:
                slot["trusted"] = {int(party)}
        elif kind == "trust_flag":
            slot["flagged"].add(int(event["client"]))
        elif kind == "trust_kept":
            slot["kept"].update(int(c) for c in event["clients"])
        elif kind == "trust_cohort_flag":
            slot["flagged"].update(int(c) for c in event["members"])
        elif kind == "trust_cohort_kept":
            for cohort in event["cohorts"].values():
                slot["kept"].update(int(c) for c in cohort["members"])
        else:  # trust_excluded
            slot["flagged"].add(int(event["client"]))
    counts = DecisionCounts()
    for index, slot in rounds.items():
        if window is not None and not window[0] <= index <= window[1]:
            continue
        flagged: set[int] = slot["flagged"]
        kept: set[int] = slot["kept"] - flagged
        if slot["trusted"] is not None:
            counts.votes += 1
            counts.trusted_malicious += int(bool(slot["trusted"] & malicious))
        for client in flagged | kept:
            if client in malicious:
                counts.malicious += 1
                counts.malicious_kept += int(client in kept)
            else:
                counts.honest += 1
                counts.honest_flagged += int(client in flagged)
    return counts


def run_case(case: Case, workdir: str) -> dict[str, Any]:
    """Run ``case`` and measure it: final accuracy, the backdoor trigger rate (every run, so
    clean runs give the rate to subtract), the decision counts and the wall time."""
    from secfl.attacks import get_attack
    from secfl.audit.events import read_events
    from secfl.data.federated import build_federated_data
    from secfl.randomness import Randomness
    from secfl.record import rundir

    config = case_config(case)
    folder = Path(workdir) / case.name
    timed = timed_run(config, folder)
    result = timed.result
    data = build_federated_data(config.data, Randomness(config.security.randomness, config.seed))
    backdoor = get_attack("backdoor", ATTACKS["backdoor"][1])
    asr = backdoor_success_rate(result.model, data.test.x, data.test.y, backdoor)
    counts = decision_counts(read_events(folder / rundir.EVENTS_NAME))
    return {
        "case": asdict(case),
        "accuracy": float(result.history[-1]["accuracy"]),
        "trigger_rate": asr,
        "counts": asdict(counts),
        "seconds": timed.seconds,
        "cpu_seconds": timed.cpu_seconds,
    }


def run_cases(cases: Sequence[Case], workdir: Path, workers: int) -> dict[Case, dict[str, Any]]:
    """Every case once (duplicates removed), in ``workers`` processes (1: in this one)."""
    return run_in_processes(run_case, cases, workdir, workers)


# ---------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    rounds: int
    ckks_rounds: int
    none_attacks: tuple[str, ...]
    none_f: tuple[int, ...]
    masking_attacks: tuple[str, ...]
    masking_f: tuple[int, ...]
    partitions: tuple[str, ...]
    masking_partitions: tuple[str, ...]
    baselines: tuple[str, ...]
    baseline_partitions: tuple[str, ...]
    #: Partitions of the ckks subset (empty: no ckks runs).
    ckks_partitions: tuple[str, ...]
    #: How many of the subset's attacks (worst for mode none first) ckks and the
    #: baselines run.
    ckks_attacks: int = SUBSET_SIZE
    baseline_attacks: int = SUBSET_SIZE
    clients: int = 10
    masking_clients: int = MASKING_CLIENTS


def plan_for(settings: BenchSettings) -> Plan:
    if settings.smoke:  # every key, a few rounds: the same code paths in seconds
        return Plan(
            seeds=(0,),
            rounds=2,
            ckks_rounds=1,
            none_attacks=("sign_flip", "alie", "backdoor"),
            none_f=NONE_F,
            masking_attacks=("sign_flip",),
            masking_f=MASKING_F,
            partitions=tuple(PARTITIONS),
            masking_partitions=("iid",),
            baselines=("median", "fltrust"),
            baseline_partitions=("iid",),
            ckks_partitions=(),
            masking_clients=24,
        )
    every = tuple(ATTACKS)
    return Plan(
        seeds=(0,) if settings.quick else (0, 1, 2),
        rounds=40,
        ckks_rounds=CKKS_ROUNDS,
        none_attacks=every,
        none_f=NONE_F,
        masking_attacks=every,
        masking_f=MASKING_F,
        partitions=tuple(PARTITIONS),
        # --quick: one seed; the masking, ckks and baseline rows on the harder partition
        # only, and ckks and the baselines on the attack worst for mode none only (a ckks
        # run of 20 rounds takes about two minutes)
        masking_partitions=NONIID if settings.quick else tuple(PARTITIONS),
        baselines=BASELINES,
        baseline_partitions=NONIID if settings.quick else tuple(PARTITIONS),
        ckks_partitions=NONIID if settings.quick else tuple(PARTITIONS),
        ckks_attacks=1 if settings.quick else SUBSET_SIZE,
        baseline_attacks=1 if settings.quick else SUBSET_SIZE,
    )


def _mean(values: Iterable[float]) -> float:
    return float(statistics.fmean(values))


class Matrix:
    """The measured runs and the drops derived from them."""

    def __init__(self, plan: Plan, workdir: Path, workers: int) -> None:
        self.plan = plan
        self.workdir = workdir
        self.workers = workers
        self.results: dict[Case, dict[str, Any]] = {}

    def run(self, cases: Sequence[Case]) -> None:
        todo = [c for c in cases if c not in self.results]
        todo += [c.clean() for c in cases if c.clean() not in self.results]
        self.results.update(run_cases(todo, self.workdir, self.workers))

    def drop(self, case: Case) -> float:
        """100 x (clean accuracy - defended accuracy) of one seed's run."""
        return 100.0 * (self.results[case.clean()]["accuracy"] - self.results[case]["accuracy"])

    def asr(self, case: Case) -> float:
        return float(
            self.results[case]["trigger_rate"] - self.results[case.clean()]["trigger_rate"]
        )

    def cases(
        self, mode: str, defense: str, attack: str | None, f: int, partition: str
    ) -> list[Case]:
        plan = self.plan
        masking = mode == "masking"
        rounds = plan.ckks_rounds if mode == "ckks" else plan.rounds
        seeds = plan.seeds[:1] if mode == "ckks" or defense in BASELINES else plan.seeds
        clients = plan.masking_clients if masking else plan.clients
        return [Case(mode, defense, attack, f, partition, s, rounds, clients) for s in seeds]

    def summary(
        self, mode: str, defense: str, attack: str | None, f: int, partition: str
    ) -> dict[str, Any]:
        runs = self.cases(mode, defense, attack, f, partition)
        drops = [self.drop(c) for c in runs]
        out: dict[str, Any] = {
            "drop": _mean(drops),
            "drop_by_seed": drops,
            "accuracy": [self.results[c]["accuracy"] for c in runs],
            "clean_accuracy": [self.results[c.clean()]["accuracy"] for c in runs],
        }
        if attack == "backdoor":
            out["backdoor_asr"] = _mean(self.asr(c) for c in runs)
        total = DecisionCounts()
        for c in runs:
            total.add(DecisionCounts(**self.results[c]["counts"]))
        if defense == "vote":
            out["counts"] = asdict(total)
            out.update(total.rates())
        return out


def _worst(rows: Mapping[str, Mapping[str, Any]]) -> tuple[float, str]:
    label = max(rows, key=lambda k: rows[k]["drop"])
    return float(rows[label]["drop"]), label


def measure_matrix(settings: BenchSettings, workdir: Path, workers: int) -> dict[str, Any]:
    """Run the plan and reduce it to the gated keys and the details."""
    plan = plan_for(settings)
    matrix = Matrix(plan, workdir, workers)
    timings: dict[str, float] = {}

    def phase(name: str, cases: list[Case]) -> None:
        started = time.perf_counter()
        matrix.run(cases)
        timings[name] = time.perf_counter() - started

    cases: list[Case] = []
    for partition in plan.partitions:
        cases += matrix.cases("none", "vote", None, 0, partition)
        for f in plan.none_f:
            for attack in plan.none_attacks:
                cases += matrix.cases("none", "vote", attack, f, partition)
    phase("none", cases)

    by_mode: dict[str, Any] = {"none": {}, "ckks": {}, "masking": {}}
    by_attack: dict[str, Any] = {a: {} for a in ATTACKS}
    for partition in plan.partitions:
        for f in plan.none_f:
            for attack in plan.none_attacks:
                row = matrix.summary("none", "vote", attack, f, partition)
                label = f"f{f}/{partition}"
                by_mode["none"].setdefault(f"f{f}", {}).setdefault(partition, {})[attack] = row
                by_attack[attack][f"none/{label}"] = row
    # the ckks subset and the baselines: the attacks worst for mode none at f = 4
    worst_f4 = {
        a: max(by_mode["none"][f"f{max(plan.none_f)}"][p][a]["drop"] for p in plan.partitions)
        for a in plan.none_attacks
    }
    subset = tuple(sorted(worst_f4, key=lambda a: -worst_f4[a])[:SUBSET_SIZE])
    # one pool for the rest, the long ckks runs first so that the pool's tail is short
    cases = []
    for partition in plan.ckks_partitions:
        for attack in subset[: plan.ckks_attacks]:
            cases += matrix.cases("ckks", "vote", attack, CKKS_F, partition)
    for partition in plan.baseline_partitions:
        for defense in plan.baselines:
            for attack in subset[: plan.baseline_attacks]:
                cases += matrix.cases("none", defense, attack, max(plan.none_f), partition)
    for partition in plan.masking_partitions:
        cases += matrix.cases("masking", "vote", None, 0, partition)
        for f in plan.masking_f:
            for attack in plan.masking_attacks:
                cases += matrix.cases("masking", "vote", attack, f, partition)
    phase("ckks_baselines_masking", cases)
    if plan.ckks_partitions:
        for partition in plan.ckks_partitions:
            for attack in subset[: plan.ckks_attacks]:
                row = matrix.summary("ckks", "vote", attack, CKKS_F, partition)
                by_mode["ckks"].setdefault(f"f{CKKS_F}", {}).setdefault(partition, {})[attack] = row
                by_attack[attack][f"ckks/f{CKKS_F}/{partition}"] = row
    baselines: dict[str, Any] = {}
    for defense in plan.baselines:
        rows = {
            f"{attack}/{partition}": matrix.summary(
                "none", defense, attack, max(plan.none_f), partition
            )
            for partition in plan.baseline_partitions
            for attack in subset[: plan.baseline_attacks]
        }
        worst, where = _worst(rows)
        baselines[defense] = {"worst_drop": worst, "worst_case": where, "by_attack": rows}

    for partition in plan.masking_partitions:
        for f in plan.masking_f:
            for attack in plan.masking_attacks:
                row = matrix.summary("masking", "vote", attack, f, partition)
                by_mode["masking"].setdefault(f"f{f}", {}).setdefault(partition, {})[attack] = row
                by_attack[attack][f"masking/f{f}/{partition}"] = row

    figures: dict[str, Any] = {}
    worst_cases: dict[str, str] = {}

    def worst_of(key: str, entries: Mapping[str, Mapping[str, Any]]) -> None:
        value, where = _worst(entries) if entries else (float("nan"), "")
        figures[key] = value
        worst_cases[key] = where

    def rows_of(mode: str, f: int) -> dict[str, Mapping[str, Any]]:
        table = by_mode[mode].get(f"f{f}", {})
        return {
            f"{mode}/f{f}/{p}/{a}": row
            for p, attacks in table.items()
            for a, row in attacks.items()
        }

    f_low, f_high = min(plan.none_f), max(plan.none_f)
    worst_of(f"worst_case_acc_drop_f{f_low}", rows_of("none", f_low))
    worst_of(
        f"worst_case_acc_drop_f{f_high}", {**rows_of("none", f_high), **rows_of("ckks", CKKS_F)}
    )
    for f in plan.masking_f:
        worst_of(f"worst_case_acc_drop_masking_f{f}", rows_of("masking", f))

    backdoor = {
        where: row["backdoor_asr"]
        for where, row in by_attack["backdoor"].items()
        if "backdoor_asr" in row
    }
    figures["backdoor_asr"] = max(backdoor.values()) if backdoor else float("nan")
    worst_cases["backdoor_asr"] = max(backdoor, key=lambda k: backdoor[k]) if backdoor else ""

    # rates pooled over the vote's per-client decisions in modes none and ckks
    def pooled(
        attacks: Iterable[str], partitions: Iterable[str], *, clean: bool = False
    ) -> DecisionCounts:
        total = DecisionCounts()
        wanted = set(attacks)
        chosen = set(partitions)
        for case, result in matrix.results.items():
            if case.defense != "vote" or case.mode == "masking" or case.partition not in chosen:
                continue
            if case.attack in wanted or (clean and case.attack is None):
                total.add(DecisionCounts(**result["counts"]))
        return total

    attacked = [a for a in plan.none_attacks if a != "alie"]
    figures["trusted_party_malicious_rate"] = _rate(
        pooled(attacked, plan.partitions).rates()["trusted_party_malicious_rate"]
    )
    figures["trusted_party_malicious_rate_alie"] = _rate(
        pooled(["alie"], plan.partitions).rates()["trusted_party_malicious_rate"]
    )
    everything = list(plan.none_attacks)
    figures["honest_flagged_rate_iid"] = _rate(
        pooled(everything, ["iid"], clean=True).rates()["honest_flagged_rate"]
    )
    figures["honest_flagged_rate_noniid"] = _rate(
        pooled(everything, ["dirichlet0.5"], clean=True).rates()["honest_flagged_rate"]
    )
    figures["malicious_kept_rate"] = _rate(
        pooled(everything, plan.partitions).rates()["malicious_kept_rate"]
    )
    clean_rows = {f"none/{p}": matrix.summary("none", "vote", None, 0, p) for p in plan.partitions}
    worst_of("clean_acc_drop", clean_rows)
    masking_clean = {
        f"masking/{p}": matrix.summary("masking", "vote", None, 0, p)
        for p in plan.masking_partitions
    }
    by_mode["none"]["clean"] = clean_rows
    by_mode["masking"]["clean"] = masking_clean
    by_mode["masking"]["rates"] = {p: _pooled_masking(matrix, p) for p in plan.masking_partitions}
    seconds = [r["seconds"] for r in matrix.results.values()]
    return {
        "figures": figures,
        "details": {
            "worst_cases": worst_cases,
            "ckks_subset": list(subset),
            "by_mode": by_mode,
            "by_attack": {a: rows for a, rows in by_attack.items() if rows},
            "baselines": baselines,
            "matrix": {
                **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(plan).items()},
                "runs": len(matrix.results),
                "workers": workers,
                "phase_wall_s": timings,
                "run_seconds": {
                    "total": float(sum(seconds)),
                    "median": float(statistics.median(seconds)) if seconds else 0.0,
                    "max": float(max(seconds)) if seconds else 0.0,
                    # CPU time of the runs (their processes' own, whatever else the machine
                    # runs): total / workers is the wall time on an otherwise idle machine
                    "cpu_total": float(
                        sum(r.get("cpu_seconds", 0.0) for r in matrix.results.values())
                    ),
                },
            },
        },
    }


def _rate(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _pooled_masking(matrix: Matrix, partition: str) -> dict[str, Any]:
    total = DecisionCounts()
    for case, result in matrix.results.items():
        if case.mode == "masking" and case.defense == "vote" and case.partition == partition:
            total.add(DecisionCounts(**result["counts"]))
    return {
        **total.rates(),
        "counts": asdict(total),
        "note": (
            "per (client, round) verdicts: an honest member of a flagged sub-cohort, or an "
            "honest client excluded by suspicion, counts as flagged"
        ),
    }


def attack_descriptions() -> dict[str, Any]:
    """Every attack's pinned parameters (``describe()``) and the adversary setting."""
    from secfl.attacks import get_attack

    return {
        label: {**get_attack(name, params).describe(), "params": params}
        for label, (name, params) in ATTACKS.items()
    } | {"setting": {"collusion": True, "omniscient": True, "rounds": "every round"}}


def ckks_scalar_timing(settings: BenchSettings) -> dict[str, Any]:
    """``ckks_trust_s_per_client_per_1e6``, measured at d = 1e6 (smoke: 4,096)."""
    from secfl.he.trust import measure_trust_scalars

    # d = 1e6 as docs/ckks.md measures it: the per-ciphertext costs of a 17k-parameter model
    # (2 ciphertexts) scaled to 1e6 would overstate the figure about twofold
    return measure_trust_scalars(4096 if settings.smoke else 1_000_000, clients=2)


@register_benchmark(
    "trust",
    "the voted trusted party against every poisoning attack on digits (modes none, ckks, "
    "masking), beside Krum, Multi-Krum, median, trimmed mean, centered clipping and FLTrust",
)
def bench_trust(settings: BenchSettings) -> dict[str, Any]:
    workers = 1 if settings.smoke else WORKERS
    with bench_workdir() as workdir:
        measured = measure_matrix(settings, workdir, workers)
    timing = ckks_scalar_timing(settings)
    figures = measured["figures"]
    figures["ckks_trust_s_per_client_per_1e6"] = timing["ckks_trust_s_per_client_per_1e6"]
    goals = {k: GOALS[k] for k in figures if k in GOALS}
    return {
        **figures,
        "goals": goals,
        "attacks": attack_descriptions(),
        "details": {**measured["details"], "ckks_scalars": timing},
    }
