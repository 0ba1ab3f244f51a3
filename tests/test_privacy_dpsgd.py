"""DP-SGD: per-sample gradients against Opacus, Poisson sampling, clipping, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from secfl.config import ModelConfig
from secfl.errors import PrivacyError
from secfl.models import build_model
from secfl.privacy.dpsgd import (
    DpSgdSettings,
    PerSampleGradients,
    clip_and_sum,
    poisson_batch,
    train_dp_sgd,
    validate_model,
)
from secfl.randomness import Randomness


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize(
    "config, shape",
    [
        (ModelConfig(kind="cnn", channels=[4, 8], hidden=[16], groups=2), (1, 8, 8)),
        (ModelConfig(kind="cnn", channels=[4], hidden=[8]), (2, 20)),
        (ModelConfig(kind="mlp", hidden=[16, 8], activation="tanh"), (64,)),
    ],
)
def test_per_sample_gradients_match_opacus(config: ModelConfig, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(config, shape, 10).double()
    x = torch.randn(7, *shape, dtype=torch.float64)
    y = torch.randint(0, 10, (7,))
    ours = PerSampleGradients(model)(x, y)
    # With sum reduction Opacus' grad_sample is d loss_i / d theta, what we compute.
    reference = GradSampleModule(model, loss_reduction="sum")
    nn.CrossEntropyLoss(reduction="sum")(reference(x), y).backward()
    for name, param in model.named_parameters():
        theirs = param.grad_sample
        assert theirs is not None
        np.testing.assert_allclose(ours[name].numpy(), theirs.numpy(), atol=1e-6, rtol=1e-6)
    reference._close()


def test_clipping_bounds_every_sample() -> None:
    grads = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[0.0], [0.0]])}
    total = clip_and_sum(grads, 1.0)
    # sample 0 (norm 5) scaled to ~1, sample 1 (norm 0.5) untouched
    np.testing.assert_allclose(total["w"].numpy(), [0.6 + 0.3, 0.8 + 0.4], atol=1e-5)


def test_poisson_sampling_distribution() -> None:
    stream = Randomness("seeded", 3).stream("test.poisson")
    n, q, trials = 200, 0.1, 2000
    counts = np.zeros(n)
    sizes = []
    for _ in range(trials):
        batch = poisson_batch(stream, n, q)
        sizes.append(batch.size)
        counts[batch] += 1
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    # Binomial(n, q): mean 20, variance 18; 5-sigma bounds on the sample estimates
    assert abs(sizes_arr.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / trials)
    assert abs(sizes_arr.var() / (n * q * (1 - q)) - 1) < 0.15
    # every record equally likely: chi-square over records, 199 dof (p ~ 1e-6 bound 300)
    expected = trials * q
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 300


def test_validation_refuses_batchnorm_or_fixes_it() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(PrivacyError, match="incompatible_layers: fix"):
        validate_model(model, fix=False)
    fixed, notices = validate_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), fix=True)
    assert notices and "ModuleValidator.fix" in notices[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())


def test_dp_sgd_is_reproducible_and_noise_follows_sigma() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[8]), (16,), 3)
    start = [p.detach().clone() for p in model.parameters()]
    x = torch.zeros(50, 16)
    y = torch.zeros(50, dtype=torch.long)
    randomness = Randomness("seeded", 1)
    settings = DpSgdSettings(noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=0.2, epochs=1)

    def once() -> list[torch.Tensor]:
        for p, s in zip(model.parameters(), start, strict=True):
            p.data.copy_(s)
        result = train_dp_sgd(
            model,
            x,
            y,
            torch.optim.SGD(model.parameters(), lr=1.0),
            DpSgdSettings(2.0, 0.5, 0.2, 1),
            sampling_stream=randomness.stream("s"),
            noise_stream=randomness.stream("n"),
            round_index=1,
            attempt=0,
            party="client:0",
        )
        assert result.event.steps == settings.steps_per_round == 5
        assert result.event.noise_std == pytest.approx(1.0)
        return [p.detach().clone() for p in model.parameters()]

    first, second = once(), once()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # zero inputs: the first layer's weight gradient is zero, so its change is pure noise
    # of std sigma*C/(q n) per step over 5 steps.
    delta_w = (first[0] - start[0]).numpy().ravel()
    expected_std = 2.0 * 0.5 / (0.2 * 50) * np.sqrt(5)
    assert 0.8 < delta_w.std() / expected_std < 1.2
