"""Privacy in a run: central noise variance, fail-closed budgets, invalid settings, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secfl.audit.events import read_events
from secfl.config import RunConfig
from secfl.errors import ConfigError, PrivacyError
from secfl.privacy import CentralGaussianMechanism, epsilon
from secfl.privacy.events import DpEvent
from secfl.randomness import Randomness
from secfl.runner import run
from tests.conftest import small_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _dp_config(**privacy: Any) -> RunConfig:
    return small_config().with_overrides(privacy=privacy)


def test_central_noise_variance_matches_accounted_variance() -> None:
    mechanism = CentralGaussianMechanism(
        noise_multiplier=1.3,
        clip_norm=0.5,
        weighting="capped",
        max_weight=4.0,
        weight_unit=10.0,
        expected_cohort=5.0,
        sampling_rate=1.0,
        amplification="none",
    )
    stream = Randomness("seeded", 7).stream("test.central")
    d = 20_000
    updates = {i: np.zeros(d, dtype=np.float32) for i in range(5)}
    mean, event = mechanism.release_mean(
        updates, dict.fromkeys(range(5), 100), stream, round_index=1, attempt=0
    )
    assert event.sensitivity == pytest.approx(0.5 * 4.0)  # C * w_max
    accounted_std = event.noise_std / mechanism.denominator
    # sample variance of d Gaussians: relative std sqrt(2/d) ~ 1%; allow 5 sigma
    ratio = float(np.var(mean.astype(np.float64))) / accounted_std**2
    assert abs(ratio - 1) < 5 * np.sqrt(2 / d)
    assert abs(float(mean.mean())) < 5 * accounted_std / np.sqrt(d)
    # clipping: a huge update contributes at most C * w (norm), here with no noise check
    big = {0: np.full(4, 100.0, dtype=np.float32)}
    quiet = CentralGaussianMechanism(1e-9, 0.5, "uniform", 1.0, 1.0, 1.0, 1.0, "none")
    out, _ = quiet.release_mean(big, {0: 3}, stream, round_index=1, attempt=0)
    assert float(np.linalg.norm(out)) == pytest.approx(0.5, rel=1e-5)


def _user_event(sigma: float, r: int) -> DpEvent:
    return DpEvent("subsampled_gaussian", sigma, 1.0, 1, 1.0, "user", r, "server", 0, "none")


def test_budget_stops_exactly_before_the_round_that_would_exceed(tmp_path: Path) -> None:
    sigma = 3.0
    eps = [epsilon("dpa_pld", [_user_event(sigma, r) for r in range(k)], 1e-3) for k in (2, 3)]
    budget = (eps[0] + eps[1]) / 2  # two rounds fit, the third would exceed
    config = _dp_config(
        user_level={"noise_multiplier": sigma, "delta": 1e-3, "clip_norm": 1.0},
        budget={"global_epsilon": budget},
    ).with_overrides(rounds=5)
    result = run(config, tmp_path / "run")
    assert [h["round"] for h in result.history] == [1, 2]
    assert result.stopped is not None and "privacy.budget.global_epsilon" in result.stopped
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["cumulative"]["user_level"]["epsilon"] == pytest.approx(eps[0], rel=1e-9)
    assert ledger["cumulative"]["user_level"]["epsilon"] <= budget
    assert ledger["stopped"] == result.stopped
    events = read_events(tmp_path / "run" / "events.jsonl")
    stops = [e for e in events if e["event"] == "privacy_budget_exhausted"]
    assert len(stops) == 1 and stops[0]["round"] == 3
    assert sum(e["event"] == "dp_event" for e in events) == 2
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_client_with_spent_budget_does_not_train(tmp_path: Path) -> None:
    one_round = DpEvent("subsampled_gaussian", 1.5, 0.5, 2, 1.0, "sample", 1, "client:0")
    eps1 = epsilon("opacus_rdp", [one_round], 1e-5)
    eps2 = epsilon("opacus_rdp", [one_round, one_round], 1e-5)
    config = _dp_config(
        sample_level={"noise_multiplier": 1.5, "sample_rate": 0.5, "max_grad_norm": 1.0},
        accountant={"sample_level": "opacus_rdp"},
        budget={"client_epsilon": (eps1 + eps2) / 2},
    ).with_overrides(rounds=6, **{"server.sampling": {"kind": "fixed", "clients_per_round": 3}})
    result = run(config, tmp_path / "run")
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    per_client = ledger["cumulative"]["clients"]
    assert all(c["events"] <= 1 for c in per_client.values())
    assert all(c["epsilon"] <= (eps1 + eps2) / 2 for c in per_client.values())
    refused = [
        e
        for e in read_events(tmp_path / "run" / "events.jsonl")
        if e["event"] == "client_dropped" and "privacy.budget.client_epsilon" in e["reason"]
    ]
    assert refused, "a client over budget must refuse to train"
    assert result.stopped is not None and "every client" in result.stopped


def test_invalid_privacy_settings_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.sample_level\.target_epsilon.*greater than 0"):
        _dp_config(sample_level={"target_epsilon": 0.0})
    with pytest.raises(ConfigError, match=r"privacy\.user_level\.clip_norm.*greater than 0"):
        _dp_config(user_level={"noise_multiplier": 1.0, "delta": 1e-3, "clip_norm": -1.0})
    with pytest.raises(ConfigError, match=r"privacy\.user_level\.delta=0\.05 is too large"):
        _dp_config(user_level={"noise_multiplier": 1.0, "delta": 0.05})
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier or target_epsilon"):
        _dp_config(sample_level={"noise_multiplier": 1.0, "target_epsilon": 2.0})
    with pytest.raises(ConfigError, match="client_epsilon needs privacy.sample_level"):
        _dp_config(budget={"client_epsilon": 1.0})
    # sample-level delta is checked against each client's record count (about 250 here)
    config = _dp_config(sample_level={"noise_multiplier": 1.0, "delta": 1e-3})
    with pytest.raises(PrivacyError, match=r"privacy\.sample_level\.delta.*records"):
        run(config, tmp_path / "bad")


@pytest.mark.parametrize("protection", ["none", "masking"])
def test_kill_and_resume_gives_identical_ledger_and_metrics(
    tmp_path: Path, protection: str
) -> None:
    config = _dp_config(
        sample_level={"noise_multiplier": 1.2, "sample_rate": 0.25},
        user_level={"noise_multiplier": 0.05, "delta": 1e-3, "clip_norm": 5.0},
        accountant={"sample_level": "opacus_rdp", "user_level": "opacus_rdp"},
    ).with_overrides(rounds=4, **{"aggregation.protection": protection})
    whole = run(config, tmp_path / "whole")
    run(config, tmp_path / "split", stop_after=2)
    resumed = run(config, tmp_path / "split", resume=True)

    def strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in history]

    assert strip(resumed.history) == strip(whole.history)
    a = json.loads((tmp_path / "whole" / "ledger.json").read_text())
    b = json.loads((tmp_path / "split" / "ledger.json").read_text())
    assert a == b
    assert len(a["rounds"]) == 4
    assert a["cumulative"]["clients"]["0"]["events"] == 4
    assert a["cumulative"]["user_level"]["events"] == 4
