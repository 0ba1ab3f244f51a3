"""The attack-evaluation suite: exact analytic inversion, DP-audit bounds with power, the
membership statistics, SecAgg integrity probes, and the suite end to end on both examples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from secfl.attack_suite import dp_audit
from secfl.attack_suite.inversion import invert_analytic, psnr
from secfl.attack_suite.membership import roc_auc, tpr_at_fpr
from secfl.attack_suite.suite import SuiteSettings, run_attack_suite
from secfl.config import load_config
from secfl.data.federated import build_federated_data
from secfl.encode.flatten import flatten_parameters
from secfl.models import build_model
from secfl.randomness import Randomness

ROOT = Path(__file__).resolve().parents[1]
HBC = ROOT / "threat_models" / "honest_but_curious_server.yaml"
TINY = SuiteSettings(
    fedsgd1_repetitions=2,
    fedsgd8_repetitions=1,
    fedavg_repetitions=1,
    optimisation_iterations=20,
    optimisation_targets=1,
    record_canaries=4000,
    record_repetitions=2,
    client_trials=4000,
    black_box_canaries=32,
    black_box_rounds=2,
    shadows=2,
    shadow_epochs=3,
    poisoning_attacks=("sign_flip",),
    rounds=3,
)


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return np.concatenate([p.grad.reshape(-1).numpy() for p in model.parameters()])  # type: ignore[union-attr]


@pytest.mark.parametrize("hidden", [[32], []])
def test_analytic_inversion_recovers_one_record_exactly(hidden: list[int]) -> None:
    from secfl.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=hidden), (1, 8, 8), 10)
    x = torch.rand(1, 1, 8, 8)
    update = -0.05 * _gradient(model, x, torch.tensor([3]))  # a one-step SGD update
    candidates = invert_analytic(model, update)
    assert len(candidates) > 0
    errors = np.abs(candidates - x.reshape(1, -1).numpy()).max(axis=1)
    assert errors.min() < 1e-5
    assert psnr(candidates[errors.argmin()], x.reshape(-1).numpy(), 1.0) > 90


def test_analytic_inversion_of_a_batch_mixes_records() -> None:
    """A logistic regression's rows mix the batch: no record comes out exactly."""
    from secfl.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[]), (1, 8, 8), 10)
    x = torch.rand(8, 1, 8, 8)
    update = -_gradient(model, x, torch.zeros(8, dtype=torch.long))
    candidates = invert_analytic(model, update)
    truth = x.reshape(8, -1).numpy()
    best = max(psnr(c, t, 1.0) for c in candidates for t in truth)
    assert best < 40


def test_clopper_pearson_known_answers() -> None:
    # zero errors of n: the upper bound is 1 - alpha^(1/n)
    assert dp_audit.clopper_pearson_upper(0, 100, 0.005) == pytest.approx(1 - 0.005**0.01)
    assert dp_audit.clopper_pearson_upper(100, 100, 0.005) == 1.0
    assert dp_audit.clopper_pearson_upper(10, 100, 0.005) > 0.1


def test_epsilon_lower_bound_of_a_gaussian_mechanism_stays_below_its_epsilon() -> None:
    """mu-GDP with mu = 2: epsilon(delta=1e-5) is about 8.1; the bound must stay below and
    still show power."""
    rng = np.random.default_rng(1)
    member = rng.random(40000) < 0.5
    scores = rng.normal(size=member.size) + 2.0 * member
    result = dp_audit.epsilon_lower_bound(
        scores, member, delta=1e-5, order=rng.permutation(member.size)
    )
    assert 1.5 < result.epsilon_lb < 8.1
    # no signal, no bound
    flat = dp_audit.epsilon_lower_bound(
        rng.normal(size=member.size), member, delta=1e-5, order=rng.permutation(member.size)
    )
    assert flat.epsilon_lb < 0.2


def test_white_box_record_audit_below_ledger_epsilon_with_power_on_dp() -> None:
    config = load_config(ROOT / "examples" / "digits_secure.yaml").with_overrides(rounds=4)
    from secfl.privacy.accountants import epsilon as ledger_epsilon
    from secfl.privacy.federation import sample_level_settings

    settings = sample_level_settings(config)
    events = [settings.round_event(round_index=r, party="client:0", attempt=0) for r in range(4)]
    epsilon = ledger_epsilon("opacus_prv", events, 1e-5)
    assert 7.5 < epsilon <= 8.0  # the calibrated target
    randomness = Randomness("seeded", 0)
    scores, member = dp_audit.record_canary_scores(config, randomness, canaries=4000, repetitions=3)
    order = randomness.stream("order").permutation(len(scores))
    result = dp_audit.epsilon_lower_bound(scores, member, delta=1e-5, order=order)
    assert result.epsilon_lb <= epsilon
    assert result.epsilon_lb >= 0.3 * epsilon


def test_white_box_record_audit_shows_no_dp_without_dp() -> None:
    config = load_config(ROOT / "examples" / "digits.yaml")
    randomness = Randomness("seeded", 0)
    scores, member = dp_audit.record_canary_scores(
        config, randomness, canaries=4000, repetitions=1, rounds=1
    )
    order = randomness.stream("order").permutation(len(scores))
    result = dp_audit.epsilon_lower_bound(scores, member, delta=1e-5, order=order)
    assert result.fpr == 0.0 and result.fnr == 0.0  # planted canaries separate perfectly
    assert result.epsilon_lb >= 1.0
    assert result.epsilon_lb == pytest.approx(result.max_certifiable)


def test_membership_statistics_known_answers() -> None:
    member = np.array([True, True, False, False])
    assert roc_auc(np.array([3.0, 2.0, 1.0, 0.0]), member) == 1.0
    assert roc_auc(np.array([0.0, 1.0, 2.0, 3.0]), member) == 0.0
    assert roc_auc(np.array([1.0, 1.0, 1.0, 1.0]), member) == 0.5
    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.5
    assert tpr_at_fpr(np.where(labels, 1.0, 0.0), labels) == 1.0
    assert tpr_at_fpr(rng.random(2000), labels) < 0.04


def test_secagg_integrity_probes_detect_every_deviation(tmp_path: Path) -> None:
    from secfl.attack_suite.integrity import integrity_probes

    config = load_config(ROOT / "examples" / "digits_secagg.yaml")
    data = build_federated_data(config.data, Randomness("seeded", config.seed))
    found = integrity_probes(config, data, folder=tmp_path, records=2)
    details = found["details"]
    assert details["control_revealed"] is True  # type: ignore[index]
    assert details["below_threshold"]["at_threshold_revealed"] is True  # type: ignore[index]
    assert found["metrics"] == {
        "secagg.model_inconsistency_detected": 1.0,
        "secagg.below_threshold_refused": 1.0,
        "secagg.key_substitution_detected": 1.0,
    }


def _checks(document: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {c["metric"]: c for c in document["checks"]}


def test_suite_finds_leaks_in_plaintext_mode_without_dp(tmp_path: Path) -> None:
    document = run_attack_suite(HBC, ROOT / "examples" / "digits.yaml", tmp_path, settings=TINY)
    checks = _checks(document)
    for metric in (
        "inversion.share_above_20db",
        "inversion.median_psnr_gain_db",
        "dp_audit.record.white_box_epsilon_lb",
        "dp_audit.client.white_box_epsilon_lb",
    ):
        assert not checks[metric]["passed"], metric
    assert checks["inversion.share_above_20db"]["value"] == 1.0  # FedSGD batch 1: exact
    assert checks["audit_power.record"]["passed"] and checks["audit_power.client"]["passed"]
    assert not document["passed"]
    stored = json.loads((tmp_path / "attack_report.json").read_text())
    assert {"name", "metric", "value", "op", "threshold", "passed"} <= set(stored["checks"][0])
    page = (tmp_path / "attack_report.html").read_text()
    assert "<svg" in page and "FAIL" in page and "Reconstructions" in page


def test_suite_passes_every_check_on_masking_with_dp(tmp_path: Path) -> None:
    document = run_attack_suite(
        HBC, ROOT / "examples" / "digits_secure.yaml", tmp_path, settings=TINY
    )
    failed = [c for c in document["checks"] if not c["passed"]]
    assert not failed, failed
    assert len(document["checks"]) == 9
    epsilon = document["epsilons"]["sample_level"]["epsilon"]
    lb = _checks(document)["dp_audit.record.white_box_epsilon_lb"]["value"]
    assert 0.3 * epsilon <= lb <= epsilon
    assert math.isfinite(document["epsilons"]["user_level"]["epsilon"])


def test_threat_model_must_cover_the_mode(tmp_path: Path) -> None:
    from secfl.errors import ConfigError

    source = HBC.read_text()
    narrow = tmp_path / "tm"
    narrow.mkdir()
    # keep only mode none: drop the other scopes and their reveals
    keep = source[: source.index("  - protection: ckks")] + source[source.index("reveals:") :]
    keep = keep[: keep.index("  ckks:")] + keep[keep.index("guarantees:") :]
    path = narrow / "honest_but_curious_server.yaml"
    path.write_text(keep)
    with pytest.raises(ConfigError, match="masking"):
        run_attack_suite(path, ROOT / "examples" / "digits_secure.yaml", tmp_path / "o")


def test_initial_weights_match_the_runner(tmp_path: Path) -> None:
    from secfl.attack_suite.observe import initial_weights
    from secfl.runner import initial_model

    config = load_config(ROOT / "examples" / "digits.yaml")
    randomness = Randomness("seeded", config.seed)
    data = build_federated_data(config.data, randomness)
    expected = flatten_parameters(initial_model(config, data, randomness))
    assert np.array_equal(initial_weights(config, data), expected)


def test_cli_runs_the_poisoning_subset_and_exits_by_the_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    from secfl.attack_suite import suite
    from secfl.cli import main

    monkeypatch.setattr(
        suite.SuiteSettings, "quick", classmethod(lambda cls: dataclasses.replace(TINY, rounds=2))
    )
    out = tmp_path / "report"
    code = main(
        [
            "attack",
            "--threat-model",
            str(ROOT / "threat_models" / "byzantine_clients.yaml"),
            str(ROOT / "examples" / "digits.yaml"),
            "--out",
            str(out),
            "--quick",
            "--no-progress",
        ]
    )
    document = json.loads((out / "attack_report.json").read_text())
    assert [c["metric"] for c in document["checks"]] == [
        "poisoning.worst_acc_drop",
        "poisoning.backdoor_asr",
    ]
    assert code == (0 if document["passed"] else 1)
    # plain FedAvg with 4 of 10 sign-flipping attackers: the accuracy collapses
    assert document["details"]["poisoning"]["attacks"]["sign_flip"]["drop_points"] > 5
    assert "poisoning.worst_acc_drop" in capsys.readouterr().out
    # a second run into the same directory is refused
    assert main(["attack", "--threat-model", str(HBC), str(ROOT / "examples" / "digits.yaml"),
                 "--out", str(out), "--quick"]) == 2  # fmt: skip
