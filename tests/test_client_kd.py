"""Teacher and student on the client (client.distill) and gradient updates (update_kind)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import secfl
from secfl.client.app import ClientApp
from secfl.client.distill import (
    distillation_loss,
    record_distillation_loss,
    softened_kl,
    teacher_logits,
)
from secfl.client.trainer import evaluate, train_locally
from secfl.config import ClientConfig, DistillConfig, ServerConfig
from secfl.data.datasets import Dataset
from secfl.data.federated import build_federated_data
from secfl.encode.flatten import flatten_parameters, load_parameters, model_hash
from secfl.errors import ConfigError
from secfl.messages import FitIns
from secfl.privacy.dpsgd import PerSampleGradients, clip_and_sum
from secfl.randomness import Randomness
from secfl.runner import initial_model
from secfl.server.optimizers import make_server_optimizer

from .conftest import small_config


def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def _tiny_data(n: int = 40, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=n).astype(np.int64)
    return Dataset("tiny", x, y, 4)


def _final_weights(result: secfl.RunResult) -> np.ndarray:
    return flatten_parameters(result.model)


# ---------------------------------------------------------------------------- distillation


def test_alpha_zero_is_plain_training_bit_for_bit(tmp_path: Path) -> None:
    plain = secfl.run(small_config(rounds=2), tmp_path / "plain")
    kd = secfl.run(
        small_config(rounds=2, **{"client.distill": {"temperature": 3.0, "alpha": 0.0}}),
        tmp_path / "kd0",
    )
    assert np.array_equal(_final_weights(plain), _final_weights(kd))
    # and distillation with alpha > 0 does change the run (the option is wired in)
    kd5 = secfl.run(
        small_config(rounds=2, **{"client.distill": {"temperature": 3.0, "alpha": 0.5}}),
        tmp_path / "kd5",
    )
    assert not np.array_equal(_final_weights(plain), _final_weights(kd5))


def test_alpha_one_moves_the_student_towards_the_teacher() -> None:
    data = _tiny_data(64)
    teacher_model, student = _tiny_model(1), _tiny_model(2)
    x = torch.from_numpy(data.x)
    teacher = teacher_logits(teacher_model, x)
    before = softened_kl(student, teacher, x, temperature=2.0)
    config = ClientConfig(
        lr=0.1, epochs=5, batch_size=16, distill=DistillConfig(temperature=2.0, alpha=1.0)
    )
    stream = Randomness("seeded", 0).stream("client.batch_order", party="client:0")
    train_locally(student, data, config, stream, teacher=teacher)
    after = softened_kl(student, teacher, x, temperature=2.0)
    assert after < 0.5 * before, (before, after)


def test_teacher_is_a_frozen_copy() -> None:
    model = _tiny_model(3)
    weights = flatten_parameters(model)
    x = torch.from_numpy(_tiny_data(8).x)
    logits = teacher_logits(model, x)
    assert not logits.requires_grad
    assert torch.equal(logits, model(x).detach())
    assert all(p.requires_grad for p in model.parameters())
    assert np.array_equal(flatten_parameters(model), weights)


def test_distillation_loss_matches_its_definition() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    T, alpha = 2.5, 0.3
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1)
    ce = -torch.log_softmax(s, -1)[torch.arange(5), y]
    expected = (1 - alpha) * ce + alpha * T * T * kl
    got = distillation_loss(s, y, t, temperature=T, alpha=alpha, reduction="none")
    torch.testing.assert_close(got, expected)
    mean = distillation_loss(s, y, t, temperature=T, alpha=alpha)
    torch.testing.assert_close(mean, expected.mean())


@pytest.mark.parametrize("engine", ["layerwise", "torch.func"])
def test_dp_engines_clip_the_distillation_loss_per_record(engine: str) -> None:
    """Both per-sample engines clip the distillation objective's per-record gradients (the
    reference: autograd on each record alone, clipped and summed by hand)."""
    data = _tiny_data(12)
    model = _tiny_model(4)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    teacher = teacher_logits(_tiny_model(5), x)
    loss = record_distillation_loss(DistillConfig(temperature=2.0, alpha=0.7))
    got = PerSampleGradients(model, engine=engine, loss=loss).clipped_sum(  # type: ignore[arg-type]
        x, y, 0.5, teacher=teacher
    )
    per_sample: dict[str, list[torch.Tensor]] = {k: [] for k, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        loss(model(x[i : i + 1]), y[i : i + 1], teacher[i : i + 1]).sum().backward()
        for k, p in model.named_parameters():
            assert p.grad is not None
            per_sample[k].append(p.grad.clone())
    stacked = {k: torch.stack(v) for k, v in per_sample.items()}
    expected = clip_and_sum(stacked, 0.5)
    for k in expected:
        torch.testing.assert_close(got.grads[k], expected[k], atol=1e-6, rtol=1e-5)
    with pytest.raises(secfl.errors.PrivacyError, match="teacher"):
        PerSampleGradients(model, engine=engine, loss=loss).clipped_sum(x, y, 0.5)  # type: ignore[arg-type]


def test_dp_sgd_with_distillation_charges_the_same_event(tmp_path: Path) -> None:
    dp = {"privacy.sample_level": {"noise_multiplier": 1.0, "sample_rate": 0.5}}
    plain = secfl.run(small_config(rounds=1, **dp), tmp_path / "plain")
    kd = secfl.run(
        small_config(rounds=1, **dp, **{"client.distill": {"temperature": 2.0, "alpha": 0.5}}),
        tmp_path / "kd",
    )
    ledgers = [(r.out_dir / "ledger.json").read_text() for r in (plain, kd)]
    assert ledgers[0] == ledgers[1]
    assert not np.array_equal(_final_weights(plain), _final_weights(kd))


# ---------------------------------------------------------------------------- gradients


def test_gradient_update_is_the_true_gradient_at_the_global_weights() -> None:
    data = _tiny_data(37)
    config = ClientConfig(update_kind="gradients", batch_size=8, weight_decay=0.01)
    app = ClientApp(
        0,
        data,
        model_factory=lambda: _tiny_model(0),
        config=config,
        randomness=Randomness("seeded", 0),
    )
    weights = flatten_parameters(_tiny_model(7))
    ins = FitIns(round=1, attempt=0, model_hash=model_hash(weights), weights=weights)
    update, result = app.train(ins)

    reference = _tiny_model(0)
    load_parameters(reference, weights)
    objective = nn.functional.cross_entropy(
        reference(torch.from_numpy(data.x)), torch.from_numpy(data.y)
    ) + 0.005 * sum(p.pow(2).sum() for p in reference.parameters())
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    expected = torch.cat([g.reshape(-1) for g in grads]).numpy()
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-7)
    assert result.num_samples == 37 and result.steps == 0
    # the server steps against it: FedAvg at server.lr is w - lr * g
    server = make_server_optimizer(ServerConfig(lr=0.3), weights.size)
    stepped = weights.copy()
    server.apply_update(stepped, update, kind="gradients")
    np.testing.assert_allclose(stepped, weights - np.float32(0.3) * update, rtol=1e-6)


@pytest.mark.parametrize("protection", ["none", "masking", "ckks"])
def test_gradient_runs_improve_on_the_initial_model(tmp_path: Path, protection: str) -> None:
    config = small_config(
        rounds=6,
        **{
            "client.update_kind": "gradients",
            "server.optimizer": "fedavgm",
            "server.lr": 0.2,
            "aggregation.protection": protection,
            "aggregation.masking.clip_range": 2.0,
            "evaluation.per_client": False,
        },
    )
    randomness = Randomness("seeded", config.seed)
    data = build_federated_data(config.data, randomness)
    correct, _ = evaluate(initial_model(config, data, randomness), data.test)
    start = float(correct.mean())
    result = secfl.run(config, tmp_path / protection)
    assert len(result.history) == 6
    final = result.history[-1]["accuracy"]
    assert final > start + 0.3, (start, final)


def test_dp_gradients_run_and_keep_the_event(tmp_path: Path) -> None:
    dp = {"privacy.sample_level": {"noise_multiplier": 1.0, "sample_rate": 0.5}}
    weights = secfl.run(small_config(rounds=1, **dp), tmp_path / "w")
    grads = secfl.run(
        small_config(rounds=1, **dp, **{"client.update_kind": "gradients"}), tmp_path / "g"
    )
    ledgers = [(r.out_dir / "ledger.json").read_text() for r in (weights, grads)]
    assert ledgers[0] == ledgers[1]
    assert math.isfinite(grads.history[-1]["loss"])


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("client", "match"),
    [
        ({"distill": {"alpha": 1.5}}, r"client\.distill\.alpha.*1\.5.*less than or equal to 1"),
        ({"distill": {"alpha": -0.1}}, r"client\.distill\.alpha.*greater than or equal to 0"),
        ({"distill": {"temperature": 0.0}}, r"client\.distill\.temperature.*greater than 0"),
        ({"distill": {"temperature": -1.0}}, r"client\.distill\.temperature.*greater than 0"),
        ({"update_kind": "delta"}, r"client\.update_kind.*'weights' or 'gradients'"),
        ({"distill": {}, "update_kind": "gradients"}, r"distillation term's gradient"),
    ],
)
def test_bad_client_configs_fail_clearly(client: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        small_config(**{f"client.{k}": v for k, v in client.items()})


def test_trust_with_gradient_updates_is_refused(tmp_path: Path) -> None:
    config = small_config(**{"client.update_kind": "gradients", "trust": {"defense": "vote"}})
    with pytest.raises(ConfigError, match="trust.defense='vote' with client.update_kind"):
        secfl.run(config, tmp_path / "run")


# ---------------------------------------------------------------------------- bench


def test_bench_smoke_returns_a_finite_figure() -> None:
    from secfl.bench.client_kd import measure_client_kd

    measured = measure_client_kd(quick=True, smoke=True)
    assert math.isfinite(measured["kd_vs_plain_points"])
    row = measured["details"]["by_seed"]["0"]
    assert measured["kd_vs_plain_points"] == pytest.approx(100 * (row["kd"] - row["plain"]))
