"""secfl.crypto.ckks: presets and their checks, packing, flooding, key separation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secfl.crypto import ckks
from secfl.errors import CkksError, CkksParameterError

SEED = bytes(range(64))


@pytest.fixture(scope="module")
def secret() -> ckks.SecretContext:
    return ckks.SecretContext(ckks.AGGREGATION, seed=SEED)


@pytest.fixture(scope="module")
def public(secret: ckks.SecretContext) -> ckks.PublicContext:
    return ckks.PublicContext(ckks.AGGREGATION, secret.client_context_bytes())


def _custom(**changes: object) -> ckks.CkksPreset:
    fields = {
        f.name: getattr(ckks.AGGREGATION, f.name)
        for f in dataclasses.fields(ckks.CkksPreset)
        if f.init
    }
    fields.update(changes)
    return ckks.CkksPreset(**fields)


def test_presets_meet_the_he_standard_bound() -> None:
    for preset in ckks.PRESETS.values():
        total = sum(preset.coeff_modulus_bits)
        assert total <= ckks.HE_STANDARD_128_MAX_LOGQ[preset.poly_modulus_degree]
        assert "128-bit" in preset.security_argument()
    assert sum(ckks.AGGREGATION.coeff_modulus_bits) == 109  # exactly the N=4096 budget


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"coeff_modulus_bits": (60, 40, 16)}, "exceeds 109 bits"),
        ({"poly_modulus_degree": 3000}, "not one of"),
        ({"coeff_modulus_bits": (60,)}, "at least two primes"),
        ({"coeff_modulus_bits": (61, 30, 16)}, "16..60 bits"),
        ({"scale_bits": 90}, "headroom"),
        ({"depth": 1}, "depth 1 needs at least 2 data primes"),
    ],
)
def test_unsafe_or_insufficient_presets_say_why(changes: dict[str, object], message: str) -> None:
    if changes.get("depth") == 1:
        changes["coeff_modulus_bits"] = (60, 49)
    with pytest.raises(CkksParameterError, match=message):
        _custom(**changes)


def test_depth_one_needs_a_rescaling_prime_as_large_as_the_scale() -> None:
    with pytest.raises(CkksParameterError, match="smaller than the scale"):
        _custom(
            name="t",
            poly_modulus_degree=8192,
            coeff_modulus_bits=(60, 30, 60),
            depth=1,
            scale_bits=40,
        )


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(CkksParameterError, match="known presets: \\['aggregation', 'trust'\\]"):
        ckks.get_preset("fast")


def test_flooding_plan_meets_the_precision_and_refuses_too_large_budgets() -> None:
    plan = ckks.flooding_plan(
        ckks.AGGREGATION, statistical_bits=40, query_budget=2**16, clip_range=1.0
    )
    assert plan.mean_bound <= 1e-5
    # sigma = sqrt(24 n q) 2^(s/2) t (LMSS 2022), recomputed here by hand
    t = plan.fresh_error
    assert plan.mean_sigma == pytest.approx(np.sqrt(24 * 4096 * 2**16) * 2**20 * t)
    with pytest.raises(CkksParameterError, match="query_budget"):
        ckks.flooding_plan(
            ckks.AGGREGATION, statistical_bits=40, query_budget=2**24, clip_range=1.0
        )
    with pytest.raises(CkksParameterError, match=">= 40"):
        ckks.flooding_plan(ckks.AGGREGATION, statistical_bits=30, query_budget=1, clip_range=1.0)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 10_000])
def test_packing_fills_complete_ciphertexts_for_any_size(
    secret: ckks.SecretContext, public: ckks.PublicContext, size: int
) -> None:
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, size)
    blobs = ckks.encrypt_vector(public, x, parallel=False)
    assert len(blobs) == -(-size // 4096)
    got = np.concatenate([secret.decrypt(b, 4096) for b in blobs])[:size]
    assert np.abs(got - x).max() < 1e-12
    # each ciphertext carries N = 4096 reals; 2 x 2 x 4096 words of 60+33 bits, compressed
    per_param = sum(len(b) for b in blobs) / (len(blobs) * 4096)
    assert per_param < 8 * 4


def test_parallel_and_serial_paths_agree(
    secret: ckks.SecretContext, public: ckks.PublicContext
) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-1, 1, 9 * 4096) for _ in range(3)]
    seeded = [
        ckks.encrypt_vector(public, x, seed=bytes([i]) * 64, parallel=True)
        for i, x in enumerate(xs)
    ]
    serial = [
        ckks.encrypt_vector(public, x, seed=bytes([i]) * 64, parallel=False)
        for i, x in enumerate(xs)
    ]
    assert seeded == serial  # seeded encryption does not depend on scheduling
    weights = [3, 5, 7]
    par = ckks.weighted_sum(public, seeded, weights, parallel=True)
    ser = ckks.weighted_sum(public, seeded, weights, parallel=False)
    assert par == ser  # deterministic, so the decryptor can recompute and compare digests
    assert ckks.aggregate_digest(par) != ckks.aggregate_digest(
        ckks.weighted_sum(public, seeded, [3, 5, 8], parallel=False)
    )
    got = np.concatenate([secret.decrypt(ct, 4096) for ct in par])
    expected = sum(w * x for w, x in zip(weights, xs, strict=True))
    assert np.abs(got - expected).max() < 1e-10


def test_seeded_keys_and_ciphertexts_are_reproducible_and_distinct() -> None:
    a = ckks.SecretContext(ckks.AGGREGATION, seed=SEED)
    b = ckks.SecretContext(ckks.AGGREGATION, seed=SEED)
    c = ckks.SecretContext(ckks.AGGREGATION, seed=bytes(64))
    assert a.client_context_bytes() == b.client_context_bytes()
    assert a.client_context_bytes() != c.client_context_bytes()
    public = a.public
    x = np.linspace(-1, 1, 8192)
    one = ckks.encrypt_vector(public, x, seed=SEED, parallel=False)
    assert one == ckks.encrypt_vector(public, x, seed=SEED, parallel=False)
    # two chunks never share encryption randomness (SEAL's seeded factory repeats seeds)
    zero = ckks.encrypt_vector(public, np.zeros(8192), seed=SEED, parallel=False)
    assert zero[0] != zero[1]


def test_public_contexts_cannot_decrypt_and_hold_no_secret(
    secret: ckks.SecretContext, public: ckks.PublicContext
) -> None:
    x = np.full(4096, 0.5)
    blob = ckks.encrypt_vector(public, x, parallel=False)[0]
    assert not hasattr(public, "decrypt")
    garbage = ckks.decrypt_with_foreign_key(public, blob)
    assert np.abs(garbage - x).max() > 1e3  # another key recovers nothing
    sk = secret.secret_key_bytes_for_tests()
    for data in (secret.client_context_bytes(), secret.server_context_bytes(), blob):
        for offset in range(16, len(sk) - 32, 997):  # no 32-byte window of the secret key
            assert sk[offset : offset + 32] not in data


def test_corrupted_and_wrong_context_ciphertexts_give_clear_errors(
    public: ckks.PublicContext,
) -> None:
    blob = ckks.encrypt_vector(public, np.ones(10), parallel=False)[0]
    corrupted = bytearray(blob)
    corrupted[40:60] = bytes(20)
    with pytest.raises(CkksError, match="cannot load ciphertext"):
        public.load_ciphertext(bytes(corrupted))
    with pytest.raises(CkksError, match="cannot load ciphertext"):
        public.load_ciphertext(blob[: len(blob) // 2])
    trust = ckks.SecretContext(ckks.TRUST, seed=SEED)
    other = ckks.encrypt_vector(trust.public, np.ones(10), parallel=False)[0]
    with pytest.raises(CkksError, match="different CKKS"):
        public.load_ciphertext(other)
    with pytest.raises(CkksError, match="preset 'trust', expected 'aggregation'"):
        ckks.PublicContext(ckks.AGGREGATION, trust.client_context_bytes())


def test_trust_preset_encrypted_inner_product_and_rotation() -> None:
    trust = ckks.SecretContext(ckks.TRUST, seed=SEED)
    server = ckks.PublicContext(ckks.TRUST, trust.server_context_bytes())
    client = ckks.PublicContext(ckks.TRUST, trust.client_context_bytes())
    assert server.has_evaluation_keys and not client.has_evaluation_keys
    assert len(trust.server_context_bytes()) > 10 * len(trust.client_context_bytes())
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 10_000)
    ref = rng.uniform(-1, 1, 10_000)
    blobs = ckks.encrypt_vector(client, x, parallel=False)
    got = trust.decrypt_any_level(server.inner_product_plain(blobs, ref))[0]
    assert got == pytest.approx(float(x @ ref), abs=1e-3)
    rotated = trust.decrypt(server.rotate(blobs[0], 1), 8192)
    assert np.abs(rotated[:-2] - x[2:8192]).max() < 1e-5  # one complex slot = two reals
    with pytest.raises(CkksError, match="not one SEAL object"):
        server.load_ciphertext(blobs[0] + b"x")
