"""Refinement: the guard, the inversion objective, the moments' DP charge and secure
aggregation, the memorisation check, and refinement state across kill-and-resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import secfl
from secfl.audit.events import read_events
from secfl.client.trainer import evaluate, train_locally
from secfl.config import ClientConfig, ModelConfig, RunConfig, config_from_dict
from secfl.data.datasets import Dataset
from secfl.data.federated import build_federated_data
from secfl.encode.flatten import flatten_parameters, load_parameters
from secfl.errors import ConfigError
from secfl.models import build_model
from secfl.randomness import Randomness
from secfl.refine.collect import STATS_ATTEMPT_OFFSET, ReleasedMoments
from secfl.refine.guard import teacher_source
from secfl.refine.inversion import InversionSettings, invert
from secfl.refine.memorisation import memorisation_check
from secfl.refine.moments import (
    COUNT_FRACTION,
    ActivationMoments,
    noised_moment_sum,
    record_moment_vectors,
)
from secfl.refine.tune import distill

from .conftest import small_config

FAST_INVERSION = {"per_class": 3, "steps": 30, "distill_steps": 10}


def _config(**raw: object) -> RunConfig:
    base = small_config().to_dict()
    for key, value in raw.items():
        base[key] = value
    return config_from_dict(base)


# ---------------------------------------------------------------------------- guard


@pytest.mark.parametrize(
    ("protection", "extra", "teacher", "allowed"),
    [
        ("none", {}, "clients", True),
        ("masking", {}, "clients", False),
        ("ckks", {}, "clients", False),
        ("masking", {}, "cohorts", False),
        ("none", {}, "cohorts", False),
        ("ckks", {}, "aggregate", True),
        ("masking", {"trust": {"defense": "vote"}}, "cohorts", True),
    ],
)
def test_guard_refuses_inverting_what_the_mode_hides(
    protection: str, extra: dict, teacher: str, allowed: bool
) -> None:
    raw = {
        "aggregation": {"protection": protection, "min_cohort": 2},
        "refine": {"server_inversion": {"teacher": teacher, "moments": None}},
        **extra,
    }
    if allowed:
        assert teacher_source(_config(**raw)) == teacher
    else:
        with pytest.raises(ConfigError, match=f"teacher='{teacher}' is refused"):
            _config(**raw)


@pytest.mark.parametrize(
    ("protection", "extra", "expected"),
    [
        ("none", {}, "clients"),
        ("masking", {}, "aggregate"),
        ("masking", {"trust": {"defense": "vote"}}, "cohorts"),
        ("ckks", {}, "aggregate"),
    ],
)
def test_auto_teacher_is_what_the_mode_shows(protection: str, extra: dict, expected: str) -> None:
    raw = {
        "aggregation": {"protection": protection, "min_cohort": 2},
        "refine": {"server_inversion": {"moments": None}},
        **extra,
    }
    assert teacher_source(_config(**raw)) == expected


def test_guard_refuses_client_models_under_user_level_dp_and_moments_it_cannot_account() -> None:
    user = {"user_level": {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-3}}
    with pytest.raises(ConfigError, match="would void that guarantee"):
        _config(
            privacy=user,
            refine={"server_inversion": {"teacher": "clients", "moments": None}},
        )
    # auto falls back to the DP release itself
    assert (
        teacher_source(_config(privacy=user, refine={"server_inversion": {"moments": None}}))
        == "aggregate"
    )
    with pytest.raises(ConfigError, match="user-level ledger does not cover"):
        _config(privacy=user, refine={"server_inversion": {}})
    sample = {"sample_level": {"noise_multiplier": 1.0}}
    with pytest.raises(ConfigError, match="noise_multiplier=0 releases exact statistics"):
        _config(privacy=sample, refine={"server_inversion": {"moments": {"noise_multiplier": 0}}})
    with pytest.raises(ConfigError, match="client_inversion is not available"):
        _config(privacy=sample, refine={"client_inversion": {}})


# ---------------------------------------------------------------------------- inversion


@pytest.fixture(scope="module")
def trained_digits() -> tuple[torch.nn.Module, Dataset, Dataset]:
    config = small_config()
    data = build_federated_data(config.data, Randomness("seeded", 0))
    pool = Dataset(
        "pool",
        np.concatenate([c.x for c in data.clients]),
        np.concatenate([c.y for c in data.clients]),
        data.num_classes,
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[32]), data.input_shape, data.num_classes)
    train_locally(
        model,
        pool,
        ClientConfig(epochs=5, lr=0.1, batch_size=32),
        Randomness("seeded", 0).stream("test.order"),
    )
    return model, pool, data.test


def _invert_digits(
    model: nn.Module,
    pool: Dataset,
    moments: ActivationMoments,
    settings: InversionSettings,
    moments_model: nn.Module | None = None,
):
    """Invert ``model`` into samples of every digit class from one fixed seeded stream."""
    return invert(
        [model],
        input_shape=pool.x.shape[1:],
        classes=range(10),
        settings=settings,
        stream=Randomness("seeded", 1).stream("test.inversion"),
        moments=moments,
        moments_model=moments_model,
    )


def test_inverted_samples_are_classified_as_their_target(trained_digits) -> None:
    model, pool, _ = trained_digits
    correct, _ = evaluate(model, pool)
    assert correct.mean() > 0.9
    moments = ActivationMoments.of_data(model, pool.x)
    synthetic = _invert_digits(model, pool, moments, InversionSettings(per_class=4, steps=150))
    assert synthetic.x.shape == (40, *pool.x.shape[1:]) and synthetic.x.dtype == np.float32
    assert list(np.bincount(synthetic.y)) == [4] * 10
    with torch.no_grad():
        predicted = model(torch.from_numpy(synthetic.x)).argmax(dim=1).numpy()
    assert (predicted == synthetic.y).mean() >= 0.95
    # the moment term pulls the synthetic inputs to the data's scale
    assert abs(float(synthetic.x.mean()) - float(pool.x.mean())) < 0.25


def test_input_spread_sets_the_synthetic_inputs_spread(trained_digits) -> None:
    model, pool, _ = trained_digits
    moments = ActivationMoments.of_data(model, pool.x)
    spread = {}
    for factor in (1.0, 1.5):
        synthetic = _invert_digits(
            model, pool, moments, InversionSettings(per_class=4, steps=150, input_spread=factor)
        )
        spread[factor] = float(np.linalg.norm(synthetic.x.std(axis=0)))
    target = float(np.linalg.norm(np.sqrt(moments.input_var)))
    assert abs(spread[1.0] / target - 1.0) < 0.15
    assert spread[1.5] / spread[1.0] > 1.3


def test_input_spread_default_widens_when_the_model_is_also_tuned_on_shared_records() -> None:
    from secfl.config import RefineServerInversionConfig

    default = RefineServerInversionConfig()
    assert InversionSettings.of(default).input_spread == 1.05
    assert InversionSettings.of(default, shared_tuning=True).input_spread == 1.2
    explicit = RefineServerInversionConfig(input_spread=1.0)
    assert InversionSettings.of(explicit, shared_tuning=True).input_spread == 1.0


def test_hidden_moments_are_matched_on_the_model_they_were_computed_under(trained_digits) -> None:
    """Moments released under an earlier broadcast describe that model's activations: matched
    on the teacher they pull its hidden features somewhere meaningless; matched on their own
    model (``moments_model``) the samples reproduce them."""
    model, pool, _ = trained_digits
    torch.manual_seed(5)
    earlier = build_model(ModelConfig(kind="mlp", hidden=[32]), pool.x.shape[1:], 10)
    moments = ActivationMoments.of_data(earlier, pool.x)

    def hidden_mismatch(probe_model: nn.Module | None) -> float:
        synthetic = _invert_digits(
            model,
            pool,
            moments,
            InversionSettings(per_class=4, steps=150),
            moments_model=probe_model,
        )
        got = ActivationMoments.of_data(earlier, synthetic.x)
        return float(np.linalg.norm(got.mean[1] - moments.mean[1]))

    on_own_model, on_teacher = hidden_mismatch(earlier), hidden_mismatch(None)
    assert on_own_model < 0.5 * on_teacher
    # the probed model is restored for training afterwards
    assert all(p.requires_grad for p in earlier.parameters())


def test_inversion_holds_features_outside_the_datas_support_at_their_mean(trained_digits) -> None:
    """Border pixels constant in the data stay constant in the synthetic samples, so client
    augmentation never trains the weights they feed (the trust module's dormant-unit rule
    would flag such updates as a backdoor's)."""
    model, pool, _ = trained_digits
    moments = ActivationMoments.of_data(model, pool.x)
    constant = np.sqrt(moments.input_var) <= 0.05 * np.median(np.sqrt(moments.input_var))
    assert 0 < constant.sum() < constant.size
    made = {}
    for floor in (0.05, 0.0):
        made[floor] = _invert_digits(
            model, pool, moments, InversionSettings(per_class=2, steps=60, support_floor=floor)
        ).x.reshape(20, -1)
    held = made[0.05][:, constant]
    np.testing.assert_array_equal(held, np.broadcast_to(moments.input_mean[constant], held.shape))
    # without the floor the optimiser does write into those pixels
    assert np.abs(made[0.0][:, constant] - moments.input_mean[constant]).max() > 1e-3


def test_sgd_distillation_moves_the_aggregate_only_as_far_as_the_teachers_disagree(
    trained_digits,
) -> None:
    """Teachers that agree with the aggregate (IID rounds) leave it nearly where it was under
    the default SGD; Adam's normalised steps would move every weight by about ``lr``."""
    model, pool, _ = trained_digits
    weights = flatten_parameters(model)
    moved = {}
    for name, spread in (("agree", 1e-4), ("disagree", 0.3)):
        teacher = build_model(ModelConfig(kind="mlp", hidden=[32]), pool.x.shape[1:], 10)
        noise = Randomness("seeded", 3).stream("test.teacher").normal(weights.size)
        load_parameters(teacher, (weights + spread * noise).astype(np.float32))
        for optimizer in ("sgd", "adam"):
            student = build_model(ModelConfig(kind="mlp", hidden=[32]), pool.x.shape[1:], 10)
            out = distill(
                student,
                weights,
                [teacher],
                pool.x[:128],
                steps=20,
                lr=0.05,
                batch_size=64,
                temperature=3.0,
                prox=0.01,
                stream=Randomness("seeded", 4).stream("test.distill"),
                optimizer=optimizer,
            )
            moved[name, optimizer] = float(np.linalg.norm(out - weights))
    assert moved["agree", "sgd"] < 0.01 * moved["agree", "adam"]
    assert moved["agree", "sgd"] < 0.01 * moved["disagree", "sgd"]
    with pytest.raises(ValueError, match="allowed: sgd, adam"):
        distill(
            model,
            weights,
            [model],
            pool.x[:8],
            steps=1,
            lr=0.05,
            batch_size=8,
            temperature=3.0,
            prox=0.0,
            stream=Randomness("seeded", 4).stream("test.distill"),
            optimizer="lbfgs",
        )


# ---------------------------------------------------------------------------- moments


def test_moment_release_is_clipped_and_carries_the_stated_noise(trained_digits) -> None:
    model, pool, _ = trained_digits
    rows, sizes = record_moment_vectors(model, pool.x[:50])
    assert rows.shape == (50, 2 * sum(sizes)) and sizes[0] == 64
    clip, sigma = 3.0, 2.0
    exact = noised_moment_sum(
        model, pool.x[:50], clip=clip, noise_multiplier=0.0, stream=_stream(0)
    )
    # each record's vector is its moments and the count coordinate, clipped as one
    full = np.concatenate([rows, np.full((50, 1), COUNT_FRACTION * clip)], axis=1)
    norms = np.linalg.norm(full, axis=1)
    assert (norms > clip).mean() > 0.5  # most records are clipped at this clip
    clipped = full * np.minimum(1.0, clip / norms)[:, None]
    np.testing.assert_allclose(exact, clipped.sum(axis=0), rtol=1e-6)
    draws = np.stack(
        [
            noised_moment_sum(
                model, pool.x[:50], clip=clip, noise_multiplier=sigma, stream=_stream(k)
            )
            - exact
            for k in range(1, 6)
        ]
    )
    std = float(draws.std())
    assert abs(std - sigma * clip) < 0.1 * sigma * clip


def test_released_moments_are_not_shrunk_by_clipping(trained_digits) -> None:
    """Dividing by the clipped count coordinate gives the clip-factor-weighted mean of the
    unscaled moments; dividing by the record count would shrink every moment by the mean
    clip factor (here by about half)."""
    model, pool, _ = trained_digits
    x = pool.x[:200]
    rows, sizes = record_moment_vectors(model, x)
    clip = 0.5 * float(np.median(np.linalg.norm(rows, axis=1)))
    total = noised_moment_sum(model, x, clip=clip, noise_multiplier=0.0, stream=_stream(0))
    released = ActivationMoments.from_release(total / 7.0, sizes, clip=clip)  # scale cancels
    assert released is not None
    norms = np.linalg.norm(
        np.concatenate([rows, np.full((200, 1), COUNT_FRACTION * clip)], axis=1), axis=1
    )
    f = np.minimum(1.0, clip / norms)
    weighted = ActivationMoments.from_mean_vector((rows * f[:, None]).sum(0) / f.sum(), sizes)
    exact = ActivationMoments.of_data(model, x)
    shrunk = ActivationMoments.from_mean_vector(total[:-1] / len(x), sizes)
    for layer in range(len(sizes)):
        np.testing.assert_allclose(released.mean[layer], weighted.mean[layer], rtol=1e-5)
        err = np.linalg.norm(released.mean[layer] - exact.mean[layer])
        shrunk_err = np.linalg.norm(shrunk.mean[layer] - exact.mean[layer])
        assert err < 0.5 * shrunk_err
    # a count the noise has driven to zero or below releases nothing
    total[-1] = -1.0
    assert ActivationMoments.from_release(total, sizes, clip=clip) is None
    with pytest.raises(ValueError, match="count coordinate"):
        ActivationMoments.from_release(total[:-1], sizes, clip=clip)


def _stream(k: int):
    return Randomness("seeded", k).stream("refine.moments_noise", party="client:0")


def _moment_run_config(protection: str, privacy: dict | None = None) -> RunConfig:
    raw = {
        "rounds": 1,
        "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "iid"}},
        "aggregation": {"protection": protection, "min_cohort": 2},
        "refine": {
            "server_inversion": {
                **FAST_INVERSION,
                "teacher": "aggregate",
                "moments": {"clip": 100.0, "noise_multiplier": 2.0 if privacy else 0.0},
            }
        },
    }
    if privacy:
        raw["privacy"] = privacy
    return _config(**raw)


def test_moments_are_securely_aggregated_under_masking(tmp_path: Path, monkeypatch) -> None:
    """The masked statistics round releases the population mean of the clients' moment
    vectors (clip large, no noise: equal up to SecAgg's quantisation)."""
    from secfl.refine import server as refine_server

    seen: list[ReleasedMoments] = []
    original = refine_server.ServerRefiner._invert

    def spy(self, inversion, teachers, round_index, attempt, moments, aggregate):
        seen.append(moments)
        return original(self, inversion, teachers, round_index, attempt, moments, aggregate)

    monkeypatch.setattr(refine_server.ServerRefiner, "_invert", spy)
    config = _moment_run_config("masking")
    secfl.run(config, tmp_path / "run")
    data = build_federated_data(config.data, Randomness("seeded", config.seed))
    model = build_model(config.model, data.input_shape, data.num_classes)
    from secfl.runner import initial_model

    model = initial_model(config, data, Randomness("seeded", config.seed))
    records = np.concatenate([c.x for c in data.clients])
    rows, _ = record_moment_vectors(model, records)
    assert np.linalg.norm(rows, axis=1).max() < 100.0  # nothing clipped
    exact = ActivationMoments.of_data(model, records)
    (released,) = seen
    assert released is not None
    for got, want in zip(released.moments.mean, exact.mean, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-2, rtol=1e-2)
    # the release names the model it describes: round 1's broadcast, the initial model
    assert released.round == 1
    np.testing.assert_array_equal(released.weights, flatten_parameters(model))
    events = read_events(tmp_path / "run" / "events.jsonl")
    collected = [e for e in events if e["event"] == "moments_collected"]
    assert len(collected) == 1 and collected[0]["attempt"] == STATS_ATTEMPT_OFFSET
    assert sorted(collected[0]["contributors"]) == [0, 1, 2, 3]


def test_moments_are_charged_to_each_clients_record_level_ledger(tmp_path: Path) -> None:
    privacy = {"sample_level": {"noise_multiplier": 1.0}}
    config = _moment_run_config("none", privacy)
    secfl.run(config, tmp_path / "run")
    import json

    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    text = json.dumps(ledger)
    # each client: its DP-SGD round plus one Gaussian release of sensitivity = moments.clip
    for client in range(4):
        assert f"client:{client}" in text
    charged = [
        e
        for e in _all_events(ledger)
        if e.get("attempt") == STATS_ATTEMPT_OFFSET and e.get("level") == "sample"
    ]
    assert sorted(e["party"] for e in charged) == [f"client:{c}" for c in range(4)]
    for event in charged:
        assert event["sensitivity"] == 100.0 and event["noise_multiplier"] == 2.0
        assert event["sampling_rate"] == 1.0 and event["amplification"] == "none"


def _all_events(node: object) -> list[dict]:
    found: list[dict] = []
    if isinstance(node, dict):
        if "mechanism" in node and "party" in node:
            found.append(node)
        for value in node.values():
            found += _all_events(value)
    elif isinstance(node, list):
        for value in node:
            found += _all_events(value)
    return found


# ---------------------------------------------------------------------------- memorisation


def test_memorisation_check_fires_on_copies_of_training_records() -> None:
    gen = np.random.default_rng(0)  # test data only, nothing secret
    train = gen.normal(size=(300, 1, 8, 8)).astype(np.float32)
    test = gen.normal(size=(100, 1, 8, 8)).astype(np.float32)
    copies = train[:50] + 0.01 * gen.normal(size=(50, 1, 8, 8)).astype(np.float32)
    leaked = memorisation_check(copies, train, test)
    assert leaked.regression and leaked.ratio < 0.1
    fresh = gen.normal(size=(50, 1, 8, 8)).astype(np.float32)
    fine = memorisation_check(fresh, train, test)
    assert not fine.regression and 0.8 < fine.ratio < 1.25
    far = memorisation_check(fresh * 3, train, test)
    assert far.ratio > 1.5


def test_a_run_reports_the_memorisation_check(tmp_path: Path) -> None:
    config = _config(
        rounds=1,
        refine={"server_inversion": {**FAST_INVERSION, "moments": None}, "shared": {"steps": 2}},
    )
    result = secfl.run(config, tmp_path / "run")
    row = result.history[-1]
    assert row["refine"]["memorisation"]["ratio"] > 0 and row["refine"]["seconds"] > 0
    events = read_events(tmp_path / "run" / "events.jsonl")
    (check,) = [e for e in events if e["event"] == "memorisation_check"]
    assert check["ratio"] == row["refine"]["memorisation"]["ratio"]
    (refined,) = [e for e in events if e["event"] == "refined"]
    # five client models plus the aggregate (round 1: no earlier global yet)
    assert refined["teacher"] == "clients" and refined["teachers"] == 6
    assert refined["synthetic"] == 30
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Refinement</h2>" in html and "synthetic samples per class" in html
    assert html.count("<rect") > 10 * 3 * 64  # 3 samples of 8x8 pixels per class


# ---------------------------------------------------------------------------- resume


def test_refinement_state_survives_kill_and_resume(tmp_path: Path) -> None:
    config = _config(
        rounds=3,
        refine={
            "server_inversion": {
                **FAST_INVERSION,
                "teacher": "aggregate",
                "history": 2,
                "moments": {"every": 3},
            },
            "client_inversion": {"per_class": 1, "steps": 5},
        },
    )
    whole = secfl.run(config, tmp_path / "whole")
    secfl.run(config, tmp_path / "cut", stop_after=1)
    resumed = secfl.run(config, tmp_path / "cut", resume=True)
    assert [r["accuracy"] for r in resumed.history] == [r["accuracy"] for r in whole.history]
    for a, b in zip(
        resumed.model.state_dict().values(), whole.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    # rounds 2 and 3 reuse round 1's released moments: they came back from the checkpoint
    events = read_events(tmp_path / "cut" / "events.jsonl")
    assert sum(e["event"] == "moments_collected" for e in events) == 1


# ---------------------------------------------------------------------------- examples


def test_masking_example_inverts_sub_cohort_models_and_refuses_client_models(
    tmp_path: Path,
) -> None:
    from secfl.config import load_config

    from .conftest import ROOT

    config = load_config(ROOT / "examples" / "digits_refine_masking.yaml")
    raw = config.to_dict()
    raw["refine"]["server_inversion"]["teacher"] = "clients"
    with pytest.raises(ConfigError, match="hides every client's update"):
        config_from_dict(raw)
    raw["refine"]["server_inversion"].update(teacher="cohorts", **FAST_INVERSION)
    raw["refine"]["client_inversion"].update(steps=5)
    raw.update(rounds=1)
    raw["model"]["hidden"] = [32]
    secfl.run(config_from_dict(raw), tmp_path / "run")
    events = read_events(tmp_path / "run" / "events.jsonl")
    (refined,) = [e for e in events if e["event"] == "refined"]
    assert refined["teacher"] == "cohorts" and refined["teachers"] >= 2
    (collected,) = [e for e in events if e["event"] == "moments_collected"]
    assert len(collected["contributors"]) == 10
