"""Config validation: unknown keys, wrong types and ranges fail before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from secfl import load_config
from secfl.config import config_from_dict
from secfl.errors import ConfigError

from .conftest import ROOT


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"rounds": 0}, ["'rounds'", "0", "greater than or equal to 1"]),
        ({"data": {"num_clientz": 3}}, ["unknown key 'data.num_clientz'"]),
        ({"client": {"lr": "fast"}}, ["'client.lr'", "'fast'", "valid number"]),
        ({"client": {"lr": -0.1}}, ["'client.lr'", "-0.1", "greater than 0"]),
        ({"data": {"partition": {"kind": "dirichlet", "alpha": 0}}}, ["data.partition.alpha"]),
        ({"data": {"partition": {"kind": "zipf"}}}, ["data.partition", "zipf"]),
        ({"server": {"sampling": {"kind": "poisson", "rate": 1.5}}}, ["server.sampling.rate"]),
        ({"aggregation": {"protection": "magic"}}, ["aggregation.protection", "'magic'"]),
        ({"security": {"randomness": "urandom"}}, ["security.randomness"]),
        ({"data": {"dataset": "npz"}}, ["data.path is required"]),
        ({"epochs": 3}, ["unknown key 'epochs'"]),
        ({"data": {"num_clients": 3.5}}, ["data.num_clients", "3.5"]),
    ],
)
def test_config_errors_name_key_value_and_rule(raw: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_examples_validate() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        config = load_config(path)
        assert config.rounds >= 1, path


def test_overrides_and_fingerprint() -> None:
    base = config_from_dict({})
    longer = base.with_overrides(rounds=50)
    assert longer.rounds == 50
    assert longer.fingerprint() == base.fingerprint()  # rounds may be extended on resume
    assert base.with_overrides(seed=3).fingerprint() != base.fingerprint()
    with pytest.raises(ConfigError, match="client.lr"):
        base.with_overrides(**{"client.lr": 0})


def test_fingerprint_keeps_rounds_when_noise_is_calibrated_from_them() -> None:
    calibrated = config_from_dict({"privacy": {"sample_level": {"target_epsilon": 8.0}}})
    assert calibrated.with_overrides(rounds=50).fingerprint() != calibrated.fingerprint()
    fixed = config_from_dict({"privacy": {"sample_level": {"noise_multiplier": 1.0}}})
    assert fixed.with_overrides(rounds=50).fingerprint() == fixed.fingerprint()
