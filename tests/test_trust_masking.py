"""The trust module under masking: sub-cohorts split by a hash of every advertised key and
checked by every client, one securely aggregated sum per sub-cohort, a vote over sub-cohort
means, per-client suspicion across rounds, and exact kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import secfl.secagg.server as secagg_server
from secfl.audit.events import EventLog, read_events
from secfl.config import MaskingConfig, TrustConfig
from secfl.errors import ConfigError, SecAggAbort
from secfl.messages import FitIns
from secfl.privacy.distributed import DistributedNoise, user_level_mechanism
from secfl.randomness import Randomness
from secfl.runner import run
from secfl.secagg import messages as m
from secfl.secagg.encoding import client_weight, encode_reference
from secfl.secagg.graph import cohort_seed, split_cohorts
from secfl.secagg.params import derive_params
from secfl.secagg.simulation import MaskingProtection
from secfl.server.protection import RoundContext
from secfl.trust.defense import TrustModule
from tests.conftest import small_config
from tests.test_secagg_protocol import Federation


class CohortFederation(Federation):
    """The protocol harness with sub-cohorts on (every party derives the split itself)."""

    #: User-level DP shares (set, then rebuild the clients with ``make_client``).
    noise: DistributedNoise | None = None

    def party_options(self) -> dict[str, Any]:
        return {"noise": self.noise, "cohorts": True}

    def cohort_raw_sum(self, survivors: tuple[int, ...]) -> np.ndarray:
        params = derive_params(
            self.masking, n=len(self.ids), min_cohort=self.min_cohort, cohorts=True
        )
        total = np.zeros(self.d + 1, dtype=np.uint64)
        for i in survivors:
            update, samples = self.updates[i]
            seed = self.randomness.stream(
                "secagg.rounding", round_index=1, attempt=0, party=f"client:{i}"
            ).bytes(32)
            total += encode_reference(params, update, client_weight(params, samples), seed).astype(
                np.uint64
            )
        return total & np.uint64((1 << params.bits) - 1)


# ---------------------------------------------------------------------------- the split


def test_split_is_balanced_and_a_deterministic_function_of_all_keys() -> None:
    ids = list(range(3, 26))  # 23 clients
    keys = [(i, bytes([i]) * 32, bytes([i + 100]) * 32) for i in ids]
    seed = cohort_seed(4, 0, keys)
    split = split_cohorts(ids, 5, seed)
    assert len(split) == 4  # floor(23 / 5)
    assert sorted(len(b) for b in split) == [5, 6, 6, 6]
    assert sorted(c for b in split for c in b) == ids
    assert split == split_cohorts(ids, 5, cohort_seed(4, 0, list(reversed(keys))))
    # one changed key (or another round or attempt) gives another split
    other = [*keys[:-1], (25, bytes(32), bytes([7]) * 32)]
    assert split != split_cohorts(ids, 5, cohort_seed(4, 0, other))
    assert split != split_cohorts(ids, 5, cohort_seed(4, 1, keys))


def test_clients_derive_the_servers_split_and_each_sum_is_its_survivors() -> None:
    fed = CohortFederation(14, 9, MaskingConfig(), min_cohort=3, seed=3)
    srv = fed.server()
    # dropouts inside two sub-cohorts, below and above their thresholds are found below
    fed.run({"masked_input": {0}, "unmask": {1}}, server=srv)
    result = srv.result
    assert result is not None
    assert len(srv.cohorts) == 4 and all(len(b) >= 3 for b in srv.cohorts)
    for j, block in enumerate(srv.cohorts):
        for c in block:
            client = fed.clients[c]
            if client.cohort:  # wiped clients keep their view until the next round
                assert client.cohort == block and client.cohort_index == j
    revealed = {part.index: part for part in result.cohorts}
    for j, block in enumerate(srv.cohorts):
        if j in srv.failed_cohorts:
            assert j not in revealed
            continue
        part = revealed[j]
        assert part.survivors == tuple(c for c in block if c != 0)
        # exact: the sub-cohort's unmasked integer sum is its survivors' encodings
        assert np.array_equal(part.raw_sum.astype(np.uint64), fed.cohort_raw_sum(part.survivors))
        weights = {i: min(fed.updates[i][1], 1024) for i in part.survivors}
        plain = sum(
            weights[i] * np.clip(fed.updates[i][0].astype(np.float64), -1, 1)
            for i in part.survivors
        ) / sum(weights.values())
        unit = 2.0**15
        bound = len(part.survivors) / (unit * part.total_weight) + 1e-6
        assert np.abs(part.mean_update - plain).max() <= bound
    # the totals add the revealed sub-cohorts
    assert result.survivors == tuple(sorted(c for p in result.cohorts for c in p.survivors))


def test_a_subcohort_below_its_threshold_fails_alone() -> None:
    fed = CohortFederation(12, 5, MaskingConfig(), min_cohort=3, seed=1)
    srv = fed.server()
    while srv.stage != "masked_input":
        srv.receive({c: fed.deliver(c, p) for c, p in srv.requests().items()})
    victim = srv.cohorts[2]  # t_g = 3 = its size: one dropout fails it
    fed.run({"masked_input": {victim[0]}}, server=srv)
    assert srv.result is not None
    assert 2 in srv.failed_cohorts and "sub-cohort 2 below threshold" in srv.failed_cohorts[2]
    assert [p.index for p in srv.result.cohorts] == [0, 1, 3]
    assert set(victim) <= set(srv.result.dropped)
    assert not set(victim) & set(srv.result.survivors)


def test_a_server_routing_outside_the_split_is_refused() -> None:
    fed = CohortFederation(9, 4, MaskingConfig(), min_cohort=3)
    srv = fed.server()
    while srv.stage != "masked_input":
        srv.receive({c: fed.deliver(c, p) for c, p in srv.requests().items()})
    outsider = next(c for c in fed.ids if c not in srv.cohorts[0])
    target = srv.cohorts[0][0]
    payload = srv.requests()[target]
    msg = m.MaskedInputIns.from_bytes(payload)
    senders = tuple(sorted((*msg.senders, outsider)))
    blob = b"".join(
        bytes(m.SHARE_CIPHERTEXT_BYTES)
        if s == outsider
        else msg.ciphertexts[
            msg.senders.index(s) * m.SHARE_CIPHERTEXT_BYTES : (msg.senders.index(s) + 1)
            * m.SHARE_CIPHERTEXT_BYTES
        ]
        for s in senders
    )
    forged = m.MaskedInputIns(round=1, attempt=0, senders=senders, ciphertexts=blob)
    with pytest.raises(SecAggAbort, match="wrong sender: shares outside this client's sub-cohort"):
        fed.clients[target].on_masked_input(forged)
    assert not fed.clients[target].holds_secrets


def test_a_server_with_its_own_split_gets_no_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    fed = CohortFederation(9, 4, MaskingConfig(), min_cohort=3)

    def chosen(ids: Any, min_cohort: int, seed: bytes) -> tuple[tuple[int, ...], ...]:
        return ((0, 1, 2), (3, 4, 5), (6, 7, 8))  # the server places client 0 where it likes

    monkeypatch.setattr(secagg_server, "split_cohorts", chosen)
    srv = fed.server()
    with pytest.raises(SecAggAbort):
        fed.run(server=srv)
    assert srv.result is None
    # the clients' own split disagrees, so their share recipients were refused
    assert any("wrong recipients" in r for r in srv.dropped.values())


def test_cohort_params_bind_the_split_rule_and_refuse_a_large_threshold() -> None:
    plain = derive_params(MaskingConfig(), n=12, min_cohort=3)
    split = derive_params(MaskingConfig(), n=12, min_cohort=3, cohorts=True)
    assert plain.digest() != split.digest() and split.threshold == 3
    assert split.cohort_threshold(5) == 3
    active = derive_params(MaskingConfig(variant="active"), n=12, min_cohort=3, cohorts=True)
    assert active.cohort_threshold(5) == 3 and active.cohort_threshold(7) == 5
    with pytest.raises(ConfigError, match="exceeds aggregation.min_cohort=3"):
        derive_params(MaskingConfig(threshold=4), n=12, min_cohort=3, cohorts=True)
    with pytest.raises(ConfigError, match="min_cohort >= 2"):
        derive_params(MaskingConfig(), n=12, min_cohort=1, cohorts=True)


def test_each_subcohort_sum_carries_the_full_dp_noise() -> None:
    from secfl.config import config_from_dict

    raw = small_config(**{"data.num_clients": 12}).to_dict()
    raw["aggregation"] = {"protection": "masking", "min_cohort": 3}
    raw["trust"] = {"defense": "vote"}
    raw["privacy"] = {"user_level": {"noise_multiplier": 0.5, "delta": 1e-3, "clip_norm": 1.0}}
    d = 4000
    noise = user_level_mechanism(config_from_dict(raw), d)
    assert isinstance(noise, DistributedNoise)
    fed = CohortFederation(13, d, MaskingConfig(clip_range=1.0, weighting="uniform"), min_cohort=3)
    fed.noise = noise
    fed.clients = {i: fed.make_client(i) for i in fed.ids}
    for i in fed.ids:  # zero updates: each unmasked sum is its noise exactly
        fed.updates[i] = (np.zeros(d, dtype=np.float32), 1)
    srv = fed.run()
    assert srv.result is not None and len(srv.result.cohorts) == 4
    bits = srv.params.bits
    for part in srv.result.cohorts:
        words = part.raw_sum[:d].astype(np.int64)
        signed = np.where(words >= 2 ** (bits - 1), words - 2**bits, words).astype(np.float64)
        # |C_j| shares of variance target^2 / t_j: at least the full target variance
        expected = len(part.survivors) * noise.client_std(part.threshold) ** 2
        assert expected >= noise.target_std**2
        assert abs(signed.var() / expected - 1) < 0.1
        assert abs(signed.mean()) < 5 * np.sqrt(expected / d)


# ---------------------------------------------------------------------------- trust


class _FederationTransport:
    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def exchange(self, requests: dict[int, bytes]) -> dict[int, bytes | None]:
        return {c: self.fed.deliver(c, p) for c, p in requests.items()}


def test_a_flagged_subcohort_never_reaches_the_released_aggregate(tmp_path: Path) -> None:
    fed = CohortFederation(12, 16, MaskingConfig(), min_cohort=3, seed=5)
    noise = Randomness("seeded", 9).stream("test.noise")
    base = np.linspace(-0.4, 0.4, 16).astype(np.float32)
    for i in fed.ids:
        jitter = (noise.uniform(16) - 0.5).astype(np.float32) * 0.1
        fed.updates[i] = (base + jitter, 10)
    attacker = 7
    fed.updates[attacker] = ((-5 * base).astype(np.float32), 10)
    trust = TrustModule(TrustConfig(), reference=lambda w, round_index, attempt: base.copy())
    protection = MaskingProtection(fed.masking, min_cohort=3, registry=fed.registry, trust=trust)
    events = EventLog(tmp_path / "events.jsonl")
    ctx = RoundContext(
        round=1,
        attempt=0,
        broadcast=FitIns(round=1, attempt=0, model_hash=b"model-hash", weights=np.zeros(16)),
        model_size=16,
        randomness=fed.randomness,
        events=events,
    )
    result = protection.aggregate(_FederationTransport(fed), list(fed.ids), ctx)  # type: ignore[arg-type]
    events.close()
    assert result is not None
    server = protection.last_server
    assert server is not None
    poisoned = next(b for b in server.cohorts if attacker in b)
    assert not set(poisoned) & set(result.survivors)
    for c in poisoned:
        assert "flagged" in result.dropped[c]
        assert trust.suspicion.of(c) == 1.0
    kept = [c for c in fed.ids if c not in poisoned]
    assert result.survivors == tuple(kept)
    expected = np.mean([np.clip(fed.updates[c][0], -1, 1) for c in kept], axis=0)
    assert np.abs(result.mean_update - expected).max() < 1e-3
    logged = [
        e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "trust_cohort_flag"
    ]
    assert [sorted(e["members"]) for e in logged] == [sorted(poisoned)]
    # next round: suspicion below the bound, the attacker is still admitted
    later = EventLog(tmp_path / "later.jsonl")
    assert trust.admit(fed.ids, round_index=2, attempt=0, events=later) == fed.ids


@pytest.mark.parametrize("cap", [3.0, None])
def test_subcohorts_longer_than_the_cap_times_the_trusted_one_are_flagged(
    tmp_path: Path, cap: float | None
) -> None:
    """Most sub-cohorts hold a boosted attacker that keeps a positive reference cosine, so
    the median and MAD over the candidates are the attackers': only the bound on the
    length against the trusted sub-cohort (``suspicion.norm_ratio_max``) flags them."""
    rng = np.random.default_rng(11)
    d = 64
    reference = rng.normal(size=d)
    reference /= np.linalg.norm(reference)

    def mean(cosine: float, length: float) -> np.ndarray:
        side = rng.normal(size=d)
        side -= (side @ reference) * reference
        side /= np.linalg.norm(side)
        return (length * (cosine * reference + np.sqrt(1 - cosine**2) * side)).astype(np.float32)

    cohorts = {
        0: ((0, 1, 2), mean(0.9, 1.0), 30.0),  # honest: elected
        1: ((3, 4, 5), mean(0.85, 1.2), 30.0),  # honest
        2: ((6, 7, 8), mean(0.6, 4.0), 30.0),  # each holds a boosted attacker
        3: ((9, 10, 11), mean(0.55, 5.0), 30.0),
        4: ((12, 13, 14), mean(0.6, 4.5), 30.0),
        5: ((15, 16, 17), mean(0.5, 6.0), 30.0),
    }
    config = TrustConfig.model_validate({"suspicion": {"norm_ratio_max": cap}})
    trust = TrustModule(config, reference=lambda w, round_index, attempt: reference.copy())
    events = EventLog(tmp_path / "events.jsonl")
    decision = trust.defend_cohorts(
        cohorts, global_weights=np.zeros(d), round_index=1, attempt=0, events=events
    )
    events.close()
    assert decision.trusted_party == 0
    if cap is None:  # the round's spread alone: the poisoned majority sets the bounds
        assert not {2, 3, 4, 5} & set(decision.flagged)
        return
    assert set(decision.flagged) == {2, 3, 4, 5}
    assert all("norm_ratio_max=3" in decision.flagged[j] for j in (2, 3, 4, 5))
    assert decision.kept == (0, 1)
    assert all(trust.suspicion.of(c) == 1.0 for c in range(6, 18))
    assert all(trust.suspicion.of(c) == 0.0 for c in range(6))


# ---------------------------------------------------------------------------- runs


def _masking_trust_config(rounds: int = 6) -> Any:
    raw = small_config(
        rounds=rounds,
        **{
            "data.num_clients": 12,
            "client.lr": 0.1,
            "evaluation.per_client": False,
            "evaluation.every": rounds,
        },
    ).to_dict()
    raw["aggregation"] = {"protection": "masking", "min_cohort": 3}
    raw["trust"] = {"defense": "vote", "suspicion": {"bound": 3.0}}
    raw["adversary"] = {"attack": "sign_flip", "count": 2}
    from secfl.config import config_from_dict

    return config_from_dict(raw)


def _trust_events(folder: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k not in ("seq", "time")}
        for e in read_events(folder / "events.jsonl")
        if e["event"].startswith(("trust_", "secagg_cohort", "adversary_"))
    ]


def test_sign_flippers_are_excluded_and_resume_is_exact(tmp_path: Path) -> None:
    config = _masking_trust_config()
    whole = run(config, tmp_path / "whole")
    events = read_events(tmp_path / "whole" / "events.jsonl")
    attackers = next(e["clients"] for e in events if e["event"] == "adversary_selected")
    excluded = {e["client"] for e in events if e["event"] == "trust_excluded"}
    assert set(attackers) <= excluded
    assert len(excluded - set(attackers)) <= 1  # honest clients rarely share their fate
    flags = [e for e in events if e["event"] == "trust_cohort_flag"]
    assert flags and all(set(e["members"]) & set(attackers) for e in flags)
    # no flagged member's update is in a round's released survivors
    for e in flags:
        done = next(
            r for r in events if r["event"] == "round_completed" and r["round"] == e["round"]
        )
        assert not set(e["members"]) & set(done["survivors"])
    assert whole.history[-1]["accuracy"] > 0.5

    run(config, tmp_path / "split", stop_after=3)
    resumed = run(config, tmp_path / "split", resume=True)

    def strip(history: list[dict[str, Any]]) -> str:  # as JSON: NaN (not evaluated) == NaN
        rows = [{k: v for k, v in r.items() if k != "time_s"} for r in history]
        return json.dumps(rows, sort_keys=True)

    assert strip(resumed.history) == strip(whole.history)
    assert _trust_events(tmp_path / "split") == _trust_events(tmp_path / "whole")
    a = np.concatenate([p.detach().numpy().ravel() for p in whole.model.parameters()])
    b = np.concatenate([p.detach().numpy().ravel() for p in resumed.model.parameters()])
    assert np.array_equal(a, b)


def test_masking_trust_config_refusals() -> None:
    raw = small_config().to_dict()
    raw["aggregation"] = {"protection": "masking", "min_cohort": 3}
    raw["trust"] = {"defense": "median"}
    from secfl.config import config_from_dict

    with pytest.raises(ConfigError, match="allowed: vote, none"):
        config_from_dict(raw)
    raw["trust"] = {"defense": "vote"}
    raw["aggregation"]["min_cohort"] = 1
    with pytest.raises(ConfigError, match="allowed >= 2"):
        config_from_dict(raw)
