"""Distributed user-level DP: Skellam shares under masking, Gaussian shares under CKKS.

The statistical tests run a real federation (clients train with a negligible learning rate,
so the released mean is the noise alone) and compare the variance of the released noise with
the variance the ledger accounted, with and without dropouts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secfl.audit.events import read_events
from secfl.config import RunConfig, config_from_dict
from secfl.data import build_federated_data
from secfl.errors import ConfigError, PrivacyError
from secfl.privacy.distributed import DistributedNoise, user_level_mechanism
from secfl.randomness import Randomness
from secfl.runner import initial_model, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

D_HIDDEN = 64  # digits MLP [64]: 64*64 + 64 + 64*10 + 10 = 4810 coordinates


def _config(protection: str, **extra: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "dist-dp",
        "rounds": 1,
        "security": {"randomness": "seeded"},
        "data": {"dataset": "digits", "num_clients": 6},
        "model": {"kind": "mlp", "hidden": [D_HIDDEN]},
        # a negligible step: the released mean is the noise share sum alone
        "client": {"epochs": 1, "batch_size": 64, "lr": 1e-9, "momentum": 0.0},
        "server": {"optimizer": "fedavg", "sampling": {"kind": "fixed", "clients_per_round": 6}},
        "aggregation": {"protection": protection, "min_cohort": 3},
        "privacy": {
            "user_level": {"noise_multiplier": 0.7, "delta": 1e-2, "clip_norm": 0.5},
        },
    }
    if protection == "ckks":
        raw["aggregation"]["ckks"] = {"clip_range": 4.0}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(raw)


def _released_mean(config: RunConfig, result_model: Any) -> np.ndarray:
    randomness = Randomness("seeded", config.seed)
    data = build_federated_data(config.data, randomness)
    start = initial_model(config, data, randomness)
    before = np.concatenate([p.detach().numpy().ravel() for p in start.parameters()])
    after = np.concatenate([p.detach().numpy().ravel() for p in result_model.parameters()])
    return (after - before).astype(np.float64)


def _user_events(folder: Path) -> list[dict[str, Any]]:
    ledger = json.loads((folder / "ledger.json").read_text())
    return [e for row in ledger["rounds"] for e in row["user_level"]["events"]]


def _check_variance(noise: np.ndarray, expected_std: float) -> float:
    d = noise.size
    ratio = float(np.var(noise)) / expected_std**2
    # sample variance of d near-Gaussian values: relative std sqrt(2/d) ~ 2%; allow 5 sigma
    assert abs(ratio - 1) < 5 * math.sqrt(2 / d), ratio
    assert abs(float(noise.mean())) < 5 * expected_std / math.sqrt(d)
    return ratio


def _plan(**overrides: Any) -> DistributedNoise:
    fields: dict[str, Any] = {
        "kind": "skellam",
        "noise_multiplier": 2.0,
        "clip_norm": 1.0,
        "weighting": "uniform",
        "max_weight": 1.0,
        "weight_unit": 1.0,
        "colluding": 1,
        "expected_cohort": 10.0,
        "sampling_rate": 1.0,
        "amplification": "none",
        "model_size": 400,
        "resolution_bits": 12,
    }
    fields.update(overrides)
    return DistributedNoise(**fields)


def test_shares_cover_the_threshold_minus_colluders() -> None:
    plan = _plan()
    assert plan.sensitivity == 2048 + 20  # 2^(r-1) + sqrt(d)
    assert plan.l1_sensitivity == min(2048 * 20 + 400, plan.sensitivity**2)
    t = 5
    # t - T = 4 honest shares carry the target variance exactly
    assert 4 * plan.client_std(t) ** 2 == pytest.approx(plan.target_std**2)
    planned = plan.planned_event(3)
    assert planned.mechanism == "skellam" and planned.noise_multiplier == 2.0
    # 7 contributors, one colluding: 6 honest shares
    released = plan.released_event(7, t, round_index=3, attempt=0)
    assert released.noise_std == pytest.approx(math.sqrt(6) * plan.client_std(t))
    assert released.noise_multiplier > planned.noise_multiplier
    with pytest.raises(PrivacyError, match="below the threshold"):
        plan.released_event(4, t, round_index=3, attempt=0)
    with pytest.raises(PrivacyError, match="colluding_clients=1 leaves no honest share"):
        plan.client_std(1)
    # the weight is folded into the clipped value: norm <= C * w / w_max
    capped = _plan(weighting="capped", max_weight=4.0, weight_unit=10.0)
    value = capped.client_value(np.full(400, 3.0, dtype=np.float32), num_samples=20)
    assert float(np.linalg.norm(value)) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(PrivacyError, match="NaN"):
        plan.client_value(np.full(400, np.nan, dtype=np.float32), 1)


@pytest.mark.parametrize("dropouts", [False, True])
def test_skellam_noise_under_masking_matches_the_ledger(tmp_path: Path, dropouts: bool) -> None:
    extra: dict[str, Any] = {}
    if dropouts:
        extra["simulation"] = {"dropout_rate": 0.34, "dropout_stages": ["masked_input"]}
    config = _config("masking", **extra)
    result = run(config, tmp_path / "run")
    plan = user_level_mechanism(config, 64 * 64 + 64 + 64 * 10 + 10)
    assert isinstance(plan, DistributedNoise) and plan.kind == "skellam"
    (event,) = _user_events(tmp_path / "run")
    unmasked = [
        e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "secagg_unmasked"
    ]
    survivors = len(unmasked[0]["survivors"])
    assert (survivors < 6) == dropouts
    assert event["mechanism"] == "skellam"
    assert event["l1_sensitivity"] == pytest.approx(plan.l1_sensitivity)
    # the ledger's noise is the noise of the survivors' shares (no colluders configured)
    threshold = 3  # complete graph on 6: max(min_cohort 3, floor(5/2) + 1)
    assert event["noise_std"] == pytest.approx(math.sqrt(survivors) * plan.client_std(threshold))
    # released mean = integer noise sum / (2^(r-1)/C * expected cohort)
    noise = _released_mean(config, result.model) * plan.scale * plan.denominator
    _check_variance(noise, event["noise_std"])


def test_gaussian_shares_under_ckks_match_the_ledger(tmp_path: Path) -> None:
    config = _config(
        "ckks", simulation={"dropout_rate": 0.34, "dropout_stages": ["encrypted_input"]}
    )
    result = run(config, tmp_path / "run")
    plan = user_level_mechanism(config, 64 * 64 + 64 + 64 * 10 + 10)
    assert isinstance(plan, DistributedNoise) and plan.kind == "gaussian"
    (event,) = _user_events(tmp_path / "run")
    dropped = [
        e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "client_dropped"
    ]
    contributors = 6 - len(dropped)
    assert 3 <= contributors < 6
    assert event["mechanism"] == "subsampled_gaussian"
    assert event["noise_std"] == pytest.approx(math.sqrt(contributors) * plan.client_std(3))
    noise = _released_mean(config, result.model) * plan.denominator
    _check_variance(noise, event["noise_std"])


def test_colluders_are_not_counted_as_noise(tmp_path: Path) -> None:
    config = _config(
        "masking",
        privacy={
            "user_level": {
                "noise_multiplier": 0.7,
                "delta": 1e-2,
                "clip_norm": 0.5,
                "colluding_clients": 2,
            }
        },
    )
    run(config, tmp_path / "run")
    plan = user_level_mechanism(config, 4810)
    assert isinstance(plan, DistributedNoise)
    (event,) = _user_events(tmp_path / "run")
    # six shares in the sum, two of them known to the server: four count
    assert event["noise_std"] == pytest.approx(math.sqrt(4) * plan.client_std(3))
    assert plan.client_std(3) == pytest.approx(plan.target_std)  # t - T = 1
    from secfl.privacy.report import format_ledger, load_ledger

    text = format_ledger(load_ledger(tmp_path / "run"))
    assert "distributed skellam shares" in text and "up to 2 colluding" in text
    assert "accountant secfl_rdp" in text


def test_invalid_distributed_settings_fail_clearly(tmp_path: Path) -> None:
    base = {"noise_multiplier": 1.0, "delta": 1e-2}
    with pytest.raises(ConfigError, match="colluding_clients=3 must be below"):
        _config("masking", privacy={"user_level": {**base, "colluding_clients": 3}})
    with pytest.raises(ConfigError, match="applies to distributed noise"):
        _config("none", privacy={"user_level": {**base, "colluding_clients": 1}})
    small_range = _config(
        "ckks", aggregation={"protection": "ckks", "min_cohort": 3, "ckks": {"clip_range": 1.0}}
    )
    with pytest.raises(ConfigError, match=r"aggregation\.ckks\.clip_range=1\.0 is too small"):
        run(small_range, tmp_path / "bad")


def test_secure_examples_validate_and_the_readme_runs_the_secure_job() -> None:
    from secfl.config import load_config

    root = Path(__file__).resolve().parents[1]
    secure = load_config(root / "examples" / "digits_secure.yaml")
    assert secure.aggregation.protection == "masking"
    assert secure.privacy.sample_level is not None and secure.privacy.user_level is not None
    dp = load_config(root / "examples" / "digits_dp.yaml")
    for key in ("data", "model", "client", "server", "rounds", "seed"):
        assert getattr(secure, key) == getattr(dp, key), key
    assert secure.privacy.sample_level == dp.privacy.sample_level
    mnist = load_config(root / "examples" / "mnist1d_user_dp_secagg.yaml")
    assert mnist.data.num_clients == 1000 and mnist.aggregation.protection == "masking"
    assert mnist.server.sampling.fraction == 0.1 and mnist.privacy.user_level is not None
    readme = (root / "README.md").read_text()
    assert "secfl run examples/digits_secure.yaml" in readme.split("## A short tour")[0]


def test_bench_dp_smoke_reports_sample_and_user_level_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "dp.json"
    subprocess.run(
        [sys.executable, "-m", "secfl", "bench", "dp", "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["dp_step_ratio_vs_plain"] > 0
    for key in ("dp_acc_eps8_digits", "plain_acc_digits", "dp_acc_drop_eps8_digits"):
        assert 0 <= abs(report[key]) <= 100, key
    assert 0 <= report["dp_user_acc_eps10_mnist1d"] <= 1 and 0 <= report["plain_acc_mnist1d"] <= 1
    run_eps10 = report["details"]["user_level_mnist1d"]["runs"]["eps10"]
    assert run_eps10["accountant"] == "secfl_rdp"  # Skellam shares under masking
    assert 0 < run_eps10["epsilon_spent"] <= 10.0


def test_a_modulus_too_small_for_the_noise_fails_at_build_time(tmp_path: Path) -> None:
    config = _config(
        "masking",
        aggregation={"protection": "masking", "min_cohort": 3, "masking": {"bits": 20}},
        privacy={"user_level": {"noise_multiplier": 5.0, "delta": 1e-2, "clip_norm": 0.5}},
    )
    with pytest.raises(ConfigError, match=r"plus DP noise up to \d+ needs \d+ bits"):
        run(config, tmp_path / "run")
