"""Poisoning attacks: each attack's definition, the adversary core, the plug-in path, the
config errors and the mode-``none`` adapter end to end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm

import secfl
from secfl.attacks import (
    Adversary,
    AttackContext,
    get_attack,
    malicious_count,
    register_attack,
    registered_attacks,
    select_malicious,
)
from secfl.attacks import base as attack_base
from secfl.attacks.poisoning import (
    agr_agnostic_bound,
    agr_agnostic_score,
    alie_z_max,
    apply_trigger,
    perturbation_vector,
    search_gamma,
)
from secfl.attacks.simulation import AdversarialTransport, build_adversary
from secfl.audit.events import EventLog, read_events
from secfl.config import config_from_dict
from secfl.errors import ConfigError, DataError
from secfl.messages import FitIns, FitRes
from secfl.randomness import Randomness
from secfl.wire import decode_message

from .conftest import small_config

BUILT_IN = {"alie", "backdoor", "gaussian", "ipm", "label_flip", "min_max", "min_sum", "sign_flip"}


def _ctx(n: int, f: int, seed: int = 0) -> AttackContext:
    stream = Randomness("seeded", seed).stream("adversary.craft", round_index=1, party="adversary")
    return AttackContext(round=1, attempt=0, num_participants=n, num_malicious=f, stream=stream)


def _updates(count: int, dim: int, *, seed: int, first_id: int = 0, scale: float = 1.0) -> dict:
    # Test data only; attacks themselves never use numpy's generators.
    rng = np.random.default_rng(seed)
    return {
        first_id + i: (0.3 + scale * rng.standard_normal(dim)).astype(np.float32)
        for i in range(count)
    }


def _stack(*groups: dict) -> np.ndarray:
    return np.stack([np.asarray(u, np.float64) for g in groups for _, u in sorted(g.items())])


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    attack_base._load_builtins()
    monkeypatch.setattr(attack_base, "_ATTACKS", dict(attack_base._ATTACKS))


# ---------------------------------------------------------------------------- definitions


def test_registry_holds_every_built_in_attack_and_describes_it() -> None:
    assert set(registered_attacks()) >= BUILT_IN
    for name in BUILT_IN:
        described = get_attack(name).describe()
        assert described["attack"] == name


def test_sign_flip_is_minus_five_times_own_update() -> None:
    benign = _updates(2, 50, seed=1, first_id=7)
    honest = _updates(8, 50, seed=2)
    out = get_attack("sign_flip").craft(1, benign, honest, _ctx(10, 2))
    assert sorted(out) == [7, 8]
    for c in benign:
        np.testing.assert_array_equal(
            out[c], (-5.0 * benign[c].astype(np.float64)).astype(np.float32)
        )
        assert out[c].dtype == np.float32


def test_gaussian_is_zero_mean_with_three_times_the_honest_std() -> None:
    dim = 40_000
    honest = {
        i: (np.linspace(0.1, 2.0, dim) * (i - 3.5)).astype(np.float32) for i in range(8)
    }  # coordinate std grows linearly along the vector
    sigma = _stack(honest).std(axis=0)
    benign = _updates(2, dim, seed=3, first_id=8)
    out = get_attack("gaussian").craft(1, benign, honest, _ctx(10, 2))
    for c in benign:
        z = out[c].astype(np.float64) / (3.0 * sigma)
        assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
    assert not np.allclose(out[8], out[9])  # independent draws per malicious client
    # Non-omniscient: the colluders' own updates give sigma.
    own = get_attack("gaussian").craft(1, benign, {}, _ctx(10, 2))
    z_own = own[8].astype(np.float64) / (3.0 * _stack(benign).std(axis=0))
    assert abs(z_own.std() - 1.0) < 0.02


def test_label_flip_maps_y_to_c_minus_one_minus_y() -> None:
    attack = get_attack("label_flip")
    x = np.zeros((10, 1, 8, 8), dtype=np.float32)
    y = np.arange(10, dtype=np.int64)
    x2, y2 = attack.poison_data(x, y, 10)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(y2, 9 - y)
    np.testing.assert_array_equal(x2, x)
    assert y2.dtype == np.int64 and y[0] == 0  # input untouched
    _, y3 = attack.poison_data(x[:3], np.array([0, 1, 2]), 3)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(y3, [2, 1, 0])
    benign = _updates(1, 5, seed=4)
    np.testing.assert_array_equal(attack.craft(1, benign, {}, _ctx(5, 1))[0], benign[0])


@pytest.mark.parametrize(("n", "f", "s"), [(10, 2, 4), (10, 4, 2), (30, 6, 10), (7, 1, 3)])
def test_alie_z_max_matches_the_papers_formula(n: int, f: int, s: int) -> None:
    z, s_used = alie_z_max(n, f)
    assert s_used == s
    assert z == pytest.approx(norm.ppf((n - s) / n), abs=1e-12)


def test_alie_sends_mu_minus_z_sigma_from_all_benign_updates() -> None:
    honest = _updates(8, 30, seed=5)
    benign = _updates(2, 30, seed=6, first_id=8)
    ctx = _ctx(10, 2)
    out = get_attack("alie").craft(1, benign, honest, ctx)
    population = _stack(honest, benign)
    expected = population.mean(0) - norm.ppf(0.6) * population.std(0)
    for c in (8, 9):
        np.testing.assert_allclose(out[c], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[8], out[9])
    assert ctx.notes["z"] == pytest.approx(0.2533471, abs=1e-6) and ctx.notes["s"] == 4


def test_ipm_epsilon_half_and_mean_reversing() -> None:
    honest = _updates(8, 30, seed=7)
    benign = _updates(2, 30, seed=8, first_id=8)
    mu = _stack(honest).mean(0)
    out = get_attack("ipm").craft(1, benign, honest, _ctx(10, 2))
    np.testing.assert_allclose(out[8], -0.5 * mu, rtol=1e-6)
    reversing = get_attack("ipm", {"epsilon": "mean_reversing"})
    ctx = _ctx(10, 2)
    out = reversing.craft(1, benign, honest, ctx)
    assert ctx.notes["epsilon"] == pytest.approx(2 * 8 / 2)
    everything = _stack(honest, out)
    np.testing.assert_allclose(everything.mean(0), -(8 / 10) * mu, rtol=1e-5, atol=1e-6)
    assert float(everything.mean(0) @ mu) < 0  # the plain mean points against the honest one


@pytest.mark.parametrize("rule", ["min_max", "min_sum"])
@pytest.mark.parametrize("kind", ["unit", "std", "sign"])
def test_agr_agnostic_gamma_is_the_largest_within_the_bound(rule: str, kind: str) -> None:
    population = _stack(_updates(10, 40, seed=9, scale=0.5))
    p = perturbation_vector(kind, population)
    gamma, saturated = search_gamma(rule, population, p, gamma_init=10.0, tolerance=1e-5)
    assert gamma > 0 and not saturated
    mu = population.mean(0)
    bound = agr_agnostic_bound(rule, population)
    assert agr_agnostic_score(rule, population, mu + gamma * p) <= bound
    assert agr_agnostic_score(rule, population, mu + (gamma + 1e-4) * p) > bound
    if rule == "min_sum":
        # sum_i ||mu + g p - b_i||^2 = sum_i ||mu - b_i||^2 + n g^2 ||p||^2 (the cross term
        # vanishes because mu is the mean): the exact largest gamma.
        spread = float(((population - mu) ** 2).sum())
        exact = np.sqrt((bound - spread) / (len(population) * float(p @ p)))
        assert gamma == pytest.approx(exact, abs=2e-5)


@pytest.mark.parametrize("rule", ["min_max", "min_sum"])
def test_agr_agnostic_worst_perturbation_has_the_largest_deviation(rule: str) -> None:
    honest = _updates(8, 40, seed=10, scale=0.5)
    benign = _updates(2, 40, seed=11, first_id=8, scale=0.5)
    ctx = _ctx(10, 2)
    out = get_attack(rule).craft(1, benign, honest, ctx)
    population = _stack(honest, benign)
    mu = population.mean(0)
    deviations = {}
    for kind in ("unit", "std", "sign"):
        p = perturbation_vector(kind, population)
        gamma, _ = search_gamma(rule, population, p)
        deviations[kind] = gamma * float(np.linalg.norm(p))
    worst = max(deviations, key=deviations.__getitem__)
    assert ctx.notes["perturbation"] == worst
    np.testing.assert_allclose(
        np.linalg.norm(out[8].astype(np.float64) - mu), deviations[worst], rtol=1e-5
    )
    np.testing.assert_array_equal(out[8], out[9])
    fixed = get_attack(rule, {"perturbation": "sign"})
    ctx_sign = _ctx(10, 2)
    fixed.craft(1, benign, honest, ctx_sign)
    assert ctx_sign.notes["perturbation"] == "sign"


def test_backdoor_trigger_pixels_poisoning_and_boost() -> None:
    x = np.full((4, 1, 8, 8), 0.25, dtype=np.float32)
    triggered = apply_trigger(x)
    corner = np.zeros((8, 8), dtype=bool)
    corner[:2, :2] = True
    assert (triggered[:, 0][:, corner] == 1.0).all()
    assert (triggered[:, 0][:, ~corner] == 0.25).all() and (x == 0.25).all()
    signal = apply_trigger(np.zeros((3, 1, 40), dtype=np.float32), value=2.0)
    assert (signal[..., :2] == 2.0).all() and (signal[..., 2:] == 0).all()
    rows = apply_trigger(np.zeros((3, 30), dtype=np.float32))
    assert (rows[:, :2] == 1.0).all() and (rows[:, 2:] == 0).all()
    with pytest.raises(DataError, match="not supported"):
        apply_trigger(np.zeros((2, 1, 2, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match="does not fit"):
        apply_trigger(np.zeros((2, 1, 1, 8), dtype=np.float32))

    attack = get_attack("backdoor")
    xs = np.full((10, 1, 8, 8), 0.25, dtype=np.float32)
    ys = np.arange(10, dtype=np.int64) % 10
    px, py = attack.poison_data(xs, ys, 10)  # type: ignore[attr-defined]
    hit = (px[:, 0, 0, 0] == 1.0) & (px[:, 0, 1, 1] == 1.0)
    assert hit.sum() == 5 and (py[hit] == 0).all()
    np.testing.assert_array_equal(py[~hit], ys[~hit])
    np.testing.assert_array_equal(px[~hit], xs[~hit])
    benign = _updates(2, 10, seed=12, first_id=3)
    ctx = _ctx(10, 2)
    out = attack.craft(1, benign, {}, ctx)
    assert ctx.notes["boost"] == 5.0
    np.testing.assert_allclose(out[3], 5.0 * benign[3], rtol=1e-6)
    with pytest.raises(ConfigError, match="target"):
        attack.poison_data(xs[:2], ys[:2], 0)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- adversary core


def test_malicious_selection_is_deterministic_for_a_seed() -> None:
    ids = list(range(20))

    def pick(seed: int) -> tuple[int, ...]:
        return select_malicious(ids, 4, Randomness("seeded", seed).stream("adversary.select"))

    assert pick(0) == pick(0) and len(set(pick(0))) == 4 and set(pick(0)) <= set(ids)
    assert len({pick(s) for s in range(5)}) > 1
    assert malicious_count(10, fraction=0.2, count=None) == 2
    assert malicious_count(10, fraction=0.3, count=None) == 3
    assert malicious_count(10, fraction=None, count=5) == 5
    with pytest.raises(ConfigError, match="gives f=0"):
        malicious_count(4, fraction=0.2, count=None)
    with pytest.raises(ConfigError, match="num_clients / 2"):
        malicious_count(10, fraction=None, count=6)


def test_collusion_off_crafts_from_each_clients_own_update() -> None:
    honest = _updates(8, 20, seed=13)
    benign = _updates(2, 20, seed=14, first_id=8)
    stream = Randomness("seeded", 0).stream("adversary.craft")
    loner = Adversary(get_attack("alie"), frozenset({8, 9}), collusion=False, omniscient=False)
    crafted = loner.craft_round(
        1, 0, num_participants=10, benign=benign, honest=honest, stream=stream
    )
    # Alone and blind, each sees one update: mean = its own, std = 0.
    np.testing.assert_allclose(crafted.updates[8], benign[8])
    np.testing.assert_allclose(crafted.updates[9], benign[9])
    with pytest.raises(ConfigError, match="not malicious"):
        loner.craft_round(1, 0, num_participants=10, benign=honest, honest={}, stream=stream)
    window = Adversary(get_attack("sign_flip"), frozenset({1}), rounds=(3, 5))
    assert [window.is_active(r) for r in (2, 3, 5, 6)] == [False, True, True, False]


# ---------------------------------------------------------------------------- plug-ins


@register_attack("test_zero_update")
class ZeroUpdate:
    """An auditor's attack defined outside secfl: the malicious clients send zeros."""

    name = "test_zero_update"

    def __init__(self, *, scale: float = 0.0) -> None:
        self.scale = scale

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, "scale": self.scale}

    def craft(self, round_index: int, benign: Any, honest: Any, ctx: Any) -> dict:
        return {c: self.scale * np.ones_like(u) for c, u in benign.items()}


def test_an_attack_registered_outside_the_package_is_usable() -> None:
    assert "test_zero_update" in registered_attacks()
    attack = get_attack("test_zero_update", {"scale": 2.0})
    assert attack.describe() == {"attack": "test_zero_update", "scale": 2.0}
    out = attack.craft(1, {4: np.ones(3, np.float32)}, {}, _ctx(5, 1))
    np.testing.assert_array_equal(out[4], [2.0, 2.0, 2.0])
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['bogus'\]; allowed: \['scale'\]"):
        get_attack("test_zero_update", {"bogus": 1})


def test_plugin_path_imports_and_registers_a_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: None
) -> None:
    (tmp_path / "auditor_attacks.py").write_text(
        "import numpy as np\n"
        "class Halve:\n"
        "    name = 'halve'\n"
        "    def __init__(self, *, factor=0.5):\n"
        "        self.factor = factor\n"
        "    def describe(self):\n"
        "        return {'attack': self.name, 'factor': self.factor}\n"
        "    def craft(self, round_index, benign, honest, ctx):\n"
        "        return {c: (self.factor * u).astype(np.float32) for c, u in benign.items()}\n"
        "def make(**params):\n"
        "    return Halve(**params)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "auditor_attacks", raising=False)
    raw = small_config().to_dict()
    raw["adversary"] = {
        "attack": "halve",
        "count": 1,
        "plugin": "auditor_attacks:make",
        "params": {"factor": 0.25},
    }
    config = config_from_dict(raw)
    assert config.adversary is not None and "halve" in registered_attacks()
    out = get_attack("halve", {"factor": 0.25}).craft(1, {0: np.ones(2)}, {}, _ctx(5, 1))
    np.testing.assert_array_equal(out[0], [0.25, 0.25])
    raw["adversary"]["plugin"] = "auditor_attacks:missing"
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        config_from_dict(raw)
    raw["adversary"]["plugin"] = "no_such_module_for_secfl:make"
    with pytest.raises(ConfigError, match="cannot import"):
        config_from_dict(raw)
    raw["adversary"].update(attack="sign_flip", plugin="auditor_attacks:make")
    with pytest.raises(ConfigError, match="already registered"):
        config_from_dict(raw)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("adversary", "message"),
    [
        ({"attack": "nope", "fraction": 0.2}, "unknown attack 'nope'; registered attacks: \\["),
        ({"attack": "sign_flip", "fraction": 0.6}, "adversary.fraction"),
        ({"attack": "sign_flip", "fraction": 0.0}, "adversary.fraction"),
        ({"attack": "sign_flip"}, "exactly one of adversary.fraction or adversary.count"),
        ({"attack": "sign_flip", "fraction": 0.2, "count": 1}, "exactly one"),
        ({"attack": "sign_flip", "count": 3}, "num_clients / 2"),
        ({"attack": "sign_flip", "fraction": 0.1}, "gives f=0"),
        ({"attack": "sign_flip", "count": 1, "rounds": [3, 1]}, "adversary.rounds"),
        ({"attack": "sign_flip", "count": 1, "rounds": [0, 2]}, "adversary.rounds"),
        ({"attack": "ipm", "count": 1, "params": {"eps": 1}}, "allowed: \\['epsilon'\\]"),
        ({"attack": "ipm", "count": 1, "params": {"epsilon": -1}}, "ipm.epsilon"),
        ({"attack": "min_max", "count": 1, "params": {"perturbation": "x"}}, "perturbation"),
        ({"attack": "sign_flip", "count": 1, "plugin": "nocolon"}, "package.module:factory"),
        ({"attack": "sign_flip", "count": 1, "extra": 1}, "unknown key 'adversary.extra'"),
    ],
)
def test_adversary_config_errors_name_the_key(adversary: dict, message: str) -> None:
    raw = small_config().to_dict()
    raw["adversary"] = adversary
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_unknown_attack_lists_the_registered_ones() -> None:
    raw = small_config().to_dict()
    raw["adversary"] = {"attack": "nope", "count": 1}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert all(name in str(caught.value) for name in BUILT_IN)


# adversaries under masking: tests/test_trust_masking.py; ckks: tests/test_trust_ckks.py


# ---------------------------------------------------------------------------- adapter


class _FakeClients:
    """Byte handlers answering FitIns with a fixed update per client (no training)."""

    def __init__(self, updates: dict[int, np.ndarray]) -> None:
        self.updates = updates

    def exchange(self, requests: dict[int, bytes]) -> dict[int, bytes | None]:
        out: dict[int, bytes | None] = {}
        for c, payload in requests.items():
            ins = decode_message(payload)
            out[c] = FitRes(
                round=ins.round,
                attempt=ins.attempt,
                client_id=c,
                model_hash=ins.model_hash,
                num_samples=10 + c,
                train_loss=0.5,
                update=self.updates[c],
            ).to_bytes()
        return out


def test_adapter_replaces_only_malicious_replies_in_active_rounds(tmp_path: Path) -> None:
    updates = _updates(5, 6, seed=15)
    events = EventLog(tmp_path / "events.jsonl")
    adversary = Adversary(get_attack("ipm"), frozenset({1, 3}), rounds=(2, 2))
    transport = AdversarialTransport(
        _FakeClients(updates), adversary, randomness=Randomness("seeded", 0), events=events
    )
    weights = np.zeros(6, np.float32)
    for round_index in (1, 2):
        ins = FitIns(round=round_index, attempt=0, model_hash=b"h" * 32, weights=weights)
        replies = transport.exchange(dict.fromkeys(range(5), ins.to_bytes()))
        decoded = {c: decode_message(r) for c, r in replies.items()}
        honest_mean = np.mean([updates[c] for c in (0, 2, 4)], axis=0)
        for c, res in decoded.items():
            assert (res.round, res.client_id, res.num_samples) == (round_index, c, 10 + c)
            assert res.model_hash == b"h" * 32
            if c in (1, 3) and round_index == 2:
                np.testing.assert_allclose(res.update, -0.5 * honest_mean, rtol=1e-6)
            else:
                np.testing.assert_array_equal(res.update, updates[c])
    events.close()
    logged = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in logged] == [
        "adversary_selected",
        "adversary_update",
        "adversary_update",
    ]
    assert [(e["round"], e["client"]) for e in logged[1:]] == [(2, 1), (2, 3)]
    assert logged[1]["epsilon"] == 0.5 and logged[0]["clients"] == [1, 3]


def test_resumed_run_reuses_the_logged_malicious_clients(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = EventLog(path)
    events.emit("adversary_selected", attack="sign_flip", clients=[0, 7], setting={})
    config = config_from_dict(
        {**small_config().to_dict(), "adversary": {"attack": "sign_flip", "count": 2}}
    )
    assert config.adversary is not None
    adversary, new = build_adversary(config.adversary, list(range(10)), Randomness("os", 0), events)
    assert adversary.malicious == frozenset({0, 7}) and not new
    events.close()


def test_sign_flip_run_logs_crafted_updates_and_hurts_accuracy(tmp_path: Path) -> None:
    clean = secfl.run(small_config(rounds=4), tmp_path / "clean")
    raw = small_config(rounds=4).to_dict()
    raw["adversary"] = {"attack": "sign_flip", "fraction": 0.2}
    attacked = secfl.run(config_from_dict(raw), tmp_path / "attacked")
    logged = read_events(tmp_path / "attacked" / "events.jsonl")
    selected = [e for e in logged if e["event"] == "adversary_selected"]
    assert len(selected) == 1 and len(selected[0]["clients"]) == 1
    culprit = selected[0]["clients"][0]
    crafted = [e for e in logged if e["event"] == "adversary_update"]
    assert [(e["round"], e["client"]) for e in crafted] == [(r, culprit) for r in (1, 2, 3, 4)]
    for e in crafted:
        assert e["attack"] == "sign_flip"
        assert e["crafted_norm"] == pytest.approx(5 * e["benign_norm"], rel=1e-5)
    clean_acc = clean.history[-1]["accuracy"]
    attacked_acc = attacked.history[-1]["accuracy"]
    assert clean_acc > 0.5 and attacked_acc < clean_acc - 0.3


def test_label_flip_trains_the_malicious_client_on_flipped_labels_in_its_window(
    tmp_path: Path,
) -> None:
    raw = small_config(rounds=2).to_dict()
    raw["adversary"] = {"attack": "label_flip", "count": 1, "rounds": [2, 2]}
    config = config_from_dict(raw)
    result = secfl.run(config, tmp_path / "run")
    logged = read_events(result.out_dir / "events.jsonl")
    crafted = [e for e in logged if e["event"] == "adversary_update"]
    assert [e["round"] for e in crafted] == [2]
    # Same seed without the attack: identical first round, different second round.
    clean = secfl.run(small_config(rounds=2), tmp_path / "clean")
    assert result.history[0]["accuracy"] == clean.history[0]["accuracy"]
    assert result.history[1]["loss"] != clean.history[1]["loss"]
