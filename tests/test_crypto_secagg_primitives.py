"""Known-answer and property tests for the SecAgg primitives in secfl/crypto."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfl.crypto import aead, shamir
from secfl.crypto.hkdf import derive_key, encode_info, hkdf_sha256
from secfl.crypto.kex import KeyPair, public_from_private, x25519_agree
from secfl.crypto.prg import (
    MaskEngine,
    _Spans,
    ctr_encryptor,
    expand_into,
    keystream,
    reduce_mod,
)
from secfl.errors import AuthenticationError, ConfigError, ProtocolError
from secfl.randomness import Randomness

# ----------------------------------------------------------------------- PRG (AES-CTR)


def test_prg_known_answers_aes_zero_key() -> None:
    # FIPS-197 style: AES-128 / AES-256 under the all-zero key of the blocks 0 and 1.
    assert keystream(bytes(16), 32).hex() == (
        "66e94bd4ef8a2c3b884cfa59ca342b2e58e2fccefa7e3061367f1d57a4e7455a"
    )
    assert keystream(bytes(32), 16).hex() == "dc95c078a2408989ad48a21492842087"


def test_prg_counter_matches_sp800_38a_ctr_vector() -> None:
    # NIST SP 800-38A F.5.1 CTR-AES128.Encrypt, block 1.
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    counter = int.from_bytes(bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"), "big")
    plaintext = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    ciphertext = ctr_encryptor(key, counter).update(plaintext)
    assert ciphertext.hex() == "874d6191b620e3261bef6864990db6ce"


def test_prg_rejects_short_seeds() -> None:
    with pytest.raises(ConfigError, match="16 or 32 bytes"):
        keystream(bytes(8), 16)


def test_expand_into_at_offset_matches_the_stream_slice() -> None:
    seed = bytes(range(32))
    full = np.frombuffer(keystream(seed, 4 * 1000), dtype="<u4")
    out = np.empty(500, dtype=np.uint32)
    expand_into(seed, out, start_word=400)
    assert np.array_equal(out, full[400:900])
    with pytest.raises(ConfigError, match="aligned"):
        expand_into(seed, out, start_word=3)


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1, 3000),
    threads=st.integers(1, 3),
    chunk=st.sampled_from([64, 128, 1024]),
    plus=st.integers(0, 3),
    minus=st.integers(0, 3),
    arrays=st.integers(0, 2),
    wide=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    with_fill=st.booleans(),
)
def test_mask_engine_matches_reference(
    size: int,
    threads: int,
    chunk: int,
    plus: int,
    minus: int,
    arrays: int,
    wide: bool,
    seed: int,
    with_fill: bool,
) -> None:
    dtype = np.uint64 if wide else np.uint32
    word = "<u8" if wide else "<u4"
    stream = Randomness("seeded", seed).stream("test")
    seeds = [stream.bytes(32 if i % 2 else 16) for i in range(plus + minus)]
    terms = [stream.uint64(size).astype(dtype) for _ in range(arrays)]
    expected = np.zeros(size, dtype=dtype)
    for i, s in enumerate(seeds):
        mask = np.frombuffer(keystream(s, size * np.dtype(dtype).itemsize), dtype=word)
        expected = expected + mask if i < plus else expected - mask
    for t in terms:
        expected = expected + t
    out = np.full(size, 7, dtype=dtype)
    if with_fill:  # the fill sees every word once, in chunks of at most chunk words

        def fill(lo: int):  # type: ignore[no-untyped-def]
            def run(c0: int, c1: int, acc: np.ndarray, /) -> None:
                assert 0 < c1 - c0 <= chunk and acc.size == c1 - c0
                acc[:] = np.arange(c0, c1, dtype=dtype) * dtype(3)

            return run

        expected = expected + np.arange(size, dtype=dtype) * dtype(3)
    else:
        out[:] = 0
    MaskEngine(threads=threads, chunk_words=chunk).accumulate(
        out,
        add_arrays=terms,
        add_seeds=seeds[:plus],
        sub_seeds=seeds[plus:],
        fill=fill if with_fill else None,
    )
    assert np.array_equal(out, expected)


@settings(max_examples=50, deadline=None)
@given(
    chunks=st.integers(1, 40),
    workers=st.integers(1, 4),
    order=st.lists(st.integers(0, 3), min_size=1, max_size=200),
)
def test_spans_hand_out_every_chunk_exactly_once(
    chunks: int, workers: int, order: list[int]
) -> None:
    # Any interleaving of claims (workers that start late, or never) covers every chunk once.
    spans = _Spans(chunks, workers)
    seen: list[int] = []
    done: set[int] = set()
    for w in (o % workers for o in order):
        if w in done:
            continue
        index = spans.claim(w)
        if index is None:
            done.add(w)
        else:
            seen.append(index)
    while (index := spans.claim(0)) is not None:
        seen.append(index)
    assert sorted(seen) == list(range(chunks))


def test_spans_take_an_unstarted_span_whole_and_halve_a_running_one() -> None:
    spans = _Spans(8, 2)
    assert spans.enter(0)
    assert [spans.claim(0) for _ in range(4)] == [0, 1, 2, 3]
    assert spans.claim(0) == 4  # worker 1 never started: its whole span moves to worker 0
    assert spans.spans[1] == [4, 4]
    spans = _Spans(8, 2)
    assert spans.enter(0) and spans.enter(1)
    assert spans.claim(1) == 4
    assert [spans.claim(0) for _ in range(4)] == [0, 1, 2, 3]
    assert spans.claim(0) == 6  # worker 1 holds 5..7: worker 0 steals the upper half
    assert spans.claim(1) == 5
    assert spans.claim(0) == 7
    assert spans.claim(0) is None and spans.claim(1) is None


def test_mask_engine_error_in_a_fill_reaches_the_caller() -> None:
    def fill(lo: int):  # type: ignore[no-untyped-def]
        def run(c0: int, c1: int, out: np.ndarray, /) -> None:
            if c0 >= 256:
                raise ValueError("bad chunk")
            out.fill(0)

        return run

    out = np.zeros(1024, dtype=np.uint32)
    for threads in (1, 2, 3):
        with pytest.raises(ValueError, match="bad chunk"):
            MaskEngine(threads=threads, chunk_words=64).accumulate(out, fill=fill)


def test_reduce_mod() -> None:
    x = np.array([2**31 + 5, 17], dtype=np.uint32)
    assert reduce_mod(x, 8).tolist() == [5, 17]


# ----------------------------------------------------------------------- HKDF


def test_hkdf_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_info_is_domain_separated() -> None:
    ikm = bytes(32)
    keys = {
        derive_key(ikm, "secagg/pair-mask", 1, 0, 2, 3),
        derive_key(ikm, "secagg/pair-mask", 1, 0, 23),
        derive_key(ikm, "secagg/share-key", 1, 0, 2, 3),
        derive_key(ikm, "secagg/pair-mask", 1, 1, 2, 3),
        derive_key(ikm, "secagg/pair-mask", b"\x01", 0, 2, 3),
    }
    assert len(keys) == 5
    assert encode_info("a", (1,)) != encode_info("a", (b"\x00" * 7 + b"\x01",))
    with pytest.raises(ConfigError):
        encode_info("a", (-1,))


# ----------------------------------------------------------------------- X25519, AES-GCM


def test_x25519_rfc7748_vector() -> None:
    alice = KeyPair(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert alice.public.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert alice.agree(bob_public).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )
    assert public_from_private(alice.private_bytes) == alice.public
    alice.wipe()
    assert alice.wiped
    with pytest.raises(ConfigError, match="wiped"):
        alice.agree(bob_public)


def test_x25519_refuses_low_order_points() -> None:
    with pytest.raises(AuthenticationError):
        x25519_agree(os.urandom(32), bytes(32))


def test_aead_round_trip_and_every_tamper_fails() -> None:
    key = bytes(range(32))
    nonce = aead.direction_nonce(3, 5)
    sealed = aead.seal(key, nonce, b"share", b"ad")
    assert aead.open_sealed(key, nonce, sealed, b"ad") == b"share"
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    for args in (
        (key, nonce, flipped, b"ad"),
        (key, nonce, sealed, b"other"),
        (key, aead.direction_nonce(5, 3), sealed, b"ad"),
        (bytes(32), nonce, sealed, b"ad"),
    ):
        with pytest.raises(AuthenticationError, match="did not authenticate"):
            aead.open_sealed(*args)


# ----------------------------------------------------------------------- Shamir


def _residues(seed: int):  # type: ignore[no-untyped-def]
    stream = Randomness("seeded", seed).stream("shamir")
    return lambda high, size: stream.integers(high, size)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    data=st.data(),
    secrets=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not(
    n: int, data: st.DataObject, secrets: int, seed: int
) -> None:
    t = data.draw(st.integers(1, n))
    raw = Randomness("seeded", seed).stream("secret").bytes(32 * secrets)
    secret = np.frombuffer(raw, dtype=np.uint8).reshape(secrets, 32)
    xs = np.array(
        data.draw(st.lists(st.integers(1, 2**31 - 2), min_size=n, max_size=n, unique=True))
    )
    shares = shamir.split(shamir.secret_to_elements(secret), xs, t, _residues(seed))
    subset = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=t, max_size=t, unique=True)))
    pts = np.tile(xs[subset], (secrets, 1))
    ys = np.stack([shares[subset, s, :] for s in range(secrets)])
    recovered = shamir.elements_to_secret(shamir.reconstruct(pts, ys), 32)
    assert np.array_equal(recovered, secret)
    if t >= 2:
        fewer = subset[: t - 1]
        # Interpolating t-1 shares alone (as if they sufficed) misses the secret: with one
        # point fewer, every candidate secret is equally consistent with them.
        wrong = shamir.reconstruct(np.array([xs[fewer]]), np.stack([shares[fewer, 0, :]]))
        assert not np.array_equal(wrong[0], shamir.secret_to_elements(secret)[0])


def test_shamir_batched_matches_single_and_refuses_bad_input() -> None:
    rng = _residues(1)
    secret = np.frombuffer(bytes(range(64)), dtype=np.uint8).reshape(2, 32)
    xs = np.arange(1, 8)
    shares = shamir.split(shamir.secret_to_elements(secret), xs, 4, rng)
    single = [
        shamir.reconstruct(np.array([xs[[0, 2, 4, 6]]]), shares[[0, 2, 4, 6], s, :][None])
        for s in range(2)
    ]
    batched = shamir.reconstruct(
        np.array([xs[[0, 2, 4, 6]], xs[[1, 2, 3, 5]]]),
        np.stack([shares[[0, 2, 4, 6], 0, :], shares[[1, 2, 3, 5], 1, :]]),
    )
    assert np.array_equal(batched[0], single[0][0])
    assert np.array_equal(shamir.elements_to_secret(batched, 32), secret)
    with pytest.raises(ConfigError, match="distinct"):
        shamir.split(shamir.secret_to_elements(secret), [1, 1, 2], 2, rng)
    with pytest.raises(ConfigError, match="threshold"):
        shamir.split(shamir.secret_to_elements(secret), [1, 2], 3, rng)
    with pytest.raises(ProtocolError, match="residue"):
        shamir.reconstruct(np.array([[1, 2]]), np.full((1, 2, 11), 2**31, dtype=np.uint64))


@pytest.mark.parametrize("bits", [24, 32, 40, 64])
def test_decode_mean_matches_decode_sum(bits: int) -> None:
    from secfl.config import MaskingConfig
    from secfl.secagg.encoding import decode_mean, decode_sum
    from secfl.secagg.params import derive_params

    params = derive_params(
        MaskingConfig(graph="complete", bits=bits, max_weight=4), n=10, min_cohort=3
    )
    rng = np.random.default_rng(bits)
    total = rng.integers(0, 2**bits, 4097, dtype=np.uint64).astype(params.word_dtype)
    total[:4] = [0, (1 << (bits - 1)) - 1, 1 << (bits - 1), (1 << bits) - 1]  # sign edges
    total[-1] = 17
    mean, weight, _ = decode_sum(params, total)
    fast_mean, fast_weight = decode_mean(params, total)
    assert fast_weight == weight == 17
    assert fast_mean.dtype == np.float32
    assert np.array_equal(fast_mean, mean)
