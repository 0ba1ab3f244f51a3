"""``simulation.transport: ray``: seeded runs are bit-identical in-process and on local Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secfl.config import RunConfig, config_from_dict
from secfl.deploy.ray_transport import check_ray_config
from secfl.encode.flatten import flatten_parameters
from secfl.errors import ConfigError
from secfl.runner import run


def _config(**overrides: object) -> RunConfig:
    raw = {
        "name": "ray",
        "seed": 1,
        "rounds": 2,
        "security": {"randomness": "seeded"},
        "data": {"dataset": "digits", "num_clients": 6, "partition": {"kind": "iid"}},
        "model": {"kind": "mlp", "hidden": [16]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "evaluation": {"per_client": False},
        "aggregation": {"protection": "masking", "min_cohort": 3},
        "privacy": {"user_level": {"noise_multiplier": 0.3, "delta": 1e-2, "clip_norm": 1.0}},
    }
    config = config_from_dict(raw)
    return config.with_overrides(**overrides) if overrides else config


@pytest.fixture
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(ConfigError, match="needs security.randomness='seeded'"):
        check_ray_config(_config(**{"security.randomness": "os"}))
    check_ray_config(_config())


@pytest.mark.slow  # tests/test_deploy_bench.py checks the same equality (ray_matches_inprocess)
def test_seeded_run_is_identical_in_process_and_on_ray(local_ray: None, tmp_path: Path) -> None:
    config = _config()
    here = run(config, tmp_path / "inprocess")
    on_ray = run(
        config.with_overrides(**{"simulation.transport": "ray", "simulation.ray_workers": 2}),
        tmp_path / "ray",
    )
    assert np.array_equal(flatten_parameters(here.model), flatten_parameters(on_ray.model))
    assert [r["accuracy"] for r in here.history] == [r["accuracy"] for r in on_ray.history]
    assert [r["survivors"] for r in on_ray.history] == [6, 6]
