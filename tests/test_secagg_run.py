"""SecAgg inside ``secfl run``: examples validate, dropouts are simulated and logged,
kill-and-resume is exact in seeded mode and uses a fresh attempt in os mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secfl.audit.events import EventLog, read_events
from secfl.config import config_from_dict, load_config
from secfl.errors import ConfigError
from secfl.randomness import Randomness
from secfl.runner import run
from secfl.transport.dropout import DropoutTransport, with_simulated_dropouts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _small(protection: str = "masking", **extra: object) -> dict:  # type: ignore[type-arg]
    raw: dict = {  # type: ignore[type-arg]
        "name": "secagg-small",
        "rounds": 2,
        "security": {"randomness": "seeded"},
        "data": {"dataset": "digits", "num_clients": 6},
        "model": {"kind": "mlp", "hidden": [16]},
        "client": {"epochs": 1, "batch_size": 32},
        "aggregation": {"protection": protection, "min_cohort": 3},
    }
    raw.update(extra)
    return raw


def test_examples_validate() -> None:
    cfg = load_config(EXAMPLES / "digits_secagg.yaml")
    plain = load_config(EXAMPLES / "digits.yaml")
    assert cfg.aggregation.protection == "masking"
    # the same training settings as the plaintext example, so the comparison is fair
    for key in ("data", "model", "client", "server", "rounds", "seed", "security"):
        assert getattr(cfg, key) == getattr(plain, key), key
    drops = load_config(EXAMPLES / "digits_secagg_dropouts.yaml")
    assert drops.simulation.dropout_rate > 0 and "masked_input" in drops.simulation.dropout_stages


def test_masking_run_matches_plaintext_closely(tmp_path: Path) -> None:
    masked = run(config_from_dict(_small()), tmp_path / "m")
    plain = run(config_from_dict(_small("none")), tmp_path / "p")
    a = np.concatenate([p.detach().numpy().ravel() for p in masked.model.parameters()])
    b = np.concatenate([p.detach().numpy().ravel() for p in plain.model.parameters()])
    assert np.abs(a - b).max() < 1e-3  # quantisation error only (clip 1.0 never binds here)
    events = read_events(tmp_path / "m" / "events.jsonl")
    assert sum(e["event"] == "secagg_unmasked" for e in events) == 2
    assert all("train_loss" not in r for r in masked.history)  # the server never sees it


def test_dropouts_are_simulated_logged_and_recovered(tmp_path: Path) -> None:
    raw = _small(
        simulation={"dropout_rate": 0.3, "dropout_stages": ["share_keys", "masked_input", "unmask"]}
    )
    raw["rounds"] = 3
    raw["aggregation"]["masking"] = {"threshold": 3}
    first = run(config_from_dict(raw), tmp_path / "a")
    events = read_events(tmp_path / "a" / "events.jsonl")
    simulated = [e for e in events if e["event"] == "simulated_dropout"]
    assert simulated, "no dropout was simulated at rate 0.3"
    dropped = [e for e in events if e["event"] == "client_dropped"]
    # every simulated dropout shows up as a dropped client at that stage (or the round aborted)
    for sim in simulated:
        if sim["stage"] == "unmask":
            continue  # a client lost at unmask is still a survivor: its input is in the sum
        assert any(
            d["client"] == sim["client"]
            and d["round"] == sim["round"]
            and d["stage"] == sim["stage"]
            for d in dropped
        ) or any(e["event"] == "secagg_aborted" and e["round"] == sim["round"] for e in events)
    # reproducible in seeded mode
    second = run(config_from_dict(raw), tmp_path / "b")
    again = [
        e for e in read_events(tmp_path / "b" / "events.jsonl") if e["event"] == "simulated_dropout"
    ]
    assert [(e["round"], e["client"], e["stage"]) for e in again] == [
        (e["round"], e["client"], e["stage"]) for e in simulated
    ]
    assert [r["accuracy"] for r in first.history] == [r["accuracy"] for r in second.history]


def test_fit_dropouts_in_mode_none(tmp_path: Path) -> None:
    raw = _small("none", simulation={"dropout_rate": 0.4, "dropout_stages": ["fit"]})
    result = run(config_from_dict(raw), tmp_path / "n")
    events = read_events(tmp_path / "n" / "events.jsonl")
    sims = [e for e in events if e["event"] == "simulated_dropout"]
    assert sims and all(e["stage"] == "fit" for e in sims)
    assert sum(r["dropped"] for r in result.history) == len(sims)


def test_dropout_stage_must_exist_in_the_mode(tmp_path: Path) -> None:
    raw = _small("none", simulation={"dropout_rate": 0.1, "dropout_stages": ["unmask"]})
    with pytest.raises(ConfigError, match=r"\['unmask'\] never occur in protection mode 'none'"):
        run(config_from_dict(raw), tmp_path / "x")
    with pytest.raises(ConfigError, match="needs simulation.dropout_stages"):
        config_from_dict(_small(simulation={"dropout_rate": 0.1}))


def test_kill_and_resume_is_exact_in_seeded_mode(tmp_path: Path) -> None:
    raw = _small(simulation={"dropout_rate": 0.2, "dropout_stages": ["masked_input"]})
    raw["rounds"] = 3
    raw["aggregation"]["masking"] = {"threshold": 3}
    config = config_from_dict(raw)
    whole = run(config, tmp_path / "whole")
    run(config, tmp_path / "cut", stop_after=1)
    resumed = run(config, tmp_path / "cut", resume=True)
    assert [r["accuracy"] for r in resumed.history] == [r["accuracy"] for r in whole.history]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert np.array_equal(a.detach().numpy(), b.detach().numpy())


def test_os_mode_resume_uses_a_fresh_attempt(tmp_path: Path) -> None:
    raw = _small()
    raw["security"] = {"randomness": "os"}
    raw["rounds"] = 2
    config = config_from_dict(raw)
    folder = tmp_path / "os"
    run(config, folder, stop_after=1)
    # emulate a crash in the middle of round 2: it started (and clients may have released
    # shares for attempt 0), but no checkpoint was written
    log = EventLog(folder / "events.jsonl")
    log.emit("round_started", round=2, attempt=0, participants=[0, 1, 2, 3, 4, 5])
    log.close()
    result = run(config, folder, resume=True)
    assert result.history[-1]["round"] == 2 and result.history[-1]["attempt"] == 1
    events = read_events(folder / "events.jsonl")
    assert any(
        e["event"] == "secagg_unmasked" and e["round"] == 2 and e["attempt"] == 1 for e in events
    )
    assert (folder / "client_state").is_dir()  # os mode: release logs persist on disk


def test_dropout_transport_passes_unlisted_stages() -> None:
    class Echo:
        def exchange(self, requests):  # type: ignore[no-untyped-def]
            return dict(requests)

    with pytest.raises(ConfigError):
        DropoutTransport(
            Echo(), rate=1.5, stages=["fit"], randomness=Randomness("seeded", 0), events=None
        )  # type: ignore[arg-type]
    cfg = config_from_dict(_small())
    same = with_simulated_dropouts(
        Echo(),
        cfg.simulation,
        protection="masking",  # type: ignore[arg-type]
        randomness=Randomness("seeded", 0),
        events=None,
    )  # type: ignore[arg-type]
    assert isinstance(same, Echo)
