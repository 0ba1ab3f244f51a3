from __future__ import annotations

from pathlib import Path

import pytest

from secfl.config import RunConfig, config_from_dict

# the strategies' shared test checks report failing asserts as a test module does
pytest.register_assert_rewrite("tests.strategies_helpers")

ROOT = Path(__file__).resolve().parents[1]


def small_config(**overrides: object) -> RunConfig:
    """A fast digits run (seeded) for tests."""
    raw: dict[str, object] = {
        "name": "test",
        "seed": 0,
        "rounds": 3,
        "security": {"randomness": "seeded"},
        "data": {"dataset": "digits", "num_clients": 5, "partition": {"kind": "iid"}},
        "model": {"kind": "mlp", "hidden": [32]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"per_client": True},
    }
    config = config_from_dict(raw)
    return config.with_overrides(**overrides) if overrides else config


@pytest.fixture
def tiny_config() -> RunConfig:
    return small_config()


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECFL_CACHE", str(tmp_path_factory.getbasetemp() / "secfl-cache"))


@pytest.fixture(autouse=True)
def _secfl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs create the server's audit key under $SECFL_HOME: never the real home in tests."""
    monkeypatch.setenv("SECFL_HOME", str(tmp_path_factory.getbasetemp() / "secfl-home"))
