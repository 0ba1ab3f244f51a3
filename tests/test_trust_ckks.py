"""The trust module under mode ckks: encrypted scalars, the decryptor's scalar policy, the
vote from scalars only, flagged clients kept out of the encrypted sum, the ckks adversary."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secfl.audit.events import EventLog, read_events
from secfl.config import RunConfig, TrustConfig, config_from_dict
from secfl.crypto import ckks
from secfl.crypto.sign import SigningKey
from secfl.encode.flatten import flatten_parameters, model_hash
from secfl.errors import ConfigError
from secfl.he.client import encrypt_update
from secfl.he.decryptor import Decryptor, DecryptorPolicy, dormant_plaintexts, mask_bytes
from secfl.he.messages import (
    CkksFitIns,
    EncryptedUpdate,
    ScalarRelease,
    ScalarRequest,
    unframe_blobs,
)
from secfl.he.server import CkksProtection
from secfl.he.trust import measure_trust_scalars
from secfl.messages import FitIns
from secfl.randomness import Randomness
from secfl.runner import run
from secfl.server.protection import RoundContext
from secfl.trust.defense import TrustModule, scalar_metrics
from secfl.wire import decode_message
from tests.test_he_policy import MODEL_HASH, Harness, _refusal

EMPTY = np.zeros(0, dtype=np.float32)


@pytest.fixture(scope="module")
def trust_harness(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    return Harness(tmp_path_factory.mktemp("trust"), preset=ckks.TRUST)


def _blobs(update: bytes) -> list[bytes]:
    return unframe_blobs(EncryptedUpdate.from_bytes(update).ciphertexts, "u")


def _request(h: Harness, kind: str, update: bytes, **extra: Any) -> ScalarRequest:
    """A scalar request with the digest of the server's own encrypted evaluation."""
    x = _blobs(update)
    if kind == "reference":
        result = h.server.inner_product_plain(x, extra["reference"].astype(np.float64))
    elif kind == "norm":
        result = h.server.squared_norm(x)
    elif kind == "dormant":
        mask = np.frombuffer(extra["mask"], dtype=np.uint8).astype(bool)
        _bits, plains = dormant_plaintexts(h.server, mask, 1.0)
        result = h.server.masked_squared_norm(x, plains)
    else:
        result = h.server.inner_product(x, h.server.conjugates(_blobs(extra["other"])))
    return ScalarRequest(
        1,
        0,
        kind,
        update,
        extra.get("reference", EMPTY),
        extra.get("other", b""),
        extra.get("mask", b""),
        ckks.scalar_digest(result),
    )


def _mask300() -> np.ndarray:
    """100 of 300 coordinates: 80 in packed pairs (beta = 0) and 20 unpaired (odd only)."""
    mask = np.zeros(300, dtype=bool)
    mask[:80] = True
    mask[101:141:2] = True
    return mask


def test_four_scalars_match_plaintext_within_the_flooding_bound_and_a_fifth_is_refused(
    trust_harness: Harness,
) -> None:
    h = trust_harness
    rng = np.random.default_rng(5)
    x, y, ref = rng.uniform(-1, 1, (3, 300))
    ref32 = ref.astype(np.float32)
    mask = _mask300()
    ux, uy = h.update(0, x, 10), h.update(1, y, 10)
    expected = {
        "reference": float(x @ ref32),
        "norm": float(x @ x),
        "trusted": float(x @ y),
        "dormant": float(x[mask] @ x[mask]),
    }
    requests = {
        "reference": _request(h, "reference", ux, reference=ref32),
        "norm": _request(h, "norm", ux),
        "trusted": _request(h, "trusted", ux, other=uy),
        "dormant": _request(h, "dormant", ux, mask=mask_bytes(mask)),
    }
    bits, plains = dormant_plaintexts(h.server, mask, 1.0)
    assert 12 <= bits <= 20 and {p.index for p in plains} == {0}
    # the encoded mask's own (public, deterministic) error: at most 1e-3 per weight
    assert max(p.error for p in plains) < 1e-3
    encoding = max(p.error for p in plains) * float(x @ x)
    for kind, request in requests.items():
        reply = h.ask(request.to_bytes())
        assert isinstance(reply, ScalarRelease), reply
        # 8 sigma of flooding plus the CKKS error itself (far below it); the dormant scalar
        # also carries the (public, deterministic) encoding error of its mask
        slack = encoding if kind == "dormant" else 0.0
        assert abs(reply.value - expected[kind]) <= 8 * reply.noise_sigma + slack + 1e-9
        assert reply.value != expected[kind]  # flooded
        assert 0 < reply.noise_sigma < 1e-4  # small enough for cosines at this d
    # the dormant share the trust module computes: within 1e-4 of the plaintext one
    share = np.sqrt(expected["dormant"] / expected["norm"])
    assert abs(share - np.linalg.norm(x[mask]) / np.linalg.norm(x)) < 1e-12
    fifth = h.ask(_request(h, "norm", ux).to_bytes())
    assert "at most 4 per client per round" in _refusal(fifth)
    # an unknown client (no registered identity key) gets nothing
    stranger = encrypt_update(
        h.public,
        SigningKey.from_seed(bytes(range(32))),
        y,
        round_index=1,
        attempt=0,
        client_id=4242,
        epoch=0,
        model_hash=MODEL_HASH,
        num_samples=10,
    ).to_bytes()
    assert "4242 has no registered identity key" in _refusal(
        h.ask(ScalarRequest(1, 0, "norm", stranger, EMPTY, b"", b"", b"").to_bytes())
    )
    # a result the decryptor did not recompute (digest of another computation) is refused
    bad = ScalarRequest(1, 0, "norm", uy, EMPTY, b"", b"", requests["norm"].result_digest)
    assert "does not equal the decryptor's recomputation" in _refusal(h.ask(bad.to_bytes()))
    # the trusted party is bound by the first request of the round
    uz = h.update(2, y, 10)
    assert "elected client 1" in _refusal(h.ask(_request(h, "trusted", uz, other=ux).to_bytes()))
    events = read_events(h.events_path)
    scalars = [e for e in events if e["event"] == "ckks_release"]
    assert [e["kind"] for e in scalars] == [
        "scalar:reference",
        "scalar:norm",
        "scalar:trusted",
        "scalar:dormant",
    ]


def test_dormant_masks_outside_the_policy_are_refused(trust_harness: Harness) -> None:
    h = trust_harness
    rng = np.random.default_rng(9)
    updates = [h.update(20 + i, rng.uniform(-1, 1, 300), 10) for i in range(6)]
    few = np.zeros(300, dtype=bool)
    few[:63] = True  # one short of min_mask (64): could single out a few coordinates
    most = np.ones(300, dtype=bool)
    most[:63] = False  # leaves 63 out: norm minus this scalar would isolate them
    for mask, words in ((few, "selects 63 of 300"), (most, "selects 237 of 300")):
        reply = h.ask(_request(h, "dormant", updates[0], mask=mask_bytes(mask)).to_bytes())
        assert words in _refusal(reply) and "at least 64 left out" in _refusal(reply)
    # not a 0/1 vector, wrong length, a mask on another kind
    raw = bytearray(mask_bytes(_mask300()))
    raw[5] = 2
    bad = _request(h, "dormant", updates[1], mask=mask_bytes(_mask300()))
    bad = ScalarRequest(1, 0, "dormant", updates[1], EMPTY, b"", bytes(raw), bad.result_digest)
    assert "not a 0/1 vector" in _refusal(h.ask(bad.to_bytes()))
    short = ScalarRequest(1, 0, "dormant", updates[1], EMPTY, b"", b"\x01" * 299, b"")
    assert "must have 300 entries" in _refusal(h.ask(short.to_bytes()))
    norm = _request(h, "norm", updates[1])
    smuggled = ScalarRequest(1, 0, "norm", updates[1], EMPTY, b"", raw, norm.result_digest)
    assert "carries no mask" in _refusal(h.ask(smuggled.to_bytes()))
    # the first accepted mask binds the round: another one is refused
    first = h.ask(_request(h, "dormant", updates[2], mask=mask_bytes(_mask300())).to_bytes())
    assert isinstance(first, ScalarRelease)
    other = _mask300()
    other[299] = True
    reply = h.ask(_request(h, "dormant", updates[3], mask=mask_bytes(other)).to_bytes())
    assert "another dormant mask" in _refusal(reply)
    # a second dormant scalar of the same client is refused
    again = h.ask(_request(h, "dormant", updates[2], mask=mask_bytes(_mask300())).to_bytes())
    assert "already released" in _refusal(again)


def test_scalar_request_version_2_is_refused(trust_harness: Harness) -> None:
    h = trust_harness
    u = h.update(30, np.full(300, 0.1), 10)
    payload = bytearray(_request(h, "norm", u).to_bytes())
    assert payload[6] == ScalarRequest.VERSION == 3  # "SFL1" | u16 type | u8 version
    payload[6] = 2
    assert "unsupported version 2" in _refusal(h.ask(bytes(payload)))


def test_sum_below_min_cohort_is_refused(trust_harness: Harness) -> None:
    ups = [trust_harness.update(10 + i, np.full(50, 0.1), 10) for i in range(2)]
    reply = trust_harness.ask(trust_harness.sum_request(ups, [10, 10]).to_bytes())
    assert "aggregation.min_cohort is 3" in _refusal(reply)


def test_scalar_metrics_equal_the_plaintext_comparison() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 40))
    s2 = (x * x).sum(1)
    s3 = x @ x[2]
    got = scalar_metrics(s2, s3, 2, ["cosine", "distance", "norm_ratio"])
    norms = np.linalg.norm(x, axis=1)
    assert np.allclose(got["cosine"], s3 / (norms * norms[2]))
    assert np.allclose(got["distance"], np.linalg.norm(x - x[2], axis=1))
    assert np.allclose(got["norm_ratio"], norms / norms[2])


class _FixedClients:
    """Answers CkksFitIns with a fixed, encrypted and signed update per client."""

    def __init__(self, updates: Mapping[int, np.ndarray], keys: Mapping[int, SigningKey]):
        self.updates = updates
        self.keys = keys

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        out: dict[int, bytes | None] = {}
        for client_id, payload in requests.items():
            ins = decode_message(payload)
            assert isinstance(ins, CkksFitIns)
            public = ckks.PublicContext(ckks.TRUST, ins.context)
            out[client_id] = encrypt_update(
                public,
                self.keys[client_id],
                self.updates[client_id],
                round_index=ins.round,
                attempt=ins.attempt,
                client_id=client_id,
                epoch=ins.epoch,
                model_hash=ins.model_hash,
                num_samples=10 + client_id,
                seed=bytes([client_id]) * 64,
            ).to_bytes()
        return out


def test_a_flagged_client_never_reaches_the_released_sum(tmp_path: Path) -> None:
    d = 200
    rng = np.random.default_rng(1)
    direction = rng.normal(size=d) * 0.02
    updates = {c: direction + rng.normal(size=d) * 0.004 for c in range(6)}
    updates[4] = -5.0 * updates[4]  # sign flip
    keys = {c: SigningKey.from_seed(bytes([c + 1]) * 32) for c in range(6)}
    events = EventLog(tmp_path / "events.jsonl")
    randomness = Randomness("seeded", 2)
    decryptor = Decryptor(
        ckks.TRUST,
        DecryptorPolicy(
            min_cohort=3,
            max_weight_share=0.5,
            clip_range=1.0,
            statistical_bits=40,
            query_budget=2**16,
        ),
        client_keys={c: k.public_bytes() for c, k in keys.items()},
        randomness=randomness,
        events=events,
    )
    config = TrustConfig()
    module = TrustModule(config, reference=lambda w, **_: direction.astype(np.float32))
    protection = CkksProtection(
        ckks.TRUST,
        decryptor=decryptor.handle,
        client_keys={c: k.public_bytes() for c, k in keys.items()},
        min_cohort=3,
        num_clients=6,
        query_budget=2**16,
        trust=module,
    )
    weights = np.zeros(d, dtype=np.float32)
    ctx = RoundContext(
        round=1,
        attempt=0,
        broadcast=FitIns(1, 0, model_hash(weights), weights),
        model_size=d,
        randomness=randomness,
        events=events,
    )
    result = protection.aggregate(_FixedClients(updates, keys), list(range(6)), ctx)
    assert result is not None
    assert 4 not in result.survivors and "trusted party" in result.dropped[4]
    kept = result.survivors
    assert len(kept) >= 3
    w = np.array([10.0 + c for c in kept])
    plain = (w[:, None] * np.stack([updates[c] for c in kept])).sum(0) / w.sum()
    assert np.abs(result.mean_update - plain).max() < 1e-4  # flooded sum of kept only
    assert protection.trust is not None and protection.trust.timings.scalars == 6 + 6 + 5
    log = read_events(tmp_path / "events.jsonl")
    vote = next(e for e in log if e["event"] == "trust_vote")
    assert vote["trusted_party"] != 4 and "peer" not in vote["rules"]
    assert any(e["event"] == "trust_flag" and e["client"] == 4 for e in log)
    release = next(e for e in log if e.get("kind") == "weighted_mean")
    assert release["clients"] == list(kept)
    per_client: dict[int, int] = {}
    for e in log:
        if e["event"] == "ckks_release" and e["kind"].startswith("scalar:"):
            per_client[e["clients"][0]] = per_client.get(e["clients"][0], 0) + 1
    assert max(per_client.values()) <= 3  # no dormant mask without trust.dormant's pruner


def _run_config(**extra: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "ckks-trust",
        "seed": 4,
        "rounds": 2,
        "security": {"randomness": "seeded"},
        "data": {"dataset": "digits", "num_clients": 6, "shared": {"per_class": 3}},
        "model": {"kind": "mlp", "hidden": [8]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"per_client": False},
        "aggregation": {"protection": "ckks", "min_cohort": 3, "ckks": {"preset": "trust"}},
        "trust": {"vote": {"rules": ["reference", "reputation"]}},
        "adversary": {"attack": "sign_flip", "count": 1},
    }
    raw.update(extra)
    return config_from_dict(raw)


def test_config_refusals_name_the_key() -> None:
    raw = _run_config().to_dict()
    raw["aggregation"]["ckks"]["preset"] = "aggregation"
    with pytest.raises(ConfigError, match="aggregation.ckks.preset='aggregation'"):
        config_from_dict(raw)
    raw = _run_config().to_dict()
    raw["trust"]["defense"] = "krum"
    with pytest.raises(ConfigError, match="only the vote runs there"):
        config_from_dict(raw)


def test_sign_flip_attacker_is_flagged_under_ckks_and_resume_is_exact(tmp_path: Path) -> None:
    config = _run_config()
    whole = run(config, tmp_path / "whole")
    events = read_events(tmp_path / "whole" / "events.jsonl")
    chosen = next(e for e in events if e["event"] == "adversary_selected")["clients"]
    assert len(chosen) == 1
    crafted = [e for e in events if e["event"] == "adversary_update"]
    assert [e["round"] for e in crafted] == [1, 2]
    assert crafted[0]["crafted_norm"] == pytest.approx(5 * crafted[0]["benign_norm"], rel=1e-5)
    flags = [e for e in events if e["event"] == "trust_flag"]
    assert {e["round"] for e in flags if e["client"] == chosen[0]} == {1, 2}
    sums = [e for e in events if e.get("kind") == "weighted_mean"]
    assert len(sums) == 2 and all(chosen[0] not in e["clients"] for e in sums)
    assert any("Sybil detection do not run" in e.get("message", "") for e in events)
    # kill after round 1, resume: same reputations, votes, flags and model, bit for bit
    run(config, tmp_path / "resumed", stop_after=1)
    resumed = run(config, tmp_path / "resumed", resume=True)
    assert np.array_equal(flatten_parameters(whole.model), flatten_parameters(resumed.model))
    again = read_events(tmp_path / "resumed" / "events.jsonl")

    def decisions(log: list[dict[str, Any]]) -> list[Any]:
        return [
            (e["round"], e.get("trusted_party"), e.get("client"), e.get("reputation"))
            for e in log
            if e["event"] in ("trust_vote", "trust_flag") and e["round"] == 2
        ]

    assert decisions(events) == decisions(again)


def test_measure_trust_scalars_reports_seconds_per_client_per_million() -> None:
    report = measure_trust_scalars(2000, clients=2)
    assert report["ckks_trust_s_per_client_per_1e6"] > 0
    assert set(report["seconds_per_1e6_by_kind"]) == {
        "reference",
        "norm",
        "trusted",
        "dormant",
        "conjugate_trusted",
    }


def test_backdoor_is_flagged_under_ckks_by_the_released_dormant_share(tmp_path: Path) -> None:
    """Model-replacement backdoor (2x2 corner trigger): under ckks the fourth scalar gives
    the attacker's dormant share and trust.dormant.flag_share drops it every round."""
    raw = _run_config().to_dict()
    raw["model"]["hidden"] = [32]  # 2 dormant pixels x 32 weights >= the decryptor's min_mask
    raw["adversary"] = {"attack": "backdoor", "count": 1}
    run(config_from_dict(raw), tmp_path / "run")
    events = read_events(tmp_path / "run" / "events.jsonl")
    chosen = next(e for e in events if e["event"] == "adversary_selected")["clients"]
    flags = [e for e in events if e["event"] == "trust_flag"]
    dormant = [e for e in flags if "dormant on the public shared set" in e["reason"]]
    assert {(e["round"], e["client"]) for e in dormant} == {(1, chosen[0]), (2, chosen[0])}
    sums = [e for e in events if e.get("kind") == "weighted_mean"]
    assert len(sums) == 2 and all(chosen[0] not in e["clients"] for e in sums)
    scalars = [e for e in events if e.get("kind") == "scalar:dormant"]
    assert len(scalars) == 2 * 6  # one per accepted client per round
    assert not any(e["event"] == "ckks_refusal" for e in events)


def test_defend_scalars_flags_the_dormant_share_before_the_vote(tmp_path: Path) -> None:
    """From scalars only: share sqrt(s4 / s2) as mode none's ||x[m]|| / ||x||; a flagged
    client is never elected, never asked for s3, and its share is in every client's metrics."""
    rng = np.random.default_rng(3)
    d = 400
    mask = np.zeros(d, dtype=bool)
    mask[:100] = True
    direction = rng.normal(size=d) * 0.02
    direction[mask] = 0.0
    x = {c: direction + rng.normal(size=d) * 0.004 * ~mask for c in range(6)}
    x[2] = x[2] + np.where(mask, 0.05, 0.0)  # a large part on the dormant-fed weights
    shares = {c: float(np.linalg.norm(x[c][mask]) / np.linalg.norm(x[c])) for c in x}
    assert shares[2] > 0.15 > max(v for c, v in shares.items() if c != 2)
    asked: list[tuple[int, list[int]]] = []

    def trusted_inner(t: int, among: Any) -> dict[int, float]:
        asked.append((t, list(among)))
        return {c: float(x[c] @ x[t]) for c in among}

    module = TrustModule(TrustConfig(), reference=lambda w, **_: direction)
    decision = module.defend_scalars(
        {c: 10.0 for c in x},
        reference_inner={c: float(x[c] @ direction) for c in x},
        reference_norm=float(np.linalg.norm(direction)),
        squared_norms={c: float(x[c] @ x[c]) for c in x},
        trusted_inner=trusted_inner,
        dormant_norms={c: float(x[c][mask] @ x[c][mask]) for c in x},
        round_index=1,
        attempt=0,
        events=EventLog(tmp_path / "events.jsonl"),
    )
    assert "dormant on the public shared set" in decision.flagged[2]
    assert 2 not in decision.kept and decision.trusted_party != 2
    assert len(asked) == 1 and 2 not in asked[0][1] and asked[0][0] not in asked[0][1]
    for c in x:
        assert decision.metrics[c]["dormant_share"] == pytest.approx(shares[c], rel=1e-9)
