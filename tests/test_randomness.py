"""DESIGN 3b randomness: seeded streams are reproducible and independent; os streams are not."""

from __future__ import annotations

import numpy as np
import pytest

from secfl.crypto.drbg import AesCtrDrbg, derive_stream_key
from secfl.errors import ConfigError
from secfl.randomness import Randomness


def test_seeded_streams_repeat_for_the_same_tuple_only() -> None:
    r = Randomness("seeded", 42)
    a = r.stream("dp.noise", round_index=3, attempt=0, party="client:1").bytes(64)
    b = r.stream("dp.noise", round_index=3, attempt=0, party="client:1").bytes(64)
    assert a == b
    variants = [
        r.stream("dp.noise", round_index=4, attempt=0, party="client:1").bytes(64),
        r.stream("dp.noise", round_index=3, attempt=1, party="client:1").bytes(64),
        r.stream("dp.noise", round_index=3, attempt=0, party="client:2").bytes(64),
        r.stream("secagg.mask", round_index=3, attempt=0, party="client:1").bytes(64),
        Randomness("seeded", 43).stream("dp.noise", round_index=3, party="client:1").bytes(64),
    ]
    assert len({a, *variants}) == 6


def test_labels_are_length_prefixed() -> None:
    # ("ab", "c") and ("a", "bc") must not collide.
    k1 = derive_stream_key(0, round_index=0, attempt=0, party="ab", purpose="c")
    k2 = derive_stream_key(0, round_index=0, attempt=0, party="a", purpose="bc")
    assert k1 != k2


def test_drbg_is_the_aes256_ctr_keystream() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    expected = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(48))
    drbg = AesCtrDrbg(key)
    assert drbg.read(16) + drbg.read(32) == expected  # reads continue the stream


def test_os_streams_differ_and_design_purposes_are_seeded() -> None:
    r = Randomness("os", 0)
    assert r.secure
    assert r.stream("client.selection").bytes(32) != r.stream("client.selection").bytes(32)
    assert r.stream("data.partition").bytes(32) == r.stream("data.partition").bytes(32)
    assert not Randomness("seeded", 0).secure


def test_derived_values() -> None:
    s = Randomness("seeded", 1).stream("test")
    u = s.uniform(20000)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    ints = s.integers(7, 70000)
    counts = np.bincount(ints, minlength=7)
    assert ints.min() >= 0 and ints.max() <= 6
    assert np.abs(counts / 70000 - 1 / 7).max() < 0.01
    z = s.normal(50001)
    assert z.size == 50001 and abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert sorted(s.permutation(50).tolist()) == list(range(50))
    with pytest.raises(ConfigError):
        s.bernoulli(1.5, 3)
    with pytest.raises(ConfigError, match="security.randomness"):
        Randomness("urandom", 0)  # type: ignore[arg-type]
