"""``secfl bench trust``: the smoke run writes every gated key, the backdoor success rate on
a toy model, and the decision rates counted from a synthetic event log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from secfl.attacks import get_attack
from secfl.bench import run_benchmark
from secfl.bench.trust import (
    ATTACKS,
    GOALS,
    Case,
    DecisionCounts,
    backdoor_success_rate,
    case_config,
    decision_counts,
)

RATES = (
    "trusted_party_malicious_rate",
    "trusted_party_malicious_rate_alie",
    "honest_flagged_rate_iid",
    "honest_flagged_rate_noniid",
    "malicious_kept_rate",
)


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "trust.json"
    run_benchmark("trust", out=out, smoke=True)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_smoke_bench_writes_every_gated_key(smoke_report: dict[str, Any]) -> None:
    report = smoke_report
    for key in GOALS:
        assert key in report, key
        assert isinstance(report[key], float) and math.isfinite(report[key]), (key, report[key])
    assert set(report["goals"]) == set(GOALS)
    for key in RATES:
        assert 0.0 <= report[key] <= 1.0, (key, report[key])
    for key in GOALS:
        if key.startswith("worst_case_acc_drop") or key == "clean_acc_drop":
            assert -100.0 <= report[key] <= 100.0, (key, report[key])
    assert -1.0 <= report["backdoor_asr"] <= 1.0
    assert report["ckks_trust_s_per_client_per_1e6"] > 0
    # every attack's pinned parameters are echoed, with the adversary's setting
    for label, (name, params) in ATTACKS.items():
        assert report["attacks"][label]["attack"] == name
        assert report["attacks"][label]["params"] == params
    assert report["attacks"]["ipm_mean_reversing"]["epsilon"] == "mean_reversing"
    details = report["details"]
    assert {"by_mode", "by_attack", "baselines", "worst_cases"} <= set(details)
    assert set(details["baselines"]) == {"median", "fltrust"}
    # the worst case named for a key is the row that holds its value
    where = details["worst_cases"]["worst_case_acc_drop_f2"]
    mode, f, partition, attack = where.split("/")
    row = details["by_mode"][mode][f][partition][attack]
    assert row["drop"] == pytest.approx(report["worst_case_acc_drop_f2"])
    assert row["drop"] == pytest.approx(float(np.mean(row["drop_by_seed"])))


def test_case_config_builds_each_mode() -> None:
    none = case_config(Case("none", "vote", "ipm_mean_reversing", 4, "iid", 1, 40, 10))
    assert none.aggregation.protection == "none" and none.trust is not None
    assert none.adversary is not None and none.adversary.params == {"epsilon": "mean_reversing"}
    assert none.adversary.count == 4 and none.data.partition.kind == "iid" and none.seed == 1
    clean = case_config(Case("masking", "vote", "alie", 6, "dirichlet0.5", 0, 40, 30).clean())
    assert clean.trust is None and clean.adversary is None
    assert clean.aggregation.protection == "none" and clean.data.num_clients == 30
    masking = case_config(Case("masking", "vote", "alie", 12, "dirichlet0.5", 0, 40, 30))
    assert masking.aggregation.min_cohort == 5 and masking.server.sampling.clients_per_round == 30
    ckks = case_config(Case("ckks", "vote", "min_max", 4, "iid", 0, 20, 10))
    assert ckks.aggregation.ckks.preset == "trust" and ckks.rounds == 20
    krum = case_config(Case("none", "krum", "gaussian", 4, "iid", 0, 40, 10))
    assert krum.trust is not None and krum.trust.defense == "krum"


class _TriggerDetector(nn.Module):
    """Predicts class 0 when the top-left pixel is set and pixel (4, 4) is above 0.5, class 1
    otherwise: a backdoor that fires on the trigger only for some inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        fires = (x[:, 0, 0, 0] > 0.99) & (x[:, 0, 4, 4] > 0.5)
        logits[:, 0] = fires.float() * 10.0
        logits[:, 1] = 5.0
        return logits


def test_backdoor_success_rate_on_a_toy_model() -> None:
    attack = get_attack("backdoor", {})
    x = np.zeros((6, 1, 8, 8), dtype=np.float32)
    y = np.array([0, 0, 1, 2, 3, 4])
    x[0, 0, 4, 4] = x[1, 0, 4, 4] = 1.0  # target-class records: not counted either way
    x[2, 0, 4, 4] = 1.0  # one of the four non-target records carries the backdoor's condition
    model = _TriggerDetector()
    assert backdoor_success_rate(model, x, y, attack) == pytest.approx(0.25)
    x[3:, 0, 4, 4] = 1.0
    assert backdoor_success_rate(model, x, y, attack) == pytest.approx(1.0)
    # without the trigger the same model never predicts the target: the trigger is what fires
    assert (model(torch.from_numpy(x)).argmax(dim=1) == 1).all()
    assert backdoor_success_rate(model, x, np.zeros(6, dtype=np.int64), attack) == 0.0


def _vote(round_index: int, trusted: int | None, attempt: int = 0) -> dict[str, Any]:
    return {
        "event": "trust_vote",
        "round": round_index,
        "attempt": attempt,
        "trusted_party": trusted,
    }


def _flag(round_index: int, client: int, attempt: int = 0) -> dict[str, Any]:
    return {"event": "trust_flag", "round": round_index, "attempt": attempt, "client": client}


def _kept(round_index: int, clients: list[int], attempt: int = 0) -> dict[str, Any]:
    return {
        "event": "trust_kept",
        "round": round_index,
        "attempt": attempt,
        "clients": {str(c): {"score": 1.0} for c in clients},
    }


def test_rates_from_a_synthetic_event_log() -> None:
    events: list[dict[str, Any]] = [
        {"event": "run_started"},
        {"event": "adversary_selected", "clients": [1, 2], "setting": {"rounds": None}},
        # round 1: honest 0 elected, attacker 1 flagged, honest 3 flagged, 2 kept
        _vote(1, 0),
        _flag(1, 1),
        _flag(1, 3),
        _kept(1, [0, 2, 4]),
        # round 2, attempt 0 is superseded by attempt 1: only attempt 1 counts
        _vote(2, 2),
        _kept(2, [0, 1, 2, 3, 4]),
        _vote(2, 1, attempt=1),
        _flag(2, 2, attempt=1),
        _kept(2, [0, 1, 3, 4], attempt=1),
        # round 3: nobody elected, everyone flagged
        _vote(3, None),
        *(_flag(3, c) for c in range(5)),
        _kept(3, []),
    ]
    counts = decision_counts(events)
    assert counts == DecisionCounts(
        votes=2, trusted_malicious=1, honest=9, honest_flagged=4, malicious=6, malicious_kept=2
    )
    rates = counts.rates()
    assert rates["trusted_party_malicious_rate"] == pytest.approx(0.5)
    assert rates["honest_flagged_rate"] == pytest.approx(4 / 9)
    assert rates["malicious_kept_rate"] == pytest.approx(2 / 6)
    # an attack window: rounds outside it are not counted
    windowed = [dict(e) for e in events]
    windowed[1] = {**windowed[1], "setting": {"rounds": [1, 1]}}
    assert decision_counts(windowed) == DecisionCounts(
        votes=1, trusted_malicious=0, honest=3, honest_flagged=1, malicious=2, malicious_kept=1
    )
    # no adversary: every client is honest
    clean = decision_counts(events[2:6])
    assert clean == DecisionCounts(votes=1, honest=5, honest_flagged=2)


def test_rates_from_sub_cohort_events() -> None:
    events: list[dict[str, Any]] = [
        {"event": "adversary_selected", "clients": [0, 5], "setting": {"rounds": None}},
        {
            "event": "trust_vote",
            "round": 1,
            "attempt": 0,
            "candidates": "sub-cohorts",
            "trusted_party": 1,
            "members": {"0": [0, 1, 2], "1": [3, 4, 5], "2": [6, 7, 8]},
        },
        {"event": "trust_cohort_flag", "round": 1, "attempt": 0, "cohort": 0, "members": [0, 1, 2]},
        {
            "event": "trust_cohort_kept",
            "round": 1,
            "attempt": 0,
            "cohorts": {"1": {"members": [3, 4, 5]}, "2": {"members": [6, 7, 8]}},
        },
        # round 2: attacker 0 excluded before masking, an honest client too
        {"event": "trust_excluded", "round": 2, "attempt": 0, "client": 0},
        {"event": "trust_excluded", "round": 2, "attempt": 0, "client": 1},
        {
            "event": "trust_vote",
            "round": 2,
            "attempt": 0,
            "candidates": "sub-cohorts",
            "trusted_party": 0,
            "members": {"0": [2, 3, 4], "1": [5, 6, 7]},
        },
        {
            "event": "trust_cohort_kept",
            "round": 2,
            "attempt": 0,
            "cohorts": {"0": {"members": [2, 3, 4]}, "1": {"members": [5, 6, 7]}},
        },
    ]
    counts = decision_counts(events)
    # round 1: the trusted sub-cohort {3, 4, 5} holds attacker 5; honest 1, 2 flagged with 0
    # round 2: attackers 0 (excluded) and 5 (kept); honest 1 excluded
    assert counts == DecisionCounts(
        votes=2, trusted_malicious=1, honest=13, honest_flagged=3, malicious=4, malicious_kept=2
    )


def test_cli_lists_the_benchmark(tmp_path: Path) -> None:
    from secfl.bench import available_benchmarks

    assert "trust" in available_benchmarks()
