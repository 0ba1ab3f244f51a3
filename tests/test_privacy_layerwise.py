"""The layerwise (book-keeping) DP-SGD engine against Opacus and torch.func; the fallback;
the ``secfl-gauss/1`` noise construction."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from scipy import stats
from torch import nn

from secfl.config import ModelConfig
from secfl.crypto.drbg import AesCtrDrbg
from secfl.errors import PrivacyError
from secfl.models import build_model
from secfl.privacy import layerwise
from secfl.privacy.dpsgd import (
    DpSgdSettings,
    PerSampleGradients,
    clip_and_sum,
    per_sample_norms,
    train_dp_sgd,
)
from secfl.privacy.layerwise import LayerwiseClipping, _Matmul, layerwise_unsupported_reason
from secfl.privacy.noise import gaussian_noise
from secfl.randomness import Randomness

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


class _Strided(nn.Module):
    """Convolutions with stride, dilation and asymmetric padding; a Linear over positions
    (weight shared across positions, which exercises the Gram identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(
            2, 3, kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2)
        )
        self.norm = nn.GroupNorm(3, 3)
        self.conv1 = nn.Conv1d(3, 40, kernel_size=3, stride=2, padding=1, bias=False)
        self.positions = nn.Linear(40, 30)
        self.head = nn.Linear(30 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv2(x)))  # (B, 3, 5, 10)
        h = self.conv1(h.mean(2))  # (B, 40, 5)
        h = torch.relu(self.positions(h.transpose(1, 2)))  # (B, 5, 30)
        return self.head(h[:, :3].flatten(1))


# the secfl zoo's layer types: MLP, Conv1d+GroupNorm, Conv2d+GroupNorm, plus odd geometry
MODELS = [
    (
        lambda: build_model(ModelConfig(kind="mlp", hidden=[16, 8], activation="tanh"), (64,), 10),
        (64,),
    ),
    (lambda: build_model(ModelConfig(kind="cnn", channels=[4], hidden=[8]), (2, 20), 10), (2, 20)),
    (
        lambda: build_model(
            ModelConfig(kind="cnn", channels=[4, 8], hidden=[16], groups=2), (1, 8, 8), 10
        ),
        (1, 8, 8),
    ),
    (_Strided, (2, 9, 7)),
]


def _opacus_per_sample(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    # With sum reduction Opacus' grad_sample is d loss_i / d theta.
    reference = GradSampleModule(model, loss_reduction="sum")
    nn.CrossEntropyLoss(reduction="sum")(reference(x), y).backward()
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        sample = param.grad_sample  # type: ignore[attr-defined]
        assert sample is not None
        out[name] = sample.detach().clone()
        param.grad_sample = None  # type: ignore[attr-defined]
        param.grad = None
    reference._close()
    return out


@pytest.mark.parametrize("conv_path", ["grouped", "patches"])
@pytest.mark.parametrize("index", range(len(MODELS)))
def test_layerwise_matches_opacus_and_torch_func(
    index: int, conv_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every convolution through the grouped-convolution backward, or every one through
    # patches and a batched matmul (the engine picks by C_in; the test models are small)
    threshold = 1 if conv_path == "grouped" else 10**9
    monkeypatch.setattr(layerwise, "GROUPED_MIN_IN_CHANNELS", threshold)
    make, shape = MODELS[index]
    torch.manual_seed(index)
    model = make().double()
    x = torch.randn(9, *shape, dtype=torch.float64)
    y = torch.randint(0, 10 if index < 3 else 5, (9,))
    assert layerwise_unsupported_reason(model) is None
    engine = LayerwiseClipping(model)
    ours = engine.per_sample_gradients(x, y)
    func = PerSampleGradients(model, engine="torch.func")(x, y)
    theirs = _opacus_per_sample(model, x, y)
    assert sorted(ours) == sorted(theirs) == sorted(func)
    for name in theirs:
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(func[name].numpy(), theirs[name].numpy(), atol=1e-6, rtol=1e-6)
    # the training path never builds per-sample gradients: norms and the clipped sum
    # against the same quantities computed from Opacus' per-sample gradients
    norms = per_sample_norms(theirs)
    clip = float(norms.median())  # about half the samples are clipped
    result = engine.clipped_sum(x, y, clip)
    np.testing.assert_allclose(result.norms.numpy(), norms.numpy(), rtol=1e-9)
    expected = clip_and_sum(theirs, clip)
    for name, value in expected.items():
        np.testing.assert_allclose(result.grads[name].numpy(), value.numpy(), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
    assert result.loss_sum == pytest.approx(loss, rel=1e-12)


def test_gram_identity_equals_materialised_norms() -> None:
    torch.manual_seed(0)
    g = torch.randn(4, 50, 3, dtype=torch.float64)  # d = 50, T = 3
    x = torch.randn(4, 60, 3, dtype=torch.float64)  # p = 60: T p d > T^2 (p + d)
    gram = _Matmul(g, x)
    assert gram.per_sample is None
    per_sample = torch.einsum("bdt,bpt->bdp", g, x)
    np.testing.assert_allclose(gram.norm2.numpy(), per_sample.flatten(1).pow(2).sum(1).numpy())
    factor = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    np.testing.assert_allclose(
        gram.weighted_sum(factor).numpy(),
        torch.einsum("b,bdp->dp", factor, per_sample).numpy(),
        atol=1e-12,
    )
    materialised = _Matmul(g[:, :2], x[:, :2])  # T p d <= T^2 (p + d): bmm
    assert materialised.per_sample is not None
    np.testing.assert_allclose(
        materialised.norm2.numpy(), per_sample[:, :2, :2].flatten(1).pow(2).sum(1).numpy()
    )
    wide = _Matmul(g[:, :, :1], x[:, :, :1])  # T = 1: the outer-product identity
    np.testing.assert_allclose(
        wide.norm2.numpy(),
        (g[:, :, 0].pow(2).sum(1) * x[:, :, 0].pow(2).sum(1)).numpy(),
    )


def test_auto_engine_picks_layerwise_for_the_zoo_and_falls_back_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    zoo = build_model(ModelConfig(kind="cnn", channels=[4], hidden=[8]), (1, 8, 8), 3)
    assert PerSampleGradients(zoo).engine_name == "layerwise"
    odd = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    with caplog.at_level(logging.INFO, logger="secfl.privacy.dpsgd"):
        engine = PerSampleGradients(odd)
    assert engine.engine_name == "torch.func"
    assert engine.fallback_reason is not None and "LayerNorm" in engine.fallback_reason
    assert "torch.func" in caplog.text and "LayerNorm" in caplog.text
    with pytest.raises(PrivacyError, match="LayerNorm"):
        PerSampleGradients(odd, engine="layerwise")
    grouped = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    assert "groups=2" in str(layerwise_unsupported_reason(grouped))
    with pytest.raises(PrivacyError, match="engine must be one of"):
        PerSampleGradients(zoo, engine="opacus")  # type: ignore[arg-type]


class _Reused(nn.Module):
    """One Linear applied twice: its per-sample gradient is a sum of two outer products,
    which the per-call rule would get wrong."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return self.head(torch.relu_(self.inner(x)))
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize("inplace", [False, True])
def test_runtime_fallback_recomputes_with_torch_func(
    inplace: bool, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(1)
    model = _Reused(inplace).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    engine = PerSampleGradients(model)
    assert engine.engine_name == "layerwise"
    with caplog.at_level(logging.WARNING, logger="secfl.privacy.dpsgd"):
        result = engine.clipped_sum(x, y, 0.3)
    assert engine.engine_name == "torch.func"
    assert "falling back" in caplog.text
    assert ("in place" if inplace else "2 times") in str(engine.fallback_reason)
    # Opacus refuses an in-place change of a hooked output; torch.func is the reference
    reference = PerSampleGradients(model, engine="torch.func")(x, y)
    expected = clip_and_sum(reference, 0.3)
    for name, value in expected.items():
        np.testing.assert_allclose(result.grads[name].numpy(), value.numpy(), atol=1e-6)


def test_train_dp_sgd_same_update_with_either_engine() -> None:
    torch.manual_seed(0)
    config = ModelConfig(kind="cnn", channels=[4], hidden=[8])
    start = build_model(config, (1, 8, 8), 4).double()
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    randomness = Randomness("seeded", 5)
    finals = []
    for name in ("layerwise", "torch.func"):
        model = build_model(config, (1, 8, 8), 4).double()
        model.load_state_dict(start.state_dict())
        engine = PerSampleGradients(model, engine=name)
        result = train_dp_sgd(
            model,
            x,
            y,
            torch.optim.SGD(model.parameters(), lr=0.5),
            DpSgdSettings(noise_multiplier=0.7, max_grad_norm=0.2, sample_rate=0.25, epochs=1),
            sampling_stream=randomness.stream("s"),
            noise_stream=randomness.stream("n"),
            round_index=1,
            attempt=0,
            party="client:0",
            engine=engine,
        )
        assert result.steps == 4 and math.isfinite(result.mean_loss)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = float(
        (finals[0] - torch.cat([p.detach().flatten() for p in start.parameters()])).abs().max()
    )
    assert moved > 1e-3
    np.testing.assert_allclose(finals[0].numpy(), finals[1].numpy(), atol=1e-9)


def _reference_gauss(key: bytes, size: int) -> np.ndarray:
    """secfl-gauss/1 written out with numpy, from the documented steps."""
    half = (size + 1) // 2
    raw = AesCtrDrbg(key).read(16 * half)
    words = np.array([int.from_bytes(raw[8 * i : 8 * i + 8], "big") >> 11 for i in range(2 * half)])
    u = words.astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(1.0 - u[:half]))
    angle = 2.0 * np.pi * u[half:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def test_gaussian_noise_follows_its_documented_construction() -> None:
    stream = Randomness("seeded", 11).stream("test.noise")
    key = Randomness("seeded", 11).stream("test.noise").bytes(32)
    ours = gaussian_noise(stream, 1001)
    assert ours.dtype == torch.float64 and ours.shape == (1001,)
    np.testing.assert_allclose(ours.numpy(), _reference_gauss(key, 1001), rtol=1e-13, atol=1e-13)
    # the next call uses a fresh key from the stream: different values
    assert not torch.equal(gaussian_noise(stream, 1001), ours)
    # torch's and numpy's generators play no part
    torch.manual_seed(123)
    np.random.seed(123)
    again = gaussian_noise(Randomness("seeded", 11).stream("test.noise"), 1001)
    assert torch.equal(again, ours)
    with pytest.raises(PrivacyError, match="noise size"):
        gaussian_noise(stream, -1)


def test_gaussian_noise_is_standard_normal() -> None:
    z = gaussian_noise(Randomness("os", 0).stream("test.noise"), 200_001).numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov against N(0, 1); p below 1e-4 would fail (a fixed bad draw is
    # possible with that probability only)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # sin and cos halves are uncorrelated
    half = (n + 1) // 2
    assert abs(np.corrcoef(z[: half - 1], z[half : 2 * half - 1])[0, 1]) < 5 / math.sqrt(half)
