"""The decryptor's policy: what it releases (within the stated bound) and what it refuses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from secfl.audit.events import EventLog, read_events
from secfl.crypto import ckks
from secfl.crypto.sign import SigningKey
from secfl.he.client import encrypt_update
from secfl.he.decryptor import Decryptor, DecryptorPolicy
from secfl.he.messages import (
    UPDATE_SIGNATURE_CONTEXT,
    ContextReply,
    ContextRequest,
    DecryptRequest,
    EncryptedUpdate,
    Refusal,
    ScalarRelease,
    ScalarRequest,
    SumRelease,
    SumRequest,
    frame_blobs,
    signed_update_payload,
    unframe_blobs,
)
from secfl.randomness import Randomness
from secfl.wire import decode_message

N_CLIENTS = 100
MODEL_HASH = hashlib.sha256(b"model").digest()


class Harness:
    """A decryptor reached only through bytes, plus N signing clients."""

    def __init__(
        self,
        tmp: Path,
        *,
        clip_range: float = 1.0,
        min_cohort: int = 3,
        seed: int = 7,
        preset: ckks.CkksPreset = ckks.AGGREGATION,
    ) -> None:
        self.events_path = tmp / "events.jsonl"
        self.events = EventLog(self.events_path)
        self.ids = {
            i: SigningKey.from_seed(bytes([i % 256, i // 256]) * 16) for i in range(N_CLIENTS)
        }
        self.decryptor = Decryptor(
            preset,
            DecryptorPolicy(
                min_cohort=min_cohort,
                max_weight_share=0.5,
                clip_range=clip_range,
                statistical_bits=40,
                query_budget=2**16,
            ),
            client_keys={i: k.public_bytes() for i, k in self.ids.items()},
            randomness=Randomness("seeded", seed),
            events=self.events,
        )
        reply = self.ask(ContextRequest(0, "client").to_bytes())
        assert isinstance(reply, ContextReply)
        self.public = ckks.PublicContext(preset, reply.context)
        #: The server's context (evaluation keys of the trust preset), for scalar digests.
        server = self.ask(ContextRequest(0, "server").to_bytes())
        assert isinstance(server, ContextReply)
        self.server = ckks.PublicContext(preset, server.context)

    def ask(self, payload: bytes) -> object:
        return decode_message(self.decryptor.handle(payload))

    def update(
        self, client: int, values: np.ndarray, weight: int, round_index: int = 1, attempt: int = 0
    ) -> bytes:
        return encrypt_update(
            self.public,
            self.ids[client],
            values,
            round_index=round_index,
            attempt=attempt,
            client_id=client,
            epoch=0,
            model_hash=MODEL_HASH,
            num_samples=weight,
            seed=bytes([client % 256]) * 64,
        ).to_bytes()

    def sum_request(
        self,
        updates: list[bytes],
        weights: list[int],
        *,
        digest_weights: list[int] | None = None,
        attempt: int = 0,
    ) -> SumRequest:
        columns = [unframe_blobs(EncryptedUpdate.from_bytes(u).ciphertexts, "u") for u in updates]
        digest = b""
        if columns:
            summed = ckks.weighted_sum(self.public, columns, digest_weights or weights)
            digest = ckks.aggregate_digest(summed)
        return SumRequest(
            round=1, attempt=attempt, epoch=0, updates=frame_blobs(updates), aggregate_digest=digest
        )


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.mark.parametrize("clip_range", [1.0, 4.0])
def test_flooded_mean_of_100_clients_is_within_the_stated_bound(
    tmp_path: Path, clip_range: float
) -> None:
    h = Harness(tmp_path, clip_range=clip_range)
    rng = np.random.default_rng(0)
    d = 4096 + 100
    xs = rng.uniform(-clip_range, clip_range, (N_CLIENTS, d))
    xs[:, 0], xs[:, 1] = clip_range, -clip_range  # the extremes of the range
    xs[: N_CLIENTS // 2, 2] = clip_range
    xs[N_CLIENTS // 2 :, 2] = -clip_range
    weights = [int(w) for w in rng.integers(10, 400 // int(clip_range), N_CLIENTS)]
    updates = [h.update(i, xs[i], weights[i]) for i in range(N_CLIENTS)]
    reply = h.ask(h.sum_request(updates, weights).to_bytes())
    assert isinstance(reply, SumRelease), reply
    expected = (np.array(weights, dtype=np.float64)[:, None] * xs).sum(0) / sum(weights)
    error = np.abs(reply.mean.astype(np.float64) - expected).max()
    # the preset's stated bound is <= 1e-5 x C; float32 release adds at most 2^-24 x C
    assert reply.error_bound <= 1e-5 * clip_range
    assert error <= 1e-5 * clip_range
    assert error <= reply.error_bound + 2**-23 * clip_range
    assert error > 0  # the release is flooded, not exact
    assert reply.total_weight == sum(weights)
    releases = [e for e in read_events(h.events_path) if e["event"] == "ckks_release"]
    assert releases[0]["clients"] == list(range(N_CLIENTS))


def _refusal(reply: object) -> str:
    assert isinstance(reply, Refusal), reply
    return reply.reason


def test_refuses_a_single_clients_ciphertext(harness: Harness) -> None:
    one = harness.update(0, np.ones(50) * 0.3, 10)
    assert "min_cohort is 3" in _refusal(harness.ask(harness.sum_request([one], [10]).to_bytes()))
    blob = unframe_blobs(EncryptedUpdate.from_bytes(one).ciphertexts, "u")[0]
    reason = _refusal(harness.ask(DecryptRequest(1, 0, blob).to_bytes()))
    assert "single client's ciphertext" in reason


def test_refuses_fewer_than_min_cohort(harness: Harness) -> None:
    ups = [harness.update(i, np.full(50, 0.1), 10) for i in range(2)]
    assert "a sum over 2 client(s) is refused" in _refusal(
        harness.ask(harness.sum_request(ups, [10, 10]).to_bytes())
    )


def test_refuses_a_dominated_weight_vector(harness: Harness) -> None:
    weights = [100, 10, 10, 10]
    ups = [harness.update(i, np.full(50, 0.1), w) for i, w in enumerate(weights)]
    reason = _refusal(harness.ask(harness.sum_request(ups, weights).to_bytes()))
    assert "dominated: client 0 holds 0.769" in reason


def test_refuses_rotated_or_derived_ciphertexts(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    weights = [10, 11, 12]
    ups = [h.update(i, np.linspace(-1, 1, 5000), w) for i, w in enumerate(weights)]
    honest = h.sum_request(ups, weights)
    # a derived aggregate: client 0 counted once more than its signed weight
    derived = h.sum_request(ups, weights, digest_weights=[11, 11, 12])
    reason = _refusal(h.ask(derived.to_bytes()))
    assert "does not equal the decryptor's recomputation" in reason
    forged = SumRequest(1, 0, 0, honest.updates, hashlib.sha256(b"rotated").digest())
    assert "does not equal" in _refusal(h.ask(forged.to_bytes()))
    # a rotated ciphertext (trust-preset Galois keys) is untraceable
    trust = ckks.SecretContext(ckks.TRUST, seed=bytes(64))
    rotated = trust.public.rotate(
        ckks.encrypt_vector(trust.public, np.ones(8), parallel=False)[0], 1
    )
    assert "cannot be traced" in _refusal(h.ask(DecryptRequest(1, 0, rotated).to_bytes()))
    # the honest request still goes through, exactly once
    assert isinstance(h.ask(honest.to_bytes()), SumRelease)
    assert "already released" in _refusal(h.ask(honest.to_bytes()))


def test_refuses_untraceable_and_unsigned_inputs(harness: Harness) -> None:
    fresh = ckks.encrypt_vector(harness.public, np.ones(30), parallel=False)[0]
    assert "cannot be traced" in _refusal(harness.ask(DecryptRequest(1, 0, fresh).to_bytes()))
    ups = [harness.update(i, np.full(30, 0.2), 10) for i in range(3)]
    forged = EncryptedUpdate.from_bytes(ups[2])
    tampered = EncryptedUpdate(**{**forged.__dict__, "num_samples": 10_000}).to_bytes()
    reason = _refusal(
        harness.ask(harness.sum_request([*ups[:2], tampered], [10, 10, 10]).to_bytes())
    )
    assert reason == "a signature did not verify"


def test_the_aggregation_preset_releases_no_trust_scalars(harness: Harness) -> None:
    """Scalars are recomputed homomorphically; without evaluation keys they are refused (the
    full scalar policy is in tests/test_trust_ckks.py)."""
    ux = harness.update(0, np.full(30, 0.2), 10)
    empty = np.zeros(0, dtype=np.float32)
    reply = harness.ask(ScalarRequest(1, 0, "norm", ux, empty, b"", b"", b"").to_bytes())
    assert "need aggregation.ckks.preset 'trust'" in _refusal(reply)
    assert not isinstance(reply, ScalarRelease)


def test_wrong_context_and_corrupted_updates_are_refused_with_reasons(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    (tmp_path / "other").mkdir()
    other = Harness(tmp_path / "other", seed=8)  # another decryptor, other keys
    ups = [h.update(i, np.full(30, 0.2), 10) for i in range(3)]
    foreign = other.update(3, np.full(30, 0.2), 10)
    request = SumRequest(1, 0, 0, frame_blobs([*ups[:2], foreign]), b"")
    reason = _refusal(h.ask(request.to_bytes()))
    assert "encrypted under another context" in reason
    assert "SumRequest.updates" in _refusal(
        h.ask(SumRequest(1, 0, 0, b"\x00\x00\x01\x00abc", b"").to_bytes())
    )


def test_a_second_sum_of_the_same_round_is_refused_even_in_a_new_attempt(harness: Harness) -> None:
    values = np.full(40, 0.25)
    first = [harness.update(i, values, 10) for i in range(4)]
    assert isinstance(harness.ask(harness.sum_request(first, [10] * 4).to_bytes()), SumRelease)
    # a restarted attempt over a subset would reveal client 3 by differencing
    subset = [harness.update(i, values, 10, attempt=1) for i in range(3)]
    reason = _refusal(harness.ask(harness.sum_request(subset, [10] * 3, attempt=1).to_bytes()))
    assert "already released (in any attempt)" in reason


def test_refuses_signed_but_malformed_ciphertexts(harness: Harness) -> None:
    """A client that signs a residue >= its prime, or a ciphertext of other parameters, gets
    a refusal that says so; the signature covers exactly the bytes that are summed."""
    ups = [harness.update(i, np.full(30, 0.2), 10) for i in range(3)]
    honest = EncryptedUpdate.from_bytes(ups[2])
    blob = bytearray(unframe_blobs(honest.ciphertexts, "u")[0])
    blob[-4:] = (2**32 - 1).to_bytes(4, "little")
    trust = ckks.SecretContext(ckks.TRUST, seed=bytes(64))
    foreign = ckks.encrypt_vector(trust.public, np.ones(30), parallel=False)[0]
    for bad, reason in ((bytes(blob), "residue >= its prime"), (foreign, "header says")):
        ciphertexts = frame_blobs([bad])
        fields = {**honest.__dict__, "ciphertexts": ciphertexts}
        payload = signed_update_payload(
            round_index=honest.round,
            attempt=honest.attempt,
            client_id=honest.client_id,
            epoch=honest.epoch,
            model_hash=honest.model_hash,
            context_digest=honest.context_digest,
            num_samples=honest.num_samples,
            model_size=honest.model_size,
            ciphertexts=ciphertexts,
        )
        fields["signature"] = harness.ids[2].sign(UPDATE_SIGNATURE_CONTEXT, payload)
        forged = EncryptedUpdate(**fields).to_bytes()
        request = SumRequest(1, 0, 0, frame_blobs([*ups[:2], forged]), b"")
        assert reason in _refusal(harness.ask(request.to_bytes()))
