"""The random model sharing pool (issue 9, CN119005361B): the draw and assignment are
uniform and verified by every client, cohorts never fall below min_cohort, message sizes do
not reveal a participant's model, Clopper-Pearson bounds, the convergence test, the
elimination rule, runs in modes none and masking, kill and resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import chisquare

import secfl.strategies.pool as pool_module
from secfl.config import RunConfig, config_from_dict, load_config
from secfl.errors import ConfigError
from secfl.randomness import Randomness
from secfl.record.checkpoint import read_checkpoint
from secfl.runner import run
from secfl.strategies.pool_assign import (
    PoolAssignment,
    PoolAssignmentError,
    PoolParticipant,
    assign,
)
from secfl.strategies.pool_select import (
    Candidate,
    clopper_pearson,
    eliminate,
    has_converged,
)

from .strategies_helpers import (
    assert_same_trust_run,
    attackers_of,
    check_federation_rounds,
    check_masking_rounds,
    dealt,
    events_of,
    record_rounds,
)

MODELS = ("a", "b", "c", "d")


def _adverts(seed: int, n: int) -> list[tuple[int, bytes]]:
    return [(i, hashlib.sha256(f"{seed}/{i}".encode()).digest()) for i in range(n)]


def test_assignment_is_uniform_over_draws() -> None:
    draws = 2000
    first: Counter[str] = Counter()
    drawn: Counter[int] = Counter()
    for seed in range(draws):
        a = assign(seed, 0, _adverts(seed, 12), MODELS, models_per_round=2, min_cohort=3)
        first[a.model_of(0)] += 1
        drawn.update(a.drawn)
    # participant 0's model and the drawn models, each uniform over the four base models
    for counts, total in ((first, draws), (drawn, 2 * draws)):
        observed = [counts[m] for m in (MODELS if counts is first else range(4))]
        assert sum(observed) == total
        assert chisquare(observed).pvalue > 1e-3, observed
    # and not trivially so: a biased deal would fail the same test
    assert chisquare([first["a"] * 2, first["b"], first["c"], first["d"]]).pvalue < 1e-3


@pytest.mark.parametrize("n", [0, 2, 3, 5, 6, 7, 11, 12, 25])
@pytest.mark.parametrize("min_cohort", [1, 3, 5])
def test_every_cohort_reaches_min_cohort(n: int, min_cohort: int) -> None:
    for seed in range(5):
        a = assign(1, seed, _adverts(seed, n), MODELS, models_per_round=3, min_cohort=min_cohort)
        assert len(a.drawn) == min(3, n // min_cohort)
        assert len(set(a.drawn)) == len(a.drawn)
        assert all(len(c) >= min_cohort for c in a.cohorts)
        members = sorted(i for c in a.cohorts for i in c)
        assert members == (list(range(n)) if a.drawn else [])
        sizes = [len(c) for c in a.cohorts]
        assert not sizes or max(sizes) - min(sizes) <= 1


def _participants(n: int) -> list[PoolParticipant]:
    randomness = Randomness("seeded", 3)
    return [
        PoolParticipant(i, randomness, models=MODELS, models_per_round=2, min_cohort=3)
        for i in range(n)
    ]


def _honest(parts: list[PoolParticipant]) -> PoolAssignment:
    adverts = [p.advertise(4, 0) for p in parts]
    return assign(
        4, 0, [(a.client_id, a.key) for a in adverts], MODELS, models_per_round=2, min_cohort=3
    )


def test_clients_accept_the_honest_assignment() -> None:
    parts = _participants(9)
    a = _honest(parts)
    assert [p.verify(a) for p in parts] == [a.model_of(p.client_id) for p in parts]


def _swap_clients(a: PoolAssignment) -> PoolAssignment:
    x, y = a.cohorts[0][0], a.cohorts[1][0]
    cohorts = (
        tuple(sorted((*a.cohorts[0][1:], y))),
        tuple(sorted((*a.cohorts[1][1:], x))),
    )
    return dataclasses.replace(a, cohorts=cohorts)


def _other_models(a: PoolAssignment) -> PoolAssignment:
    unused = [i for i in range(len(MODELS)) if i not in a.drawn]
    return dataclasses.replace(a, drawn=(unused[0], *a.drawn[1:]))


def _replaced_key(a: PoolAssignment) -> PoolAssignment:
    adverts = ((a.adverts[0][0], bytes(32)), *a.adverts[1:])
    return dataclasses.replace(a, adverts=adverts)


def _dropped_key(a: PoolAssignment) -> PoolAssignment:
    # a consistent assignment without client 8's key: but 8 is still told to train
    return dataclasses.replace(a, adverts=a.adverts[:-1])


@pytest.mark.parametrize("tamper", [_swap_clients, _other_models, _replaced_key, _dropped_key])
def test_client_detects_tampered_assignment(tamper: Any) -> None:
    parts = _participants(9)
    honest = _honest(parts)
    tampered = tamper(honest)
    assert tampered != honest
    refused = 0
    for p in parts:
        try:
            p.verify(tampered)
        except PoolAssignmentError as error:
            assert "refuses the pool assignment" in str(error)
            refused += 1
    # every client recomputes the whole assignment, so every one of them refuses
    assert refused == len(parts)


def test_clopper_pearson_known_values() -> None:
    # Clopper and Pearson (1934); tabulated e.g. in Brown, Cai and DasGupta (2001)
    lo, hi = clopper_pearson(5, 10, 0.95)
    assert lo == pytest.approx(0.187086, abs=1e-6) and hi == pytest.approx(0.812914, abs=1e-6)
    assert clopper_pearson(0, 20, 0.95) == pytest.approx((0.0, 0.168433), abs=1e-6)
    assert clopper_pearson(20, 20, 0.95) == pytest.approx((0.831567, 1.0), abs=1e-6)
    # closed forms: k = 0 upper 1 - (alpha/2)^(1/n); k = 1 lower 1 - (1 - alpha/2)^(1/n);
    # k = 1, n = 10 upper p solves (1-p)^10 + 10 p (1-p)^9 = alpha/2
    lo, hi = clopper_pearson(1, 10, 0.90)
    assert lo == pytest.approx(1 - 0.95**0.1, abs=1e-9)
    assert (1 - hi) ** 10 + 10 * hi * (1 - hi) ** 9 == pytest.approx(0.05, abs=1e-9)
    assert hi == pytest.approx(0.394163, abs=1e-6)
    assert clopper_pearson(0, 20, 0.95)[1] == pytest.approx(1 - 0.025**0.05, abs=1e-9)
    with pytest.raises(ConfigError):
        clopper_pearson(11, 10, 0.95)


def test_convergence_test() -> None:
    kw = {"error_bound": 0.1, "tolerance": 0.01, "window": 3}
    assert not has_converged([], **kw)
    assert has_converged([0.5, 0.09], **kw)  # within the bound
    assert not has_converged([0.5, 0.3, 0.2], **kw)  # still moving
    assert has_converged([0.5, 0.205, 0.2, 0.199], **kw)  # moved < tolerance over 3
    assert not has_converged([0.205, 0.2], **kw)  # window not yet full


def test_elimination_removes_duplicate_and_outside_models() -> None:
    rng = np.random.default_rng(0)  # test data only
    w = rng.normal(size=500).astype(np.float32)
    candidates = [
        Candidate("best", 900, 1000, "mlp64", w),
        Candidate("twin", 895, 1000, "mlp64", (w * 1.01 + 0.01 * rng.normal(size=500))),
        Candidate("other", 890, 1000, "mlp64", rng.normal(size=500).astype(np.float32)),
        Candidate("small", 893, 1000, "mlp32", w[:200].copy()),
        Candidate("poor", 700, 1000, "mlp64", rng.normal(size=500).astype(np.float32)),
    ]
    accepted, shared, reasons, intervals = eliminate(
        candidates, confidence=0.95, duplicate_cosine=0.99
    )
    assert accepted == ["best", "twin", "other", "small"]
    assert shared == ["best", "other", "small"]
    assert "near-duplicate of 'best'" in reasons["twin"]
    assert "does not overlap" in reasons["poor"]
    assert intervals["poor"][1] < intervals["best"][0]


def _config(protection: str = "none", rounds: int = 2, **strategy: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "pool-test",
        "seed": 0,
        "rounds": rounds,
        "security": {"randomness": "seeded"},
        "data": {"dataset": "digits", "num_clients": 12, "partition": {"kind": "iid"}},
        "client": {"lr": 0.1, "epochs": 1, "batch_size": 16},
        "server": {
            "strategy": {
                "kind": "pool",
                "models": [
                    {"name": "m32", "model": {"kind": "mlp", "hidden": [32]}},
                    {"name": "m16", "model": {"kind": "mlp", "hidden": [16]}},
                    {"name": "m64", "model": {"kind": "mlp", "hidden": [64]}},
                ],
                "models_per_round": 2,
                **strategy,
            }
        },
        "aggregation": {"protection": protection, "min_cohort": 3},
        "evaluation": {"every": 1, "per_client": False},
    }
    return config_from_dict(raw)


def _quiet_run(config: RunConfig, out: Path, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(config, out, **kw)


class _SizeRecorder:
    def __init__(self, inner: Any, log: list[tuple[int, int, int]]) -> None:
        self.inner, self.log = inner, log

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies = self.inner.exchange(requests)
        for i, request in requests.items():
            reply = replies.get(i)
            self.log.append((i, len(request), -1 if reply is None else len(reply)))
        return replies


@pytest.mark.parametrize("protection", ["none", "masking"])
def test_message_sizes_do_not_reveal_the_model(
    tmp_path: Path, protection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs: dict[str, list[tuple[int, int, int]]] = {}
    original = pool_module.build_pool

    def recording(*args: Any, **kw: Any) -> Any:
        pool = original(*args, **kw)
        for fed in pool.models:
            fed.server.transport = _SizeRecorder(
                fed.server.transport, logs.setdefault(fed.name, [])
            )
        return pool

    monkeypatch.setattr(pool_module, "build_pool", recording)
    # 12 clients, 2 models of cohort 6 a round: sizes may depend on the cohort size only
    result = _quiet_run(_config(protection, rounds=3, stop_when_converged=False), tmp_path / "r")
    trained = [name for name, log in logs.items() if log]
    assert len(trained) >= 2  # the three models differ in size: 1,210 / 2,410 / 4,810 weights
    per_participant = {
        name: sorted(Counter((q, r) for _, q, r in log).items())
        for name, log in logs.items()
        if log
    }
    rounds = {
        name: sum(r["models"].get(name) is not None for r in result.history) for name in trained
    }
    # per model: the multiset of (request, reply) sizes per round trained is the same
    normalised = {
        name: sorted((size, count // rounds[name]) for size, count in per_participant[name])
        for name in trained
    }
    first = normalised[trained[0]]
    assert all(v == first for v in normalised.values()), normalised
    pool = json.loads((tmp_path / "r" / "pool.json").read_text())
    assert pool["padded_to"] == 4810


def test_smoke_runs_and_cohorts(tmp_path: Path) -> None:
    for protection in ("none", "masking"):
        out = tmp_path / protection
        result = _quiet_run(_config(protection, rounds=2), out)
        assert [r["round"] for r in result.history] == [1, 2]
        for row in result.history:
            assert len(row["drawn"]) == 2
            assert all(m["cohort"] >= 3 for m in row["models"].values())
            assert sum(m["cohort"] for m in row["models"].values()) == 12
            assert all(0.0 <= m["accuracy"] <= 1.0 for m in row["models"].values())
        pool = json.loads((out / "pool.json").read_text())
        assert set(pool["shared"]) <= set(pool["acceptable"]) <= {"m32", "m16", "m64"}
        assert pool["acceptable"]
        events = (out / "events.jsonl").read_text()
        assert '"pool_assignment"' in events and '"pool_finished"' in events


def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    config = _config("none", rounds=3, stop_when_converged=False)
    whole = _quiet_run(config, tmp_path / "whole")
    _quiet_run(config, tmp_path / "cut", stop_after=1)
    resumed = _quiet_run(config, tmp_path / "cut", resume=True)
    strip = {"time_s"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in strip} for r in whole.history
    ]
    for name in ("m32", "m16", "m64"):
        for a, b in zip(
            whole.models[name].state_dict().values(),
            resumed.models[name].state_dict().values(),
            strict=True,
        ):
            assert np.array_equal(a.numpy(), b.numpy())
    assert (tmp_path / "whole" / "pool.json").read_text() == (
        tmp_path / "cut" / "pool.json"
    ).read_text()


def test_stops_once_every_model_converged(tmp_path: Path) -> None:
    config = _config("none", rounds=6, convergence={"error_bound": 1.0})
    result = _quiet_run(config, tmp_path / "c")
    # error_bound 1: a model converges at its first evaluation; all three after a few rounds
    assert result.stopped == "every base model has converged"
    assert len(result.history) < 6
    pool = json.loads((tmp_path / "c" / "pool.json").read_text())
    assert sorted(pool["converged"]) == ["m16", "m32", "m64"]


def test_unsupported_settings_are_refused(tmp_path: Path) -> None:
    raw = _config().to_dict()
    raw["privacy"] = {"sample_level": {"noise_multiplier": 1.0, "sample_rate": 0.5}}
    with pytest.raises(ConfigError, match="privacy.sample_level"):
        _quiet_run(config_from_dict(raw), tmp_path / "x")
    with pytest.raises(ConfigError, match="models_per_round"):
        _config(models_per_round=4)


def test_bench_smoke_reports_pool_keys() -> None:
    from secfl.bench.pool import measure_pool

    figures = measure_pool(quick=True, smoke=True)
    per_seed = figures["details"]["per_seed"]["0"]
    assert figures["pool_models_converged"] == len(per_seed["converged"])
    assert figures["pool_acceptable_set_size"] == len(per_seed["acceptable"]) >= 1
    assert set(per_seed["shared"]) <= set(per_seed["acceptable"])
    assert per_seed["rounds_run"] == 3


# ---------------------------------------------------------------------------- trust per cohort


def _trust_raw(
    protection: str = "none", rounds: int = 3, trust: dict[str, Any] | None = None
) -> dict[str, Any]:
    """12 clients, two of them sign-flippers (scale -5); two models a round, cohorts of 6."""
    raw = _config(protection, rounds=rounds, stop_when_converged=False).to_dict()
    raw["trust"] = trust if trust is not None else {"defense": "vote"}
    raw["adversary"] = {"attack": "sign_flip", "count": 2}
    return raw


def _trust_config(
    protection: str = "none", rounds: int = 3, trust: dict[str, Any] | None = None
) -> RunConfig:
    return config_from_dict(_trust_raw(protection, rounds, trust))


def _cohorts(folder: Path) -> dict[tuple[int, str], list[int]]:
    """(round, model) -> the cohort the pool dealt it."""
    return dealt(folder, "pool_assignment", "cohorts")


def test_trust_flags_each_cohorts_attackers_and_keeps_them_out_of_the_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies, outcomes = record_rounds(monkeypatch)
    out = tmp_path / "r"
    _quiet_run(_trust_config("none", rounds=3), out)
    attackers = attackers_of(out)
    cohorts = _cohorts(out)
    assert len(attackers) == 2
    checked = 0
    for name, rounds in outcomes.items():
        # one adversary for the pool, each model's trust over the cohort the pool dealt it
        for agg, flagged in check_federation_rounds(
            out, name, rounds, cohorts, attackers, replies[name]
        ):
            assert flagged <= set(agg.dropped)
            checked += bool(flagged)
    assert checked >= 3  # the attackers reached at least three model rounds


def test_trust_under_masking_splits_each_cohort_and_resumes_exactly(tmp_path: Path) -> None:
    config = _trust_config(
        "masking", rounds=5, trust={"defense": "vote", "suspicion": {"bound": 3.0}}
    )
    whole = _quiet_run(config, tmp_path / "whole")
    out = tmp_path / "whole"
    attackers = attackers_of(out)
    cohorts = _cohorts(out)
    flagged_members: set[int] = set()
    for name in ("m32", "m16", "m64"):
        flagged_members |= check_masking_rounds(out / "tasks" / name, cohorts, name, attackers)
    assert attackers <= flagged_members
    # suspicion is per client across the pool: both attackers reach the bound (3 flags, in
    # any models) and are left out before the assignment of every later round
    excluded = {e["client"]: e["round"] for e in events_of(out, "trust_excluded")}
    assert set(excluded) == attackers
    for (round_index, _), cohort in cohorts.items():
        assert not {c for c, r in excluded.items() if r <= round_index} & set(cohort)

    _quiet_run(config, tmp_path / "cut", stop_after=2)
    resumed = _quiet_run(config, tmp_path / "cut", resume=True)
    _assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "cut")


def test_trust_under_ckks_flags_from_the_cohorts_scalars(tmp_path: Path) -> None:
    raw = _trust_raw("ckks", rounds=1)
    raw["data"]["num_clients"] = 6
    raw["server"]["strategy"]["models"] = raw["server"]["strategy"]["models"][:2]
    raw["server"]["strategy"]["models_per_round"] = 1
    raw["aggregation"]["ckks"] = {"preset": "trust"}
    raw["adversary"]["count"] = 1
    out = tmp_path / "r"
    _quiet_run(config_from_dict(raw), out)
    ((_, name), cohort), *_ = _cohorts(out).items()
    folder = out / "tasks" / name
    attackers = attackers_of(out)
    assert attackers_of(folder) == attackers and attackers <= set(cohort)
    assert {e["client"] for e in events_of(folder, "trust_flag")} == attackers
    (done,) = events_of(folder, "round_completed")
    assert done["survivors"] == sorted(set(cohort) - attackers)
    dropped = {e["client"] for e in events_of(folder, "client_dropped") if e["stage"] == "trust"}
    assert dropped == attackers


def _assert_same_run(whole: Any, resumed: Any, a: Path, b: Path) -> None:
    assert_same_trust_run(whole, resumed, a, b, ("m32", "m16", "m64"), "pool_assignment")
    assert (a / "pool.json").read_text() == (b / "pool.json").read_text()


def test_kill_and_resume_with_trust_is_bit_identical(tmp_path: Path) -> None:
    # centered clipping keeps a centre per base model (checkpoint arrays NAME.trust.center)
    # beside the per-client reputations shared by the pool
    config = _trust_config("none", rounds=4, trust={"defense": "centered_clipping"})
    whole = _quiet_run(config, tmp_path / "whole")
    _quiet_run(config, tmp_path / "cut", stop_after=2)
    resumed = _quiet_run(config, tmp_path / "cut", resume=True)
    _assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "cut")
    saved = read_checkpoint(tmp_path / "cut", expected_fingerprint=config.fingerprint())
    assert {k for k in saved.arrays if ".trust." in k} == {
        f"{n}.trust.center" for n in ("m32", "m16", "m64")
    }
    assert saved.state["trust"]["defense"] == "centered_clipping"


def test_pool_trust_refusals(tmp_path: Path) -> None:
    raw = _trust_raw()
    raw["refine"] = {"shared": {}}
    with pytest.raises(ConfigError, match=r"'pool' does not support \['refine'\].*allowed"):
        _quiet_run(config_from_dict(raw), tmp_path / "refine")
    raw = _trust_raw("masking", trust={"defense": "median"})
    with pytest.raises(ConfigError, match="allowed: vote"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="needs the evaluation keys of preset 'trust'"):
        _trust_config("ckks")


def test_pool_trust_example_and_the_single_subcohort_notice() -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    example = load_config(root / "digits_pool_trust.yaml")
    strategy = pool_module.check_pool_config(example)
    assert example.trust is not None and example.adversary is not None
    assert example.aggregation.protection == "masking"
    # 30 clients, 2 models a round: cohorts of 15, three sub-cohorts of 5 each
    assert pool_module.single_subcohort_notice(example, strategy) is None
    small = _trust_config("masking").with_overrides(**{"aggregation.min_cohort": 4})
    notice = pool_module.single_subcohort_notice(small, pool_module.check_pool_config(small))
    assert notice is not None and "cohorts of at least 6" in notice and "single candidate" in notice
    plain = _trust_config("none").with_overrides(**{"aggregation.min_cohort": 4})
    assert pool_module.single_subcohort_notice(plain, pool_module.check_pool_config(plain)) is None
