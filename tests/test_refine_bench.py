"""``secfl bench refine``: the smoke run writes every gated key with finite values in range,
the worst case named for a key is the row holding it, and the fidelity measure scores a
synthetic set by a logistic regression trained on real records."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from secfl.bench import run_benchmark
from secfl.bench.refine import (
    BASELINE,
    GOALS,
    INVERSION_BY_MODE,
    VARIANTS,
    Case,
    case_config,
    synthetic_fidelity,
)


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "refine.json"
    run_benchmark("refine", out=out, smoke=True)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_smoke_bench_writes_every_gated_key(smoke_report: dict[str, Any]) -> None:
    report = smoke_report
    for key in GOALS:
        assert isinstance(report.get(key), float) and math.isfinite(report[key]), (key, report)
    assert set(report["goals"]) == set(GOALS)
    for key in GOALS:
        if key.startswith("gain_"):
            assert -100.0 <= report[key] <= 100.0, (key, report[key])
    assert 0.0 <= report["synthetic_fidelity"] <= 1.0
    # per dataset beside the pooled figure, with the judge's own accuracy on real records
    # (smoke runs digits only, so its worst cell is at most the pooled worst variant)
    assert 0.0 <= report["synthetic_fidelity_digits"] <= report["synthetic_fidelity"] + 1e-9
    assert 0.5 < report["classifier_real_accuracy_digits"] <= 1.0
    assert report["memorisation_ratio"] > 0
    assert 0.0 < report["refine_seconds_per_round"] < 60.0
    details = report["details"]
    assert set(details["by_mode"]) == {"none", "masking", "ckks"}
    for mode, variant in INVERSION_BY_MODE.items():
        entry = details["by_mode"][mode]
        assert entry["variant"] == variant
        assert math.isfinite(entry["gain_noniid_points"]) and math.isfinite(
            entry["gain_iid_points"]
        )
    assert set(details["by_variant"]) == set(BASELINE)
    # every run of the matrix happened: 8 variants x 2 partitions x 1 seed on digits
    assert len(details["runs"]) == len(VARIANTS) * 2
    for name, row in details["runs"].items():
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert row["rounds_completed"] == details["plan"]["rounds"], name
        refined = VARIANTS[row["case"]["variant"]][1] is not None
        assert row["rounds_refined"] == (row["rounds_completed"] if refined else 0), name
        inverts = refined and "server_inversion" in (VARIANTS[row["case"]["variant"]][1] or {})
        assert (row["fidelity"] is not None) == inverts, name
        if inverts:
            # the fidelity's reference: the same classifier on real test records (digits)
            assert 0.8 <= row["classifier_test_accuracy"] <= 1.0, name
        assert len(row["memorisation_ratios"]) == (row["rounds_refined"] if inverts else 0), name
    # the worst case named for a gated key is the entry that holds its value
    where = details["worst_cases"]
    dataset = where["gain_noniid_points_inversion"]
    gains = details["by_dataset"][dataset]["gains"]["inversion"]["dirichlet0.1"]
    assert gains["gain_points"] == pytest.approx(report["gain_noniid_points_inversion"])
    assert gains["gain_points"] == pytest.approx(
        100 * (np.mean(gains["accuracy_by_seed"]) - np.mean(gains["baseline_accuracy_by_seed"]))
    )
    variant, dataset = where["gain_iid_points"].split("/")
    iid = details["by_dataset"][dataset]["gains"][variant]["iid"]["gain_points"]
    assert iid == pytest.approx(report["gain_iid_points"])
    assert report["gain_iid_points"] == pytest.approx(
        min(details["by_variant"][v]["gain_iid_points_worst"] for v in BASELINE)
    )
    ratios = [x for row in details["runs"].values() for x in row["memorisation_ratios"]]
    assert report["memorisation_ratio"] == pytest.approx(min(ratios))


def test_case_config_builds_each_variant() -> None:
    masking = case_config(Case("digits", "inversion_masking", "iid", 1, 10))
    assert masking.aggregation.protection == "masking" and masking.trust is not None
    assert masking.trust.defense == "vote" and masking.server.sampling.clients_per_round == 10
    # at least two sub-cohorts of min_cohort among the round's participants
    assert masking.server.sampling.clients_per_round // masking.aggregation.min_cohort >= 2
    assert masking.refine is not None and masking.refine.server_inversion is not None
    assert masking.refine.server_inversion.teacher == "cohorts" and masking.refine.shared is None
    base = case_config(Case("digits", "fedavg_masking", "iid", 1, 10))
    assert base.refine is None and base.trust is not None
    assert base.server.sampling.clients_per_round == 10
    ckks = case_config(Case("mnist1d", "inversion_ckks", "dirichlet0.1", 0, 10))
    assert ckks.aggregation.protection == "ckks" and ckks.refine is not None
    assert ckks.refine.server_inversion is not None
    assert ckks.refine.server_inversion.teacher == "aggregate"
    assert ckks.data.partition.kind == "dirichlet" and ckks.model.kind == "cnn"
    inversion = case_config(Case("digits", "inversion", "dirichlet0.1", 2, 10))
    assert inversion.refine is not None and inversion.refine.shared is None
    assert inversion.refine.client_inversion is not None and inversion.seed == 2
    assert inversion.evaluation.every == 10 and inversion.security.randomness == "seeded"
    assert case_config(Case("digits", "fedavg", "iid", 0, 10)).refine is None


def test_synthetic_fidelity_scores_real_like_samples_high_and_noise_low() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 3.0, size=(3, 8))
    train_y = np.repeat(np.arange(3), 50)
    train_x = centres[train_y] + rng.normal(0.0, 0.5, size=(150, 8))
    near_y = np.repeat(np.arange(3), 10)
    near = centres[near_y] + rng.normal(0.0, 0.5, size=(30, 8))
    assert synthetic_fidelity(near, near_y, train_x, train_y, seed=0) == pytest.approx(1.0)
    # the same samples against shifted target labels: every one is wrong
    shifted = (near_y + 1) % 3
    assert synthetic_fidelity(near, shifted, train_x, train_y, seed=0) == pytest.approx(0.0)


def test_refine_is_registered() -> None:
    from secfl.bench import available_benchmarks

    assert "inversion" in available_benchmarks()["refine"]
