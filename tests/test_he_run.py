"""Mode ckks end to end through secfl.run: learning works, resume is exact when seeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from secfl.audit.events import read_events
from secfl.config import RunConfig, config_from_dict
from secfl.encode.flatten import flatten_parameters
from secfl.errors import ConfigError
from secfl.runner import run


def _config(**ckks: object) -> RunConfig:
    return config_from_dict(
        {
            "name": "ckks-test",
            "seed": 3,
            "rounds": 3,
            "security": {"randomness": "seeded"},
            "data": {"dataset": "digits", "num_clients": 5},
            "model": {"kind": "mlp", "hidden": [16]},
            "client": {"epochs": 1, "batch_size": 32},
            "evaluation": {"per_client": False},
            "aggregation": {"protection": "ckks", "min_cohort": 3, "ckks": dict(ckks)},
        }
    )


def test_kill_and_resume_is_exact_in_seeded_mode(tmp_path: Path) -> None:
    config = _config()
    whole = run(config, tmp_path / "whole")
    first = run(config, tmp_path / "resumed", stop_after=1)
    assert len(first.history) == 1
    resumed = run(config, tmp_path / "resumed", resume=True)
    a = flatten_parameters(whole.model)
    b = flatten_parameters(resumed.model)
    assert np.array_equal(a, b)
    assert [r["accuracy"] for r in whole.history] == [r["accuracy"] for r in resumed.history]
    # it learns what plaintext FedAvg learns: flooding noise (~1e-6) and clipping aside
    plain = run(config.with_overrides(**{"aggregation.protection": "none"}), tmp_path / "plain")
    assert abs(plain.history[-1]["accuracy"] - whole.history[-1]["accuracy"]) <= 0.02
    assert np.abs(flatten_parameters(plain.model) - a).max() < 1e-3
    events = read_events(tmp_path / "whole" / "events.jsonl")
    releases = [e for e in events if e["event"] == "ckks_release"]
    assert [e["round"] for e in releases] == [1, 2, 3]
    assert all(e["kind"] == "weighted_mean" and len(e["clients"]) == 5 for e in releases)
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert all("train_loss" not in r for r in metrics["rounds"])  # never seen by the server


def test_dominated_round_is_refused_and_logged(tmp_path: Path) -> None:
    config = _config(max_weight_share=0.05).with_overrides(rounds=1)
    result = run(config, tmp_path / "r")
    events = read_events(tmp_path / "r" / "events.jsonl")
    refusals = [e for e in events if e["event"] == "ckks_refusal"]
    assert refusals and "weight vector dominated" in refusals[0]["reason"]
    assert any(e["event"] == "round_skipped" for e in events)
    assert result.history[0]["survivors"] == 0


def test_unmeetable_precision_is_a_config_error(tmp_path: Path) -> None:
    config = _config(clip_range=0.1)
    with pytest.raises(ConfigError, match="cannot meet its precision"):
        run(config, tmp_path / "bad")


def test_bench_ckks_smoke_reports_the_gated_keys(tmp_path: Path) -> None:
    from secfl.bench import run_benchmark

    report = run_benchmark("ckks", out=tmp_path / "ckks.json", smoke=True)
    saved = json.loads((tmp_path / "ckks.json").read_text())
    for key in (
        "client_encrypt_speedup_vs_naive",
        "server_ratio_vs_naive",
        "expansion_vs_float32",
        "max_aggregate_error_over_C",
        "flooding_statistical_bits",
        "flooding_query_budget",
    ):
        assert saved[key] == report[key]
    assert report["expansion_vs_float32"] < 8  # complex packing, 93-bit data modulus
    assert report["by_preset"]["aggregation"]["naive_expansion_vs_float32"] > 12
    assert report["max_aggregate_error_over_C"] <= 1e-5
    assert report["flooding_statistical_bits"] >= 40
    assert "128-bit" in report["by_preset"]["trust"]["security_argument"]
