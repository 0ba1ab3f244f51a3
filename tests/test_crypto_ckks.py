"""secfl.crypto.ckks: presets and their checks, packing, flooding, key separation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfl.crypto import ckks, ckks_wire
from secfl.errors import CkksError, CkksParameterError
from secfl.he.messages import frame_blobs

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
    # each ciphertext carries N = 4096 reals in 2 x 3 x 4096 uint32 residues (+ 36-byte header)
    per_param = sum(len(b) for b in blobs) / (len(blobs) * 4096)
    assert 24 < per_param < 24.01


def test_parallel_and_serial_encryption_agree_and_sums_are_exact(
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
    weights = [3, 5, 46_000]
    ours = ckks.weighted_sum(public, seeded, weights)
    framed = ckks.weighted_sum_framed(public, [frame_blobs(c) for c in seeded], weights)
    # fast (NumPy residues) vs reference (SEAL through TenSEAL): identical residues
    assert ours == framed == public.weighted_sum_seal(seeded, weights)
    assert ckks.aggregate_digest(ours) != ckks.aggregate_digest(
        ckks.weighted_sum(public, seeded, [3, 5, 46_001])
    )
    got = np.concatenate([secret.decrypt(ct, 4096) for ct in ours])
    expected = sum(w * x for w, x in zip(weights, xs, strict=True))
    assert np.abs(got - expected).max() < 1e-9


def test_wide_prime_sums_equal_seal_exactly() -> None:
    """The trust preset's 60-bit primes take the split (two 32-bit halves) path."""
    trust = ckks.SecretContext(ckks.TRUST, seed=SEED)
    assert trust.public.format.widths == (8, 8, 8)
    rng = np.random.default_rng(4)
    xs = [rng.uniform(-1, 1, 18000) for _ in range(3)]
    columns = [ckks.encrypt_vector(trust.public, x, parallel=False) for x in xs]
    weights = [1, 2**20 + 7, 65_535]
    ours = ckks.weighted_sum(trust.public, columns, weights)
    assert ours == trust.public.weighted_sum_seal(columns, weights)
    got = np.concatenate([trust.decrypt(ct, 16384) for ct in ours])[:18000]
    expected = sum(w * x for w, x in zip(weights, xs, strict=True))
    assert np.abs(got - expected).max() < 1e-3 * sum(weights)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.lists(st.integers(17, 60), min_size=1, max_size=3),
    weights=st.lists(st.integers(1, 2**20), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_residue_sum_matches_python_integers(
    bits: list[int], weights: list[int], seed: int
) -> None:
    """Known-exact reference: Python integers, for any prime sizes the format allows."""
    rng = np.random.default_rng(seed)
    primes = tuple(int(rng.integers(2 ** (b - 1), 2**b)) | 1 for b in bits)
    fmt = ckks_wire.CiphertextFormat(16, primes, 20)
    blobs = [
        [
            fmt.encode(
                np.stack(
                    [
                        np.stack([rng.integers(0, q, 16, dtype=np.uint64) for q in primes])
                        for _ in range(2)
                    ]
                )
            )
            for _ in range(2)
        ]
        for _ in weights
    ]
    sums = fmt.weighted_sum([frame_blobs(c) for c in blobs], weights)
    for k in range(2):
        got = fmt.decode(sums[k])
        for p in range(2):
            for j, q in enumerate(primes):
                exact = [
                    sum(
                        w * int(fmt.decode(c[k])[p, j, t])
                        for w, c in zip(weights, blobs, strict=True)
                    )
                    % q
                    for t in range(16)
                ]
                assert [int(v) for v in got[p, j]] == exact


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
    fmt = public.format
    assert len(blob) == fmt.blob_size == 12 + 8 * 3 + 2 * 3 * 4 * 4096
    corrupted = bytearray(blob)
    corrupted[12:20] = bytes(8)  # the first prime in the header
    with pytest.raises(CkksError, match="cannot load ciphertext: header says"):
        public.load_ciphertext(bytes(corrupted))
    with pytest.raises(CkksError, match="cannot load ciphertext.*has exactly 98340"):
        public.load_ciphertext(blob[: len(blob) // 2])
    too_big = bytearray(blob)
    too_big[40:44] = (2**32 - 1).to_bytes(4, "little")  # a residue >= its 31-bit prime
    with pytest.raises(CkksError, match="residue >= its prime"):
        public.load_ciphertext(bytes(too_big))
    with pytest.raises(CkksError, match="contributor 1, ciphertext 0: a residue >= its prime"):
        ckks.weighted_sum(public, [[blob], [bytes(too_big)]], [1, 1])
    with pytest.raises(CkksError, match="bad magic"):
        public.load_ciphertext(b"SEAL" + blob[4:])
    framed = frame_blobs([blob, blob])
    assert public.count_framed(framed) == 2
    with pytest.raises(CkksError, match="not a whole"):
        public.count_framed(framed[:-1])
    with pytest.raises(CkksError, match="ciphertext 1 has length"):
        public.count_framed(framed[: 4 + len(blob)] + b"\x01" + framed[5 + len(blob) :])
    with pytest.raises(CkksError, match="total weight"):
        ckks.weighted_sum(public, [[blob], [blob]], [2**31, 2**31])
    trust = ckks.SecretContext(ckks.TRUST, seed=SEED)
    other = ckks.encrypt_vector(trust.public, np.ones(10), parallel=False)[0]
    with pytest.raises(CkksError, match="different CKKS"):
        public.load_ciphertext(other)
    with pytest.raises(CkksError, match="different CKKS parameters"):
        public.count_framed(frame_blobs([other[: fmt.blob_size]]))
    with pytest.raises(CkksError, match="preset 'trust', expected 'aggregation'"):
        ckks.PublicContext(ckks.AGGREGATION, trust.client_context_bytes())


def test_wire_roundtrip_through_seal(
    secret: ckks.SecretContext, public: ckks.PublicContext
) -> None:
    """SFCK -> SEAL (uncompressed, in memory) -> SFCK is the identity."""
    blob = ckks.encrypt_vector(public, np.linspace(-1, 1, 4096), parallel=False)[0]
    assert public.to_wire(public.load_ciphertext(blob)) == blob
    seal_bytes = public.to_seal_bytes(blob)
    assert seal_bytes[5] == 0  # compression mode none: SEAL reads it without zstd
    assert public.seal_bytes_to_wire(seal_bytes) == blob
    assert np.abs(secret.decrypt(blob, 4096) - np.linspace(-1, 1, 4096)).max() < 1e-12


def test_trust_preset_encrypted_inner_product_and_rotation() -> None:
    trust = ckks.SecretContext(ckks.TRUST, seed=SEED)
    server = ckks.PublicContext(ckks.TRUST, trust.server_context_bytes())
    client = ckks.PublicContext(ckks.TRUST, trust.client_context_bytes())
    assert server.has_evaluation_keys and not client.has_evaluation_keys
    assert len(trust.server_context_bytes()) > 10 * len(trust.client_context_bytes())
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 20_000)
    ref = rng.uniform(-1, 1, 20_000)
    blobs = ckks.encrypt_vector(client, x, parallel=False)
    got = trust.decrypt_any_level(server.inner_product_plain(blobs, ref))[0]
    assert got == pytest.approx(float(x @ ref), abs=1e-3)
    rotated = trust.decrypt(server.rotate(blobs[0], 1), 16384)
    assert np.abs(rotated[:-2] - x[2:16384]).max() < 1e-5  # one complex slot = two reals
    with pytest.raises(CkksError, match="has exactly"):
        server.load_ciphertext(blobs[0] + b"x")
