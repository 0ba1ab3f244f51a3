"""Hardware tiers (issue 9): tiering rules, merging below ``min_cohort`` (property test over
random profiles), width variants' parameter counts, cross-tier transfer towards the other
tiers' ensemble, and runs through ``secfl.run`` (modes none and masking, merged tiers,
kill and resume)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfl.config import ModelConfig, RunConfig, TierTransferConfig, config_from_dict
from secfl.errors import ConfigError
from secfl.models import build_model
from secfl.randomness import Randomness
from secfl.runner import run
from secfl.strategies.tiers import (
    assign_tiers,
    cohort_size,
    ensemble_disagreement,
    merge_tiers,
    parameter_count,
    scaled_model_config,
    transfer_between_tiers,
)

from .strategies_helpers import (
    assert_same_models,
    check_defended_round,
    history_rows,
    record_rounds,
)

# ---------------------------------------------------------------------------- tiering


def test_quantile_rule_gives_equal_counts_and_thresholds_cut_scores() -> None:
    score = np.arange(60, dtype=np.float64)[::-1]
    tier_of = assign_tiers(score, rule="quantiles", cuts=None, tiers=3)
    assert np.bincount(tier_of).tolist() == [20, 20, 20]
    assert np.all(tier_of[score >= 40] == 2) and np.all(tier_of[score < 20] == 0)
    cut = assign_tiers(np.array([-1.0, 0.0, 0.5, 2.0]), rule="thresholds", cuts=[0.0, 1.0], tiers=3)
    assert cut.tolist() == [0, 1, 1, 2]
    with pytest.raises(ConfigError):
        assign_tiers(score, rule="thresholds", cuts=None, tiers=3)


def test_small_tier_merges_into_lower_neighbour_and_takes_its_model() -> None:
    tier_of = np.array([0] * 5 + [1] * 6 + [2] * 2)
    tiers = merge_tiers(tier_of, tiers=3, min_cohort=3)
    assert [(t.variant, t.merged, len(t.members)) for t in tiers] == [(0, (0,), 5), (1, (1, 2), 8)]
    # the lowest tier has no lower neighbour: it merges upwards and keeps its small model
    tiers = merge_tiers(np.array([0] * 2 + [1] * 6), tiers=2, min_cohort=3)
    assert [(t.variant, t.merged) for t in tiers] == [(0, (0, 1))]
    with pytest.raises(ConfigError, match="min_cohort"):
        merge_tiers(np.array([0, 1]), tiers=2, min_cohort=3)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 80),
    tiers=st.integers(1, 5),
    min_cohort=st.integers(1, 12),
    rule=st.sampled_from(["quantiles", "thresholds"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_merging_keeps_every_cohort_at_min_cohort(
    n: int, tiers: int, min_cohort: int, rule: str, seed: int
) -> None:
    """Whatever the profiles and cut points: every tier that runs has >= min_cohort
    members, the tiers partition the clients, each trains a model no wider than any of its
    members' own tier's (every member can train it), and the cohort drawn each round from
    a tier's available members is 0 or >= min_cohort."""
    rng = np.random.default_rng(seed)  # test data only, nothing secret
    score = rng.normal(size=n) * rng.uniform(0.1, 3)
    cuts = np.sort(rng.uniform(0.01, 0.99, size=tiers - 1))
    if rule == "thresholds":
        cuts = np.sort(rng.normal(size=tiers - 1))
    cut_list = [float(c) for c in cuts] if len(set(cuts.tolist())) == tiers - 1 else None
    if rule == "thresholds" and cut_list is None and tiers > 1:
        return
    tier_of = assign_tiers(score, rule=rule, cuts=cut_list, tiers=tiers)
    if n < min_cohort:
        with pytest.raises(ConfigError):
            merge_tiers(tier_of, tiers=tiers, min_cohort=min_cohort)
        return
    result = merge_tiers(tier_of, tiers=tiers, min_cohort=min_cohort)
    members = [m for t in result for m in t.members]
    assert sorted(members) == list(range(n))
    variants = [t.variant for t in result]
    assert variants == sorted(set(variants))
    for t in result:
        assert len(t.members) >= min_cohort
        assert all(t.variant <= tier_of[m] for m in t.members)
        assert t.variant in t.merged
        available = int(rng.integers(0, len(t.members) + 1))
        size = cohort_size(available, fraction=float(rng.uniform(0.01, 1)), min_cohort=min_cohort)
        assert size == 0 or min_cohort <= size <= available


# ---------------------------------------------------------------------------- widths


def test_width_multipliers_give_expected_parameter_counts() -> None:
    mlp = ModelConfig(kind="mlp", hidden=[64, 32])
    for width, (h1, h2) in ((0.25, (16, 8)), (0.5, (32, 16)), (1.0, (64, 32))):
        model = build_model(scaled_model_config(mlp, width), (40,), 10)
        assert parameter_count(model) == 40 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10
    cnn = ModelConfig(kind="cnn", channels=[32, 32], hidden=[64], groups=4)
    for width, (c, h) in ((0.25, (8, 16)), (0.5, (16, 32)), (1.0, (32, 64))):
        model = build_model(scaled_model_config(cnn, width), (1, 40), 10)
        conv = (1 * c * 5 + c) + 2 * c + (c * c * 5 + c) + 2 * c  # convs (kernel 5), GroupNorm
        head = (c * 10) * h + h + h * 10 + 10  # 40 -> 20 -> 10 positions after two pools
        assert parameter_count(model) == conv + head, width
    assert scaled_model_config(mlp, 0.001).hidden == [1, 1]  # never a zero-width layer
    assert scaled_model_config(mlp, 1.0) == mlp  # width 1 is the run's model


# ---------------------------------------------------------------------------- transfer


def test_transfer_moves_predictions_towards_the_other_tiers_ensemble() -> None:
    import torch

    torch.manual_seed(0)  # test fixture weights only
    config = ModelConfig(kind="mlp", hidden=[32])
    widths = (0.25, 0.5, 1.0)
    teachers = [build_model(scaled_model_config(config, w), (20,), 5) for w in widths]
    students = [build_model(scaled_model_config(config, w), (20,), 5) for w in widths]
    from secfl.encode.flatten import flatten_parameters, load_parameters

    weights = [flatten_parameters(t) for t in teachers]
    x = np.random.default_rng(1).normal(size=(200, 20)).astype(np.float32)
    randomness = Randomness("seeded", 0)
    settings_ = TierTransferConfig(steps=60, lr=0.1, temperature=1.0, prox=0.0, batch_size=50)
    before = [
        ensemble_disagreement(
            teachers[i], [teachers[j] for j in range(3) if j != i], x, temperature=1.0
        )
        for i in range(3)
    ]
    new = transfer_between_tiers(
        students,
        teachers,
        weights,
        x,
        settings=settings_,
        streams=[randomness.stream("test.transfer", party=str(i)) for i in range(3)],
        learners=[0, 2],
    )
    assert np.array_equal(new[1], weights[1])  # not a learner: unchanged
    for i in (0, 2):
        load_parameters(students[i], new[i])
        others = [teachers[j] for j in range(3) if j != i]
        after = ensemble_disagreement(students[i], others, x, temperature=1.0)
        assert after < 0.5 * before[i], (i, before[i], after)
    # a strong proximal term keeps the model at its aggregate: the transfer then moves less
    held = transfer_between_tiers(
        students,
        teachers,
        weights,
        x,
        settings=settings_.model_copy(update={"prox": 5.0}),
        streams=[randomness.stream("test.transfer", party=str(i)) for i in range(3)],
        learners=[0],
    )
    assert np.linalg.norm(held[0] - weights[0]) < 0.5 * np.linalg.norm(new[0] - weights[0])


# ---------------------------------------------------------------------------- runs


def _tiny(protection: str = "none", **strategy: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "tiers-test",
        "seed": 0,
        "rounds": 2,
        "security": {"randomness": "seeded"},
        "data": {
            "dataset": "mnist1d",
            "num_samples": 400,
            "num_clients": 12,
            "partition": {"kind": "iid"},
            "shared": {"per_class": 2},
        },
        "model": {"kind": "cnn", "channels": [8, 8], "hidden": [16]},
        "client": {"lr": 0.05, "epochs": 1, "batch_size": 8},
        "server": {
            "strategy": {
                "kind": "tiers",
                "devices": {"count": 12, "availability": 1.0},
                "cuts": [0.1, 0.55],  # about 1, 6 and 5 clients: the small tier merges
                "transfer": {"steps": 3, "batch_size": 8, "start_round": 1},
                **strategy,
            }
        },
        "aggregation": {"protection": protection, "min_cohort": 3},
        "evaluation": {"every": 1, "per_client": False},
    }
    return config_from_dict(raw)


def _quiet_run(config: RunConfig, out: Path, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(config, out, **kwargs)


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open()]


@pytest.mark.parametrize("protection", ["none", "masking", "ckks"])
def test_smoke_run_merges_and_keeps_cohorts(tmp_path: Path, protection: str) -> None:
    out = tmp_path / protection
    result = _quiet_run(_tiny(protection), out)
    started = next(e for e in _events(out / "events.jsonl") if e["event"] == "tiers_started")
    assert started["tiers"]["small"]["merged"] == ["small", "medium"]
    assert set(started["tiers"]) == {"small", "large"}
    assert sum(len(t["members"]) for t in started["tiers"].values()) == 12
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row["tasks"]) == {"small", "large"}
        for tier in row["tasks"].values():
            assert tier["survivors"] >= 3 and math.isfinite(tier["accuracy"])
            assert tier["transfer_kl_after"] <= tier["transfer_kl_before"]
    for name, tier in started["tiers"].items():
        members = set(tier["members"])
        for e in _events(out / "tasks" / name / "events.jsonl"):
            if e["event"] == "round_started":
                assert len(e["participants"]) >= 3 and set(e["participants"]) <= members
    transfers = [e for e in _events(out / "events.jsonl") if e["event"] == "tiers_transfer"]
    assert [e["round"] for e in transfers] == [1, 2]
    assert "Test accuracy per task" in (out / "report.html").read_text()
    assert result.models is not None and set(result.models) == {"small", "large"}


def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    config = _tiny(fraction=0.5)
    whole = _quiet_run(config, tmp_path / "whole")
    _quiet_run(config, tmp_path / "cut", stop_after=1)
    resumed = _quiet_run(config, tmp_path / "cut", resume=True)

    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert strip(resumed.history) == strip(whole.history)
    for name, model in whole.models.items():
        for a, b in zip(
            model.state_dict().values(), resumed.models[name].state_dict().values(), strict=True
        ):
            assert np.array_equal(a.numpy(), b.numpy())


def test_unsupported_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        _quiet_run(_tiny().with_overrides(**{"data.num_clients": 13}), tmp_path / "a")
    with pytest.raises(ConfigError, match="shared"):
        _quiet_run(_tiny().with_overrides(**{"data.shared.per_class": 0}), tmp_path / "b")
    with pytest.raises(ConfigError, match="min_cohort"):
        _quiet_run(_tiny().with_overrides(**{"aggregation.min_cohort": 13}), tmp_path / "c")


def test_bench_smoke_tier_keys() -> None:
    from secfl.bench.tiers import GOALS, measure_tiers

    figures = measure_tiers(quick=False, smoke=True, workers=1)
    for key in GOALS:
        assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
    tails = figures["details"]["accuracy_tail_mean"]
    assert set(tails["transfer"]) == {"small", "medium", "large"}
    assert set(tails["single_small"]) == {"small"}
    gain = 100 * (tails["transfer"]["small"][0] - tails["no_transfer"]["small"][0])
    assert figures["tier_transfer_gain_points"] == pytest.approx(gain)


def test_transfer_on_shared_and_synthetic_inputs(tmp_path: Path) -> None:
    """``source: both`` distils on the shared records plus inputs inverted from the tiers'
    models (10 classes x synthetic_per_class)."""
    transfer = {
        "steps": 2,
        "batch_size": 8,
        "start_round": 1,
        "source": "both",
        "synthetic_per_class": 2,
        "synthetic_steps": 3,
    }
    out = tmp_path / "both"
    _quiet_run(_tiny(transfer=transfer).with_overrides(rounds=1), out)
    (event,) = [e for e in _events(out / "events.jsonl") if e["event"] == "tiers_transfer"]
    assert event["inputs"] == 10 * 2 + 10 * 2  # shared per_class 2, synthetic 2 per class
    assert set(event["learners"]) == {"small", "large"}


def test_sample_level_dp_is_accounted_per_tier(tmp_path: Path) -> None:
    """With DP-SGD every tier keeps its own ledger: exactly the clients that trained in a
    tier are charged there (the transfer, on public inputs, charges nothing)."""
    dp = {"sample_level": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.5}}
    out = tmp_path / "dp"
    _quiet_run(_tiny().with_overrides(rounds=1, privacy=dp), out)
    for name in ("small", "large"):
        trained = {
            str(c)
            for e in _events(out / "tasks" / name / "events.jsonl")
            if e["event"] == "round_started"
            for c in e["participants"]
        }
        ledger = json.loads((out / "tasks" / name / "ledger.json").read_text())
        charged = {c for c, v in ledger["cumulative"]["clients"].items() if v["epsilon"] > 0}
        assert trained and charged == trained, name


# ---------------------------------------------------------------------------- trust per tier


def _trust_config(protection: str = "none", trust: dict[str, Any] | None = None) -> RunConfig:
    """The tiny tiers (small, merged: 7 members; large: 5), every member every round, two
    sign-flippers (scale -5), transfer on from round 1."""
    raw = _tiny(protection, fraction=1.0).to_dict()
    raw["trust"] = trust if trust is not None else {"defense": "vote"}
    raw["adversary"] = {"attack": "sign_flip", "count": 2}
    return config_from_dict(raw)


def _of(path: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in _events(path) if e["event"] == kind]


def test_trust_flags_each_tiers_attackers_and_keeps_them_out_of_its_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies, outcomes = record_rounds(monkeypatch)
    out = tmp_path / "r"
    _quiet_run(_trust_config("none"), out)
    (selected,) = _of(out / "events.jsonl", "adversary_selected")
    attackers = set(selected["clients"])
    (started,) = _of(out / "events.jsonl", "tiers_started")
    assert len(attackers) == 2
    checked = 0
    for name, tier in started["tiers"].items():
        log = out / "tasks" / name / "events.jsonl"
        # one adversary for the run: every tier's log names the same malicious clients
        assert {c for e in _of(log, "adversary_selected") for c in e["clients"]} == attackers
        assert len(outcomes[name]) == 2
        for outcome in outcomes[name]:
            cohort = sorted(outcome.participants)
            assert cohort == sorted(tier["members"])  # fraction 1: the tier's round cohort
            # (the released mean is the one before the transfer)
            _, flagged = check_defended_round(
                outcome, cohort, log.parent, attackers, replies[name], flags_change_the_mean=False
            )
            checked += bool(flagged)
    assert checked >= 2  # the attackers' tiers flagged them in both rounds
    # the transfer still ran between the defended tiers
    assert [e["round"] for e in _of(out / "events.jsonl", "tiers_transfer")] == [1, 2]


def test_kill_and_resume_with_trust_is_bit_identical(tmp_path: Path) -> None:
    """Centered clipping keeps a centre per tier (checkpoint arrays NAME.trust.center)
    beside the per-client reputations shared by the tiers."""
    from secfl.record.checkpoint import read_checkpoint

    config = _trust_config("none", trust={"defense": "centered_clipping"}).with_overrides(rounds=3)
    whole = _quiet_run(config, tmp_path / "whole")
    _quiet_run(config, tmp_path / "cut", stop_after=1)
    resumed = _quiet_run(config, tmp_path / "cut", resume=True)
    assert history_rows(resumed.history) == history_rows(whole.history)
    assert_same_models(whole, resumed, whole.models)
    saved = read_checkpoint(tmp_path / "cut", expected_fingerprint=config.fingerprint())
    assert {k for k in saved.arrays if ".trust." in k} == {
        "small.trust.center",
        "large.trust.center",
    }
    assert saved.state["trust"]["defense"] == "centered_clipping"


def test_trust_refusals(tmp_path: Path) -> None:
    from secfl.strategies.tiers_run import check_tiers_config

    raw = _trust_config().to_dict()
    raw["refine"] = {"shared": {}}
    with pytest.raises(
        ConfigError, match=r"'tiers' does not support \['refine'\].*allowed.*trust, adversary"
    ):
        check_tiers_config(config_from_dict(raw))
    # trust does not lift the user-level refusal (its noise plans for a fixed cohort)
    user = {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-3}
    with pytest.raises(ConfigError, match=r"\['privacy.user_level'\]"):
        check_tiers_config(_trust_config().with_overrides(**{"privacy.user_level": user}))
    with pytest.raises(ConfigError, match="allowed: vote"):
        _trust_config("masking", trust={"defense": "median"})
    with pytest.raises(ConfigError, match="shared"):
        _quiet_run(
            _trust_config().with_overrides(
                **{"data.shared.per_class": 0, "server.strategy.transfer": None}
            ),
            tmp_path / "noshared",
        )


def test_tiers_trust_example_validates() -> None:
    from secfl.config import load_config
    from secfl.strategies.tiers_run import check_tiers_config, tier_layout

    root = Path(__file__).resolve().parent.parent / "examples"
    example = load_config(root / "digits_tiers_trust.yaml")
    strategy = check_tiers_config(example)
    assert example.trust is not None and example.adversary is not None
    assert example.aggregation.protection == "masking"
    # two tiers of 15, every member every round: three sub-cohorts of 5 per tier
    _, tiers = tier_layout(example, strategy, Randomness("seeded", example.seed))
    assert sorted(len(t.members) for t in tiers) == [15, 15]
