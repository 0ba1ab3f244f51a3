"""A misbehaving server or network: every deviation aborts with SecAggAbort naming the
cause, the aborting client wipes its secrets, and no client ever releases both shares."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfl.config import MaskingConfig
from secfl.crypto.sign import SigningKey
from secfl.errors import SecAggAbort
from secfl.secagg import ShareReleaseLog
from secfl.secagg import messages as m
from secfl.wire import decode_message
from tests.test_secagg_protocol import Federation


def _drive_to(fed: Federation, stage: str):  # type: ignore[no-untyped-def]
    """Run the server until ``stage``; return (server, that stage's requests)."""
    srv = fed.server()
    while srv.stage != stage:
        srv.receive({c: fed.deliver(c, p) for c, p in srv.requests().items()})
    return srv, srv.requests()


def _request(fed: Federation, stage: str, client: int):  # type: ignore[no-untyped-def]
    srv, requests = _drive_to(fed, stage)
    return srv, decode_message(requests[client])


HANDLER = {
    "advertise_keys": "on_advertise_keys",
    "share_keys": "on_share_keys",
    "masked_input": "on_masked_input",
    "consistency_check": "on_consistency_check",
    "unmask": "on_unmask",
}


def _abort(fed: Federation, client: int, message: object, match: str) -> None:
    handler = getattr(fed.clients[client], HANDLER[m.REQUEST_STAGE[type(message)]])  # type: ignore[index]
    with pytest.raises(SecAggAbort, match=match):
        handler(message)
    assert fed.clients[client].stage == "aborted"
    assert not fed.clients[client].holds_secrets


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "consistency_check", "unmask"])
def test_wrong_round_aborts_and_wipes(stage: str) -> None:
    fed = Federation(5, 8, MaskingConfig())
    _, msg = _request(fed, stage, 1)
    _abort(fed, 1, dataclasses.replace(msg, round=msg.round + 1), "wrong round")


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "consistency_check", "unmask"])
def test_replayed_request_aborts_and_wipes(stage: str) -> None:
    fed = Federation(5, 8, MaskingConfig())
    _srv, requests = _drive_to(fed, stage)
    msg = decode_message(requests[2])
    getattr(fed.clients[2], HANDLER[stage])(msg)  # once is fine
    if stage == "unmask":
        # after unmask the client has nothing left to wipe; the replay is still refused
        with pytest.raises(SecAggAbort, match="replay"):
            fed.clients[2].on_unmask(msg)
        return
    _abort(fed, 2, msg, "replay")


def test_request_for_a_later_stage_aborts() -> None:
    fed = Federation(5, 8, MaskingConfig())
    _, requests = _drive_to(fed, "masked_input")
    fresh = Federation(5, 8, MaskingConfig())  # its client 0 has only advertised keys
    adv = decode_message(fed.server().requests()[0])
    fresh.clients[0].on_advertise_keys(adv)
    _abort(fresh, 0, decode_message(requests[0]), "wrong stage")


def test_replayed_advertise_and_stale_round_abort() -> None:
    fed = Federation(4, 8, MaskingConfig())
    adv = decode_message(fed.server(round_index=3).requests()[0])
    fed.clients[0].on_advertise_keys(adv)
    _abort(fed, 0, adv, "replay")
    old = decode_message(fed.server(round_index=2).requests()[0])
    with pytest.raises(SecAggAbort, match="stale round"):
        fed.clients[0].on_advertise_keys(old)


def test_wrong_lengths_abort() -> None:
    fed = Federation(5, 8, MaskingConfig())
    _, msg = _request(fed, "share_keys", 0)
    _abort(fed, 0, dataclasses.replace(msg, c_pks=msg.c_pks[:-1]), "wrong length")
    fed = Federation(5, 8, MaskingConfig())
    _, msg = _request(fed, "masked_input", 0)
    _abort(fed, 0, dataclasses.replace(msg, ciphertexts=msg.ciphertexts + b"x"), "wrong length")
    fed = Federation(5, 8, MaskingConfig())
    _, msg = _request(fed, "unmask", 0)
    _abort(fed, 0, dataclasses.replace(msg, signatures=msg.signatures[:-64]), "wrong length")


def test_wrong_sender_aborts() -> None:
    fed = Federation(9, 8, MaskingConfig(graph="k_regular", neighbors=2))
    srv, msg = _request(fed, "masked_input", 0)
    stranger = next(v for v in range(9) if v not in srv.neighbours[0] and v != 0)
    senders = tuple(sorted((*msg.senders[:-1], stranger)))
    _abort(fed, 0, dataclasses.replace(msg, senders=senders), "wrong sender")


def test_swapped_share_ciphertexts_abort_at_unmask() -> None:
    fed = Federation(5, 8, MaskingConfig(threshold=3))
    size = m.SHARE_CIPHERTEXT_BYTES

    def swap(stage: str, cid: int, payload: bytes) -> bytes:
        if stage != "masked_input" or cid != 0:
            return payload
        msg = decode_message(payload)
        blob = msg.ciphertexts
        swapped = blob[size : 2 * size] + blob[:size] + blob[2 * size :]
        return dataclasses.replace(msg, ciphertexts=swapped).to_bytes()

    srv = fed.run(tamper=swap)
    assert "does not authenticate" in fed.errors[0]
    assert fed.clients[0].stage == "aborted" and not fed.clients[0].holds_secrets
    assert srv.result is not None  # the others still had t shares of everything
    assert np.array_equal(srv.result.raw_sum, fed.expected_raw_sum(srv.result.survivors))


def test_bad_consistency_signature_aborts() -> None:
    fed = Federation(5, 8, MaskingConfig())
    _, msg = _request(fed, "unmask", 3)
    forged = bytearray(msg.signatures)
    forged[5] ^= 1
    _abort(
        fed,
        3,
        dataclasses.replace(msg, signatures=bytes(forged)),
        "bad signature: consistency signature of client 0",
    )


def test_substituted_advertised_key_aborts() -> None:
    fed = Federation(5, 8, MaskingConfig())
    _, msg = _request(fed, "share_keys", 4)
    c_pks = bytearray(msg.c_pks)
    c_pks[32 * 2 : 32 * 3] = bytes(range(32))  # the server swaps client 2's key for its own
    _abort(
        fed,
        4,
        dataclasses.replace(msg, c_pks=bytes(c_pks)),
        "bad signature: advertised keys of client 2",
    )


def test_substituted_identity_key_aborts_the_round() -> None:
    fed = Federation(5, 8, MaskingConfig())
    # The server (or a stale directory) holds a different identity key for client 1 and
    # re-signs client 1's keys with it; clients check against their pinned registry.
    impostor = SigningKey.from_seed(b"i" * 32)

    def tamper(stage: str, cid: int, payload: bytes) -> bytes:
        if stage != "share_keys":
            return payload
        msg = decode_message(payload)
        sig = bytearray(msg.signatures)
        pks = bytearray(msg.c_pks)
        pks[32:64] = bytes(range(1, 33))
        signed = m.advertise_signed_bytes(
            1, 0, 1, bytes(pks[32:64]), msg.s_pks[32:64], fed.server().params.digest()
        )
        sig[64:128] = impostor.sign(m.ADVERTISE_CONTEXT, signed)
        return dataclasses.replace(msg, c_pks=bytes(pks), signatures=bytes(sig)).to_bytes()

    with pytest.raises(SecAggAbort, match="below threshold"):
        fed.run(tamper=tamper)
    assert all(
        "advertised keys of client 1" in e or "altered this client's own" in e
        for e in fed.errors.values()
    )
    assert len(fed.errors) == 5
    assert not any(c.holds_secrets for c in fed.clients.values())


def test_server_drops_client_with_wrong_sender_or_round() -> None:
    fed = Federation(5, 8, MaskingConfig())
    srv = fed.server()
    requests = srv.requests()
    replies = {c: fed.deliver(c, p) for c, p in requests.items()}
    bad = decode_message(replies[3])
    replies[3] = dataclasses.replace(bad, sender=4).to_bytes()
    replies[4] = dataclasses.replace(decode_message(replies[4]), round=9).to_bytes()
    srv.receive(replies)
    assert "wrong sender" in srv.dropped[3] and "wrong round" in srv.dropped[4]
    assert srv.active == (0, 1, 2)


# ------------------------------------------------------------ never both shares


@settings(max_examples=10, deadline=None)
@given(first_dropped=st.booleans(), peer=st.integers(1, 4))
def test_client_never_releases_both_shares_for_a_peer(first_dropped: bool, peer: int) -> None:
    fed = Federation(5, 8, MaskingConfig(threshold=3))
    log = fed.clients[0].release_log
    drops = {"masked_input": {peer}} if first_dropped else {}
    fed.run(drops)
    kind = log.released(1, 0, peer)
    assert kind == ("s" if first_dropped else "b")
    # A malicious server replays round 1 attempt 0 to a restarted client that shares the
    # release log, now claiming the opposite survivor status: the client refuses.
    restarted = fed.make_client(0, log=log)
    adv = decode_message(fed.server().requests()[0])
    with pytest.raises(SecAggAbort, match="already released"):
        restarted.on_advertise_keys(adv)
    with pytest.raises(SecAggAbort, match=f"its {kind}-share was already released"):
        log.record(1, 0, {peer: "b" if kind == "s" else "s"})


def test_release_log_survives_restart_on_disk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "releases.jsonl"
    ShareReleaseLog(path).record(4, 1, {7: "b"})
    again = ShareReleaseLog(path)
    assert again.released(4, 1, 7) == "b"
    with pytest.raises(SecAggAbort, match="refusing to release the s-share of client 7"):
        again.record(4, 1, {7: "s"})


def test_unmask_reply_carries_exactly_one_share_kind_per_peer() -> None:
    fed = Federation(6, 8, MaskingConfig(threshold=3))
    captured = []

    def spy(stage: str, cid: int, payload: bytes) -> bytes:
        return payload

    srv = fed.server()
    while not srv.done:
        requests = srv.requests()
        replies = {}
        for c, p in requests.items():
            if srv.stage == "masked_input" and c == 4:
                replies[c] = None
                continue
            replies[c] = fed.deliver(c, p)
            if srv.stage == "unmask":
                captured.append(decode_message(replies[c]))
        srv.receive(replies)
    for res in captured:
        assert not set(res.b_owners) & set(res.s_owners)
        assert 4 in res.s_owners and 4 not in res.b_owners


# ------------------------------------------------------------ masked vectors look uniform


def test_masked_vector_is_statistically_uniform() -> None:
    d = 20_000
    fed = Federation(4, d, MaskingConfig(bits=32, max_weight=1))
    for i in fed.ids:  # a constant, very non-uniform input
        fed.updates[i] = (np.full(d, 0.25, dtype=np.float32), 1)
    _srv, requests = _drive_to(fed, "masked_input")
    res = decode_message(fed.deliver(0, requests[0]))
    words = res.masked32[:-1]
    # chi-square on the top 8 bits (256 bins) and on the low 8 bits
    for values in (words >> np.uint32(24), words & np.uint32(0xFF)):
        counts = np.bincount(values.astype(np.int64), minlength=256)
        expected = d / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 400.0  # df=255: p < 1e-9 beyond 400; a constant input would give ~5e6


def test_masked_input_with_wrong_padding_is_dropped() -> None:
    fed = Federation(5, 16, MaskingConfig(bits=32, max_weight=1))
    srv, requests = _drive_to(fed, "masked_input")
    replies = {c: fed.deliver(c, p) for c, p in requests.items()}
    res = decode_message(replies[2])
    assert res.masked32.ctypes.data % 4 == 0  # the pad aligns the zero-copy view
    replies[2] = dataclasses.replace(res, pad=b"\x01").to_bytes()
    srv.receive(replies)
    assert "wrong padding" in srv.dropped[2]
    assert 2 not in srv.u3
