"""The trust module: baselines with known answers, the vote under collusion, flagging that
keeps flagged updates out of the sum, reputation, resume exactness, config errors, a run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import secfl.runner
from secfl.audit.events import EventLog, read_events
from secfl.config import RunConfig, TrustConfig
from secfl.errors import CheckpointError, ConfigError
from secfl.messages import FitIns, FitRes
from secfl.privacy.central import CentralGaussianMechanism
from secfl.randomness import Randomness
from secfl.runner import run
from secfl.server.protection import PlaintextProtection, RoundContext
from secfl.transport.base import Transport
from secfl.trust import (
    Reputation,
    TrustModule,
    centered_clipping,
    coordinate_median,
    decide_by_vote,
    find_sybil_clusters,
    fltrust,
    krum,
    multi_krum,
    trimmed_mean,
)
from secfl.trust.flag import cosine_matrix
from secfl.wire import decode_message
from tests.conftest import small_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ---------------------------------------------------------------------------- baselines


def test_median_and_trimmed_mean_known_answers() -> None:
    x = np.array([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0], [-50.0, 2.0]])
    assert coordinate_median(x).aggregate.tolist() == [2.0, 1.0]
    # beta 0.2 of 5 rows: drop 1 largest and 1 smallest per coordinate
    assert trimmed_mean(x, beta=0.2).aggregate.tolist() == [2.0, 1.0]
    # 10 rows: per coordinate, sorted, drop 2 each side
    y = np.arange(10.0)[:, None] * np.array([[1.0, -1.0]])
    assert trimmed_mean(y, beta=0.2).aggregate.tolist() == [4.5, -4.5]
    assert trimmed_mean(y, beta=0.0).aggregate.tolist() == [4.5, -4.5]


def test_krum_picks_the_central_point_and_multi_krum_averages_the_best() -> None:
    honest = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    x = np.vstack([honest, [[50.0, 50.0], [60.0, 40.0]]])
    result = krum(x, f=2)
    assert result.selected == (0,) and result.aggregate.tolist() == [0.0, 0.0]
    assert set(result.excluded) == {1, 2, 3, 4, 5, 6}
    # n - f - 2 = 3 nearest neighbours: the centre's score is 1 + 1 + 1
    assert result.scores is not None and result.scores[0] == pytest.approx(3.0)
    weights = np.array([1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    mk = multi_krum(x, weights, f=2)  # m = n - f = 5: the honest rows
    assert mk.selected == (0, 1, 2, 3, 4)
    assert mk.aggregate.tolist() == pytest.approx([2.0 / 7.0, 0.0])


def test_fltrust_weights_are_relu_cosine_and_rows_rescaled_to_the_reference() -> None:
    g0 = np.array([2.0, 0.0])
    x = np.array([[10.0, 0.0], [1.0, 1.0], [-3.0, 0.0], [0.0, 5.0]])
    result = fltrust(x, reference=g0)
    assert result.scores is not None
    assert result.scores.tolist() == pytest.approx([1.0, np.sqrt(0.5), 0.0, 0.0])
    assert result.selected == (0, 1)
    assert set(result.excluded) == {2, 3}
    s = np.sqrt(0.5)
    expected = (1.0 * np.array([2.0, 0.0]) + s * np.array([np.sqrt(2), np.sqrt(2)])) / (1 + s)
    assert result.aggregate.tolist() == pytest.approx(expected.tolist())
    none = fltrust(-x[:1], reference=g0)
    assert none.selected == () and none.aggregate.tolist() == [0.0, 0.0]


def test_centered_clipping_bounds_each_pull_to_tau() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]])
    out = centered_clipping(x, center=np.zeros(2), tau=1.0, iterations=1)
    # every row is at distance >= 1 from the centre: each contributes a unit vector
    assert out.aggregate.tolist() == pytest.approx([2.0 / 3.0, 1.0 / 3.0])
    many = centered_clipping(x, center=np.zeros(2), tau=1.0, iterations=50)
    assert np.linalg.norm(many.aggregate) < 3.0  # the outlier cannot drag it far


# ---------------------------------------------------------------------------- vote


def _round(
    rng: np.random.Generator, *, d: int = 200, honest: int = 6, malicious: int = 4
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """A reference direction; honest updates spread around it (non-IID-like: cosine with
    the reference about 0.4-0.8); the last ``malicious`` ids send one identical vector."""
    reference = rng.normal(size=d)
    reference /= np.linalg.norm(reference)
    updates = {}
    for i in range(honest):
        drift = rng.normal(size=d) / np.sqrt(d) * rng.uniform(0.6, 1.6)
        updates[i] = (reference + drift).astype(np.float32) * np.float32(rng.uniform(0.7, 1.3))
    evil = (-2.0 * reference + 0.3 * rng.normal(size=d) / np.sqrt(d)).astype(np.float32)
    for i in range(honest, honest + malicious):
        updates[i] = evil.copy()
    return updates, (0.5 * reference + 0.2 * rng.normal(size=d) / np.sqrt(d))


def _config(**trust: Any) -> TrustConfig:
    config = small_config().with_overrides(trust=trust).trust
    assert config is not None
    return config


def test_colluders_are_never_elected_and_are_flagged() -> None:
    rng = np.random.default_rng(1)
    honest_flagged = 0
    for _ in range(30):
        updates, reference = _round(rng)
        weights = dict.fromkeys(updates, 100.0)
        decision = decide_by_vote(
            updates, weights, reference=reference, reputation={}, config=_config()
        )
        assert decision.trusted_party is not None and decision.trusted_party < 6
        assert {6, 7, 8, 9} <= set(decision.flagged)
        assert [6, 7, 8, 9] in decision.sybil_clusters
        honest_flagged += sum(c < 6 for c in decision.flagged)
    assert honest_flagged / (30 * 6) <= 0.10


def test_colluders_with_distinct_opposing_vectors_lose_the_vote() -> None:
    """Not identical (so no Sybil cluster), each malicious update close to the others: the
    naive peer vote would favour them; the reference does not."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        updates, reference = _round(rng)
        base = updates[6]
        for i in range(6, 10):
            updates[i] = base + (0.05 * rng.normal(size=base.size)).astype(np.float32)
        config = _config(sybil={"cosine": 0.9999})
        decision = decide_by_vote(
            updates, dict.fromkeys(updates, 1.0), reference=reference, reputation={}, config=config
        )
        assert not decision.sybil_clusters
        assert decision.trusted_party is not None and decision.trusted_party < 6
        assert {6, 7, 8, 9} <= set(decision.flagged)
        # a naive nearest-neighbour vote (mean cosine to the 3 closest peers) elects one
        pairs = cosine_matrix(np.stack([updates[c] for c in sorted(updates)]))
        np.fill_diagonal(pairs, -np.inf)
        naive = np.sort(pairs, axis=1)[:, -3:].mean(axis=1)
        assert int(np.argmax(naive)) >= 6


def test_boosted_colluders_who_are_most_of_the_vouched_rows_are_still_flagged() -> None:
    """Late in training: honest updates nearly orthogonal to the reference (two of them at
    cosine <= 0), four distinct boosted colluders at a small positive cosine. The vouched
    rows are then mostly colluders; estimated on them alone the norm-ratio bound sits at
    the colluders' norm and keeps them (the defect measured with the backdoor). The whole
    round's median is honest, so its bound is used and all four are flagged."""
    rng = np.random.default_rng(7)
    d = 400
    reference = rng.normal(size=d)
    reference /= np.linalg.norm(reference)
    noise = rng.normal(size=(10, d))
    noise -= np.outer(noise @ reference, reference)  # orthogonal to the reference
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    updates: dict[int, np.ndarray] = {}
    honest_cosine = [0.5, 0.4, 0.3, 0.2, -0.05, -0.1]  # rows 0-5; 4 and 5 not vouched
    for i, c in enumerate(honest_cosine):
        norm = rng.uniform(0.8, 1.2)
        updates[i] = (norm * (c * reference + np.sqrt(1 - c * c) * noise[i])).astype(np.float32)
    for i in range(6, 10):  # colluders: cosine 0.06, norm about 40 times the honest
        updates[i] = (40.0 * (0.06 * reference + np.sqrt(1 - 0.0036) * noise[i])).astype(np.float32)
    decision = decide_by_vote(
        updates, dict.fromkeys(updates, 1.0), reference=reference, reputation={}, config=_config()
    )
    assert decision.trusted_party == 0
    assert {6, 7, 8, 9} <= set(decision.flagged)
    assert all("norm_ratio" in decision.flagged[c] for c in (6, 7, 8, 9))
    assert "whole round" in str(decision.thresholds["norm_ratio"]["how"])
    assert not {1, 2, 3} & set(decision.flagged)
    # the earlier rule (bounds from the vouched rows 1, 2, 3, 6, 7, 8, 9 alone) kept them
    vouched = np.array([c in (1, 2, 3, 6, 7, 8, 9) for c in range(10)])
    ratios = np.array([np.linalg.norm(updates[c]) / np.linalg.norm(updates[0]) for c in range(10)])
    sample = ratios[vouched]
    centre = np.median(sample)
    spread = max(1.4826 * np.median(np.abs(sample - centre)), 0.1 * centre)
    assert ratios[6:].max() < centre + 4.0 * spread


def test_sybils_agreeing_with_the_reference_are_caught_by_duplication() -> None:
    """ALIE-style colluders send one vector close to the honest mean (high reference
    cosine); only near-duplicate detection separates them."""
    rng = np.random.default_rng(3)
    updates, reference = _round(rng)
    mean = np.mean([updates[i] for i in range(6)], axis=0)
    for i in range(6, 10):
        updates[i] = mean.astype(np.float32)
    decision = decide_by_vote(
        updates, dict.fromkeys(updates, 1.0), reference=reference, reputation={}, config=_config()
    )
    assert decision.sybil_clusters == [[6, 7, 8, 9]]
    assert decision.trusted_party is not None and decision.trusted_party < 6
    assert all("Sybil" in decision.flagged[c] for c in (6, 7, 8, 9))
    assert find_sybil_clusters(cosine_matrix(np.eye(3)), 0.99) == []


def test_fixed_thresholds_and_reputation_in_the_vote() -> None:
    rng = np.random.default_rng(4)
    updates, reference = _round(rng, malicious=0)
    config = _config(threshold={"kind": "fixed", "cosine_min": 0.999})
    decision = decide_by_vote(
        updates, dict.fromkeys(updates, 1.0), reference=reference, reputation={}, config=config
    )
    # everybody but the trusted party is below a cosine of 0.999 with it
    assert set(decision.flagged) == set(updates) - {decision.trusted_party}
    assert all("cosine" in r and "fixed" in r for r in decision.flagged.values())
    # a trusted party with no reputation left loses the election
    first = decision.trusted_party
    assert first is not None
    again = decide_by_vote(
        updates,
        dict.fromkeys(updates, 1.0),
        reference=reference,
        reputation={first: 0.0},
        config=_config(vote={"weights": {"reputation": 10.0}}),
    )
    assert again.trusted_party != first


# ---------------------------------------------------------------------------- in the sum


class _FakeClients:
    """Answers a broadcast with given updates (a stand-in for trained clients)."""

    def __init__(self, updates: Mapping[int, np.ndarray]) -> None:
        self.updates = updates

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        out: dict[int, bytes | None] = {}
        for cid, payload in requests.items():
            ins = decode_message(payload)
            assert isinstance(ins, FitIns)
            res = FitRes(
                ins.round, ins.attempt, cid, ins.model_hash, 50 + cid, 0.5, self.updates[cid]
            )
            out[cid] = res.to_bytes()
        return out


def _ctx(tmp_path: Path, size: int) -> RoundContext:
    weights = np.zeros(size, dtype=np.float32)
    from secfl.encode.flatten import model_hash

    tmp_path.mkdir(parents=True, exist_ok=True)
    return RoundContext(
        round=1,
        attempt=0,
        broadcast=FitIns(1, 0, model_hash(weights), weights),
        model_size=size,
        randomness=Randomness("seeded", 3),
        events=EventLog(tmp_path / "events.jsonl"),
    )


@pytest.mark.parametrize("with_dp", [False, True])
def test_flagged_participants_never_reach_the_sum(tmp_path: Path, with_dp: bool) -> None:
    updates, reference = _round(np.random.default_rng(5))
    module = TrustModule(_config(), reference=lambda *_a, **_k: reference)
    dp = (
        CentralGaussianMechanism(0.5, 2.0, "uniform", 1.0, 1.0, 10.0, 1.0, "none")
        if with_dp
        else None
    )
    ctx = _ctx(tmp_path / "a", 200)
    defended = PlaintextProtection(dp, trust=module).aggregate(
        _FakeClients(updates), list(updates), ctx
    )
    assert defended is not None
    assert set(defended.dropped) == {6, 7, 8, 9}
    assert all(c not in defended.survivors for c in defended.dropped)
    # the same round where only the kept clients had replied: bit-identical release
    kept = {c: updates[c] for c in defended.survivors}
    plain = PlaintextProtection(dp).aggregate(
        _FakeClients(kept), list(kept), _ctx(tmp_path / "b", 200)
    )
    assert plain is not None
    assert np.array_equal(defended.mean_update, plain.mean_update)
    assert defended.total_weight == plain.total_weight
    ctx.events.close()
    events = read_events(ctx.events.path)
    flags = [e for e in events if e["event"] == "trust_flag"]
    assert sorted(e["client"] for e in flags) == [6, 7, 8, 9]
    assert all(e["reason"] and "threshold" in e for e in flags)
    dropped = [e for e in events if e["event"] == "client_dropped" and e["stage"] == "trust"]
    assert len(dropped) == 4
    vote = next(e for e in events if e["event"] == "trust_vote")
    assert vote["trusted_party"] == defended.survivors[0] or vote["trusted_party"] < 6
    kept_event = next(e for e in events if e["event"] == "trust_kept")
    assert sorted(int(c) for c in kept_event["clients"]) == list(defended.survivors)


# ---------------------------------------------------------------------------- reputation


def test_reputation_decays_when_flagged_and_recovers_slowly() -> None:
    rep = Reputation(initial=1.0, decay=0.5, recovery=0.1)
    rep.update(kept=[1, 2], flagged=[3])
    assert (rep.of(1), rep.of(3), rep.of(9)) == (1.0, 0.5, 1.0)
    rep.update(kept=[3], flagged=[1, 3])
    assert rep.of(3) == 0.25 and rep.of(1) == 0.5
    for _ in range(3):
        rep.update(kept=[3], flagged=[])
    assert rep.of(3) == pytest.approx(0.55)
    copy = Reputation(initial=1.0, decay=0.5, recovery=0.1)
    copy.load_state(rep.state())
    assert copy.state() == rep.state() and copy.of(3) == rep.of(3)
    with pytest.raises(CheckpointError):
        copy.load_state({"values": {"1": 2.0}})
    with pytest.raises(ConfigError, match=r"trust\.reputation\.decay"):
        Reputation(decay=1.5)


class _SignFlip:
    """Test-local attacker: clients in ``malicious`` send their update times -4."""

    def __init__(self, inner: Transport, malicious: set[int]) -> None:
        self.inner = inner
        self.malicious = malicious

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies = self.inner.exchange(requests)
        for cid in self.malicious & set(replies):
            raw = replies[cid]
            if raw is None:
                continue
            res = decode_message(raw)
            if isinstance(res, FitRes):
                bad = (np.float32(-4.0) * res.update).astype(np.float32)
                replies[cid] = FitRes(
                    res.round, res.attempt, res.client_id, res.model_hash,
                    res.num_samples, res.train_loss, bad,
                ).to_bytes()  # fmt: skip
        return replies


def _with_attackers(monkeypatch: pytest.MonkeyPatch, malicious: set[int]) -> None:
    original: Callable[..., Transport] = secfl.runner.with_simulated_dropouts

    def wrapped(*args: Any, **kwargs: Any) -> Transport:
        return _SignFlip(original(*args, **kwargs), malicious)

    monkeypatch.setattr(secfl.runner, "with_simulated_dropouts", wrapped)


def _run_config(**trust: Any) -> RunConfig:
    return small_config(
        rounds=4,
        **{
            "data.num_clients": 8,
            "client.lr": 0.1,
            "client.epochs": 2,
            "evaluation.per_client": False,
        },
    ).with_overrides(trust=trust)


def _trust_events(folder: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k not in ("seq", "time")}
        for e in read_events(folder / "events.jsonl")
        if e["event"].startswith("trust_")
    ]


@pytest.mark.parametrize("defense", ["vote", "centered_clipping", "vote-reset"])
def test_kill_and_resume_keeps_trust_state_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defense: str
) -> None:
    _with_attackers(monkeypatch, {5, 6, 7})
    if defense == "vote-reset":  # the post-aggregation reset of trust.dormant, stateless
        config = _run_config(defense="vote", dormant={"reset": "always"})
        defense = "vote"
    else:
        config = _run_config(defense=defense)
    whole = run(config, tmp_path / "whole")
    run(config, tmp_path / "split", stop_after=2)
    resumed = run(config, tmp_path / "split", resume=True)

    def strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in history]

    assert strip(resumed.history) == strip(whole.history)
    assert _trust_events(tmp_path / "split") == _trust_events(tmp_path / "whole")
    if defense == "vote":
        flags = [e for e in _trust_events(tmp_path / "whole") if e["event"] == "trust_flag"]
        assert {e["client"] for e in flags} >= {5, 6, 7}
        # attackers flagged in every round: reputation 0.5^4 at the end
        last = [e for e in flags if e["round"] == 4 and e["client"] == 5]
        assert last and last[0]["reputation"] == 0.5**4


# ---------------------------------------------------------------------------- config


def test_trust_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown rule 'nearest'"):
        _config(vote={"rules": ["reference", "nearest"]})
    with pytest.raises(ConfigError, match=r"trust.vote.weights names 'peer'"):
        _config(vote={"rules": ["reference"], "weights": {"peer": 1.0}})
    with pytest.raises(ConfigError, match=r"kind 'fixed' needs at least one"):
        _config(threshold={"kind": "fixed"})
    with pytest.raises(ConfigError, match=r"need kind 'fixed'"):
        _config(threshold={"kind": "mad", "cosine_min": 0.1})
    with pytest.raises(ConfigError, match=r"unknown key 'trust.vote.rulez'"):
        _config(vote={"rulez": []})
    with pytest.raises(ConfigError, match=r"trust.defense"):
        _config(defense="bulyan")
    with pytest.raises(ConfigError, match=r"trust.reputation.decay"):
        _config(reputation={"decay": 1.0})
    with pytest.raises(ConfigError, match=r"trust.compare.metrics"):
        _config(compare={"metrics": []})


# masking: tests/test_trust_masking.py; ckks: tests/test_trust_ckks.py


def test_build_refusals(tmp_path: Path) -> None:
    dp = {"user_level": {"noise_multiplier": 1.0, "delta": 1e-3}}
    config = small_config(privacy=dp).with_overrides(trust={"defense": "median"})
    with pytest.raises(ConfigError, match=r"trust.defense='median' with privacy.user_level"):
        run(config, tmp_path / "a")
    config = small_config(**{"data.shared.per_class": 0}).with_overrides(trust={})
    with pytest.raises(ConfigError, match=r"data.shared.per_class=0"):
        run(config, tmp_path / "b")


# ---------------------------------------------------------------------------- end to end


def test_trust_keeps_clean_accuracy_and_resists_sign_flip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = small_config(
        rounds=6,
        **{
            "data.num_clients": 8,
            "client.lr": 0.1,
            "client.epochs": 3,
            "evaluation.per_client": False,
            "evaluation.every": 6,
        },
    )
    clean = run(base, tmp_path / "clean").history[-1]["accuracy"]
    defended = run(base.with_overrides(trust={}), tmp_path / "trust").history[-1]["accuracy"]
    assert clean > 0.85
    assert abs(clean - defended) <= 0.01
    _with_attackers(monkeypatch, {5, 6, 7})
    attacked = run(base, tmp_path / "attacked").history[-1]["accuracy"]
    under_attack = run(base.with_overrides(trust={}), tmp_path / "both").history[-1]["accuracy"]
    assert attacked < clean - 0.3  # the attack works without the defense ...
    assert under_attack >= clean - 0.05  # ... and not with it


# ---------------------------------------------------------------------------- dormant units


def _dormant_setup() -> tuple[Callable[[], Any], Any, np.ndarray]:
    """An MLP on 6 features whose public shared records never use features 0 and 1, with a
    planted backdoor: feature 0 (the trigger) drives hidden unit 0, which votes class 0."""
    import torch

    from secfl.data.datasets import Dataset
    from secfl.encode.flatten import flatten_parameters
    from secfl.models.zoo import MLP

    def factory() -> Any:
        torch.manual_seed(0)
        return MLP(6, [8], 3, "relu")

    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 1.0, size=(30, 6)).astype(np.float32)
    x[:, :2] = 0.0
    y = np.argmax(x[:, 2:5], axis=1).astype(np.int64)
    shared = Dataset("shared", x, y, 3)
    model = factory()
    with torch.no_grad():
        first, last = model.net[1], model.net[3]
        first.weight[0, :] = 0.0
        first.weight[0, 0] = 20.0
        first.bias[0] = 0.0
        last.weight[:, 0] = torch.tensor([20.0, -20.0, -20.0])
    return factory, shared, flatten_parameters(model)


def _predict(factory: Callable[[], Any], weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    import torch

    from secfl.encode.flatten import load_parameters

    model = factory()
    load_parameters(model, weights)
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(dim=1).numpy()


def test_dormant_reset_removes_a_trigger_on_unused_inputs_and_keeps_the_shared_answers() -> None:
    from secfl.trust.prune import DormantPruner, dormant_units

    assert dormant_units(np.array([0.0, 0.01, 0.5, 1.0, 0.4]), 0.05).tolist() == [0, 1]
    factory, shared, weights = _dormant_setup()
    triggered = shared.x.copy()
    triggered[:, 0] = 1.0
    before = _predict(factory, weights, shared.x)
    assert (_predict(factory, weights, triggered) == 0).all()  # the backdoor works
    pruned = weights.copy()
    report = DormantPruner(factory, shared, tau=0.05).prune(pruned)
    assert report.units == {0: [0, 1]} and report.zeroed == 15 and report.removed_norm > 20
    # the trigger no longer moves any answer, the shared answers are unchanged
    assert np.array_equal(_predict(factory, pruned, triggered), before)
    assert np.array_equal(_predict(factory, pruned, shared.x), before)
    assert (before != 0).any()
    changed = np.flatnonzero(pruned != weights)
    assert changed.size and np.all(pruned[changed] == 0)
    # only the weights fed by features 0 and 1 of the first layer may change
    mask = DormantPruner(factory, shared, tau=0.05).mask(weights)
    assert mask.sum() == 16 and set(changed) <= set(np.flatnonzero(mask))


def _dormant_updates(weights: np.ndarray, mask: np.ndarray) -> dict[int, np.ndarray]:
    """Six honest updates that leave the dormant-fed weights alone, two poisoned ones with
    about a third of their norm there and an honest-looking update elsewhere."""
    rng = np.random.default_rng(3)
    direction = rng.normal(size=weights.size).astype(np.float32)
    direction[mask] = 0.0
    updates = {}
    for c in range(8):
        u = direction * np.float32(rng.uniform(0.8, 1.2))
        u += (
            np.float32(rng.uniform(0.6, 1.0))
            * rng.normal(size=weights.size).astype(np.float32)
            * ~mask
        )
        if c >= 6:
            poison = rng.normal(size=int(mask.sum()))
            u[mask] = 0.35 * np.linalg.norm(u) * poison / np.linalg.norm(poison)
        updates[c] = u.astype(np.float32)
    return updates


@pytest.mark.parametrize("flag_share", [0.15, None])
def test_dormant_flag_keeps_poisoned_updates_out_of_the_sum(
    tmp_path: Path, flag_share: float | None
) -> None:
    from secfl.trust.prune import DormantPruner

    factory, shared, weights = _dormant_setup()
    pruner = DormantPruner(factory, shared)
    mask = pruner.mask(weights)
    updates = _dormant_updates(weights, mask)
    config = _config(dormant={"flag_share": flag_share}, vote={"rules": ["peer", "reputation"]})
    module = TrustModule(config, pruner=pruner)
    events = EventLog(tmp_path / "events.jsonl")
    decision = module.defend(
        updates,
        dict.fromkeys(updates, 10.0),
        global_weights=weights,
        round_index=1,
        attempt=0,
        events=events,
    )
    if flag_share is None:  # the other rules alone keep them: the flag does the work
        assert {6, 7} <= set(decision.kept)
        return
    assert set(decision.flagged) == {6, 7} and decision.kept == (0, 1, 2, 3, 4, 5)
    assert all("dormant" in r for r in decision.flagged.values())
    assert decision.trusted_party not in (6, 7)
    assert decision.metrics[6]["dormant_share"] > 0.15 >= decision.metrics[0]["dormant_share"]
    honest = np.mean([updates[c] for c in range(6)], axis=0)
    assert np.allclose(decision.mean_update, honest, atol=1e-6)
    # sub-cohorts (masking): a sub-cohort whose mean carries a poisoned update is flagged
    cohorts = {
        0: ((0, 1, 2), np.mean([updates[c] for c in (0, 1, 2)], axis=0), 30.0),
        1: ((3, 4, 5), np.mean([updates[c] for c in (3, 4, 5)], axis=0), 30.0),
        2: ((6, 0, 1), np.mean([updates[c] for c in (6, 6, 6)], axis=0), 30.0),
    }
    decided = module.defend_cohorts(
        cohorts, global_weights=weights, round_index=2, attempt=0, events=events
    )
    assert set(decided.flagged) == {2} and "dormant" in decided.flagged[2]
    assert module.suspicion.of(6) > 0 and module.suspicion.of(3) == 0


def test_dormant_reset_after_the_round_is_logged_and_switchable(tmp_path: Path) -> None:
    from secfl.trust.prune import DormantPruner

    factory, shared, weights = _dormant_setup()
    events = EventLog(tmp_path / "events.jsonl")
    for reset in (False, True):
        module = TrustModule(
            _config(),
            reset=reset,
            reference=lambda *_a, **_k: weights,
            pruner=DormantPruner(factory, shared),
        )
        current = weights.copy()
        module.after_round(current, round_index=1, attempt=0, events=events)
        assert np.array_equal(current, weights) is not reset
    events.close()
    logged = [e for e in read_events(events.path) if e["event"] == "trust_prune"]
    assert len(logged) == 1 and logged[0]["layers"] == {"0": [0, 1]} and logged[0]["zeroed"] == 15


@pytest.mark.parametrize(
    ("reset", "protection", "active"),
    [("masking", "masking", True), ("masking", "none", False), ("always", "none", True)],
)
def test_dormant_reset_default_acts_under_masking_only(
    tmp_path: Path, reset: str, protection: str, active: bool
) -> None:
    from secfl.trust import build_trust

    factory, shared, _ = _dormant_setup()
    config = small_config(**{"aggregation.protection": protection}).with_overrides(
        trust={"dormant": {"reset": reset}}
    )
    module = build_trust(
        config,
        model_factory=factory,
        shared=shared,
        randomness=Randomness("seeded", 0),
        events=EventLog(tmp_path / "events.jsonl"),
    )
    assert module is not None and module.reset is active
