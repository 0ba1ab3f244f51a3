"""Deployment building blocks: certificates, framing, and the mutual-TLS hub on 127.0.0.1.

The hub tests run a real gRPC server with mutual TLS in this process (threads) and drive
it with honest and hostile parties; tests/test_deploy_processes.py runs whole rounds with
one process per party.
"""

from __future__ import annotations

import datetime
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from secfl.audit.events import read_events
from secfl.config import config_from_dict
from secfl.crypto import x509 as fx
from secfl.deploy import pki
from secfl.deploy.framing import (
    CHUNK_BYTES,
    Assembler,
    ChunkHeader,
    FramingError,
    message_limits,
    split_message,
)
from secfl.deploy.hub import Hub, start_server
from secfl.deploy.party import PartyConnection, channel_credentials, hello_frame, reply_frames
from secfl.deploy.proto import secfl_pb2 as pb
from secfl.deploy.proto import secfl_pb2_grpc as pb_grpc
from secfl.deploy.roles import ThreadSafeEventLog, check_deployable
from secfl.encode.flatten import model_hash
from secfl.errors import AuthenticationError, ConfigError
from secfl.messages import FitIns, FitRes
from secfl.wire import decode_message

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "f" * 64


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "pki"
    pki.init_pki(folder, clients=4, decryptor=True)
    pki.revoke(folder, "client-3")
    return folder


# -- certificates -------------------------------------------------------------------------


def test_certificates_carry_role_id_and_identity_key(pki_dir: Path) -> None:
    federation = pki.Federation(pki_dir / "federation")
    client = pki.Credentials.load(pki_dir / "client-1")
    party = federation.verify(client.cert_pem, roles=("client",))
    assert (party.role, party.party_id) == ("client", 1)
    assert party.identity_key == client.identity().public_bytes()
    # the registry holds the unrevoked clients' pinned keys, from the certificates only
    assert sorted(federation.client_keys()) == [0, 1, 2]
    assert federation.client_keys()[1] == party.identity_key
    server = pki.Credentials.load(pki_dir / "server-0")
    assert server.party.role == "server" and server.identity_seed is None
    assert (pki_dir / "client-1" / "identity.key").stat().st_mode & 0o777 == 0o600


def test_refused_certificates(pki_dir: Path, tmp_path: Path) -> None:
    federation = pki.Federation(pki_dir / "federation")
    with pytest.raises(AuthenticationError, match="revoked"):
        federation.verify(pki.Credentials.load(pki_dir / "client-3").cert_pem, roles=("client",))
    with pytest.raises(AuthenticationError, match="role 'decryptor' is not allowed"):
        federation.verify(pki.Credentials.load(pki_dir / "decryptor-0").cert_pem, roles=("client",))
    # a certificate from another CA, with the same role and id
    other = pki.init_pki(tmp_path / "other", clients=2, decryptor=False)
    with pytest.raises(AuthenticationError, match="not issued by the federation CA"):
        federation.verify(pki.Credentials.load(other / "client-1").cert_pem, roles=("client",))
    cert = fx.cert_from_pem(pki.Credentials.load(pki_dir / "client-0").cert_pem)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    with pytest.raises(AuthenticationError, match="valid"):
        fx.verify_party_certificate(
            cert, ca_cert=federation.ca_cert, crl=federation.crl(), roles=("client",), now=later
        )


def test_issue_and_revoke_take_effect_without_restart(tmp_path: Path) -> None:
    folder = pki.init_pki(tmp_path / "p", clients=2, decryptor=False)
    federation = pki.Federation(folder / "federation")
    pki.issue(folder, "client", 5)
    assert sorted(federation.client_keys()) == [0, 1, 5]
    pki.revoke(folder, "client-0")
    assert sorted(federation.client_keys()) == [1, 5]
    with pytest.raises(ConfigError, match="no certificate was issued"):
        pki.revoke(folder, "client-9")
    with pytest.raises(ConfigError, match="already holds a CA"):
        pki.init_pki(folder, clients=1)


# -- framing ------------------------------------------------------------------------------


def _fit_ins(size: int, round_index: int = 1) -> bytes:
    weights = np.arange(size, dtype=np.float32)
    return FitIns(round=round_index, attempt=0, model_hash=b"h" * 32, weights=weights).to_bytes()


def test_large_message_crosses_in_chunks_and_limits_are_checked_first() -> None:
    payload = _fit_ins(900_000)  # 3.6 MB: four chunks
    limits = message_limits(model_size=900_000, num_clients=10)
    pieces = list(split_message(payload))
    assert len(pieces) == -(-len(payload) // CHUNK_BYTES) == 4
    assembler = Assembler(limits)
    header = ChunkHeader(7, 1, 1, len(payload))
    results = [assembler.add(header, i, data, last) for i, data, last in pieces]
    assert results[:-1] == [None] * 3
    assert results[-1] is not None and results[-1][1] == payload

    small = message_limits(model_size=10, num_clients=10)
    with pytest.raises(FramingError, match="exceeds its limit"):
        Assembler(small).add(header, 0, pieces[0][1], False)
    with pytest.raises(FramingError, match="not accepted"):
        Assembler(limits).add(ChunkHeader(7, 999, 1, 10), 0, b"x" * 10, True)
    with pytest.raises(FramingError, match="version"):
        Assembler(limits).add(ChunkHeader(7, 1, 9, 10), 0, b"x" * 10, True)
    out_of_order = Assembler(limits)
    out_of_order.add(header, 0, pieces[0][1], False)
    with pytest.raises(FramingError, match="out of order"):
        out_of_order.add(header, 2, pieces[2][1], False)
    lying = Assembler(limits)  # the chunk header says FitIns, the payload is a FitRes
    res = FitRes(1, 0, 0, b"h", 1, 0.0, np.zeros(3, np.float32)).to_bytes()
    with pytest.raises(FramingError, match="payload's own header disagrees"):
        lying.add(ChunkHeader(1, 1, 1, len(res)), 0, res, True)


def test_limits_admit_ckks_contexts_and_model_updates() -> None:
    limits = message_limits(model_size=100_000, num_clients=20)
    assert limits[200] > 35 * 2**20  # CkksFitIns with a public context up to 35 MB
    assert limits[203] > 35 * 2**20  # ContextReply
    assert limits[106] >= 8 * 100_000  # a masked input of 64-bit words
    assert limits[3] < 8 * 2**20  # a ClientFailure is never large


def test_deployment_accepts_only_os_randomness_and_protected_modes() -> None:
    base = {"aggregation": {"protection": "masking", "min_cohort": 2}}
    check_deployable(config_from_dict(base))
    with pytest.raises(ConfigError, match="accept only 'os'"):
        check_deployable(config_from_dict({**base, "security": {"randomness": "seeded"}}))
    with pytest.raises(ConfigError, match="not deployable"):
        check_deployable(config_from_dict({}))
    # refinement is not run by serve/join: refused rather than silently skipped
    with pytest.raises(ConfigError, match="refine is not run by secfl serve/join"):
        check_deployable(config_from_dict({**base, "refine": {"shared": {}}}))


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    work = tmp_path / "repo"
    (work / "secfl" / "deploy" / "proto").mkdir(parents=True)
    shutil.copytree(ROOT / "protocols", work / "protocols")
    shutil.copytree(ROOT / "scripts", work / "scripts")
    env_python = Path(sys.executable).parent
    subprocess.run(
        ["bash", str(work / "scripts" / "gen_proto")],
        check=True,
        capture_output=True,
        env={"PATH": f"{env_python}:/usr/bin:/bin"},
    )
    for name in ("secfl_pb2.py", "secfl_pb2_grpc.py", "secfl_pb2.pyi"):
        fresh = (work / "secfl" / "deploy" / "proto" / name).read_text()
        assert fresh == (ROOT / "secfl" / "deploy" / "proto" / name).read_text(), name


# -- the hub: real gRPC with mutual TLS on 127.0.0.1 -------------------------------------


class _Server:
    def __init__(self, folder: Path, pki_dir: Path) -> None:
        self.events = ThreadSafeEventLog(folder / "events.jsonl")  # hub threads emit too
        federation = pki.Federation(pki_dir / "federation")
        creds = pki.Credentials.load(pki_dir / "server-0")
        self.hub = Hub(
            federation,
            events=self.events,
            config_fingerprint=FINGERPRINT,
            limits=message_limits(model_size=1000, num_clients=4),
            client_keys=federation.client_keys(),
        )
        self.server, self.port = start_server(
            self.hub,
            listen="127.0.0.1:0",
            cert_pem=creds.cert_pem,
            key_pem=creds.key_pem,
            ca_pem=federation.ca_pem,
            max_parties=4,
        )

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stop(self) -> None:
        self.hub.close_all("test over")
        self.server.stop(grace=0.5).wait(3)
        self.events.close()

    def rejections(self) -> list[str]:
        return [
            e["reason"] for e in read_events(self.events.path) if e["event"] == "deploy_rejected"
        ]


@pytest.fixture
def hub_server(tmp_path: Path, pki_dir: Path) -> Iterator[_Server]:
    server = _Server(tmp_path, pki_dir)
    try:
        yield server
    finally:
        server.stop()


def _honest(client_id: int) -> Any:
    def handle(payload: bytes) -> bytes:
        ins = decode_message(payload)
        assert isinstance(ins, FitIns)
        return FitRes(
            ins.round, ins.attempt, client_id, ins.model_hash, 10, 0.5, ins.weights + client_id
        ).to_bytes()

    return handle


def _start_party(server: _Server, pki_dir: Path, name: str, handler: Any) -> threading.Thread:
    connection = PartyConnection(
        server.address,
        pki.Credentials.load(pki_dir / name),
        handler,
        config_fingerprint=FINGERPRINT,
        limits=message_limits(model_size=1000, num_clients=4),
        deadline_s=10,
    )
    thread = threading.Thread(target=connection.run, daemon=True)
    thread.start()
    return thread


class _Raw:
    """A hand-driven party stream (for hostile behaviour)."""

    def __init__(self, server: _Server, credentials: grpc.ChannelCredentials) -> None:
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.channel = grpc.secure_channel(server.address, credentials)

        def frames() -> Iterator[Any]:
            while (item := self.outbox.get()) is not None:
                yield item

        self.responses = pb_grpc.FederationStub(self.channel).Connect(frames())

    def hello(self, fingerprint: str = FINGERPRINT) -> Any:
        self.outbox.put(hello_frame(fingerprint))
        return next(self.responses)

    def next_request(self) -> tuple[int, bytes]:
        assembler = Assembler(message_limits(model_size=1000, num_clients=4))
        for frame in self.responses:
            if frame.WhichOneof("body") != "chunk":
                continue
            c = frame.chunk
            header = ChunkHeader(c.exchange, c.message_type, c.message_version, c.total_bytes)
            done = assembler.add(header, c.index, c.data, c.last)
            if done is not None:
                return done[0].exchange, done[1]
        raise AssertionError("stream ended")

    def send(self, exchange: int, payload: bytes) -> None:
        for frame in reply_frames(exchange, payload):
            self.outbox.put(frame)

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


def _creds(pki_dir: Path, name: str) -> grpc.ChannelCredentials:
    return channel_credentials(pki.Credentials.load(pki_dir / name))


def _wait_refused(raw: _Raw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        raw.hello()
    raw.close()
    return info.value


def test_unauthenticated_wrong_role_and_revoked_parties_are_refused(
    hub_server: _Server, pki_dir: Path
) -> None:
    ca = pki.Credentials.load(pki_dir / "client-0").ca_pem
    # no client certificate: the TLS handshake itself fails
    error = _wait_refused(_Raw(hub_server, grpc.ssl_channel_credentials(root_certificates=ca)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # a server certificate (key usage serverAuth only) is refused by the TLS layer itself
    error = _wait_refused(_Raw(hub_server, _creds(pki_dir, "server-0")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # a decryptor certificate is a valid TLS client, but the role is wrong for this run
    error = _wait_refused(_Raw(hub_server, _creds(pki_dir, "decryptor-0")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "role 'decryptor' is not allowed" in error.details()
    error = _wait_refused(_Raw(hub_server, _creds(pki_dir, "client-3")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in error.details()
    raw = _Raw(hub_server, _creds(pki_dir, "client-0"))  # another run's configuration
    with pytest.raises(grpc.RpcError) as info:
        raw.hello(fingerprint="0" * 64)
    raw.close()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    refused = [e for e in read_events(hub_server.events.path) if e["event"] == "deploy_refused"]
    assert len(refused) == 3
    assert hub_server.hub.connected("client") == set()
    # and the server still serves an honest client
    _start_party(hub_server, pki_dir, "client-1", _honest(1))
    assert hub_server.hub.wait_for("client", 1, 10)
    reply = hub_server.hub.exchange("client", {1: _fit_ins(5)}, timeout=10)[1]
    assert reply is not None and decode_message(reply).client_id == 1  # type: ignore[attr-defined]


def test_identity_comes_from_the_certificate_and_hostile_replies_are_rejected(
    hub_server: _Server, pki_dir: Path
) -> None:
    _start_party(hub_server, pki_dir, "client-0", _honest(0))
    raw = _Raw(hub_server, _creds(pki_dir, "client-2"))
    welcome = raw.hello()
    assert (welcome.welcome.role, welcome.welcome.party_id) == ("client", 2)
    assert hub_server.hub.wait_for("client", 2, 10)
    hub = hub_server.hub
    answers: dict[str, Any] = {}

    def exchange(name: str, round_index: int) -> None:
        answers[name] = hub.exchange(
            "client", {0: _fit_ins(5, round_index), 2: _fit_ins(5, round_index)}, timeout=5
        )

    # 1. client 2 submits a reply in client 0's name, then replays it on the same exchange
    worker = threading.Thread(target=exchange, args=("impersonation", 1))
    worker.start()
    number, request = raw.next_request()
    ins = decode_message(request)
    forged = FitRes(1, 0, 0, ins.model_hash, 10, 0.0, np.zeros(5, np.float32)).to_bytes()  # type: ignore[attr-defined]
    raw.send(number, forged)
    raw.send(number, forged)
    worker.join()
    assert answers["impersonation"][2] is None  # client 2 counts as a dropout
    assert decode_message(answers["impersonation"][0]).client_id == 0  # type: ignore[arg-type, attr-defined]

    # 2. a reply from round 1 replayed in round 2 (its own id), 3. a malformed payload
    worker = threading.Thread(target=exchange, args=("replay", 2))
    worker.start()
    number, _ = raw.next_request()
    old = FitRes(1, 0, 2, b"h" * 32, 10, 0.0, np.zeros(5, np.float32)).to_bytes()
    raw.send(number, old)
    worker.join()
    assert answers["replay"][2] is None and answers["replay"][0] is not None
    worker = threading.Thread(target=exchange, args=("malformed", 3))
    worker.start()
    number, _ = raw.next_request()
    raw.send(number, old[:-7])  # right header, truncated fields
    worker.join()
    assert answers["malformed"][2] is None and answers["malformed"][0] is not None

    # 4. an oversized message: refused from its announced size, the stream is closed
    raw.outbox.put(
        pb.PartyFrame(
            chunk=pb.Chunk(
                exchange=1,
                message_type=2,
                message_version=1,
                total_bytes=2**34,
                index=0,
                data=b"x",
                last=False,
            )
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        raw.next_request()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    raw.close()
    deadline = time.monotonic() + 5
    while 2 in hub.connected("client") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.connected("client") == {0}

    reasons = hub_server.rejections()
    assert any("a client cannot submit for another" in r for r in reasons)
    assert any("not outstanding" in r for r in reasons)
    assert any("round 1 to a request for round 2 (replayed)" in r for r in reasons)
    assert any("malformed reply" in r for r in reasons)
    assert any("exceeds its limit" in r for r in reasons)
    # the server is unharmed: the honest client still gets through
    reply = hub.exchange("client", {0: _fit_ins(5, 4)}, timeout=10)[0]
    assert reply is not None and decode_message(reply).round == 4  # type: ignore[attr-defined]


def test_straggler_becomes_a_dropout_and_its_late_reply_is_discarded(
    hub_server: _Server, pki_dir: Path
) -> None:
    release = threading.Event()

    def slow(payload: bytes) -> bytes:
        release.wait(10)
        return _honest(1)(payload)

    _start_party(hub_server, pki_dir, "client-1", slow)
    assert hub_server.hub.wait_for("client", 1, 10)
    started = time.monotonic()
    replies = hub_server.hub.exchange("client", {1: _fit_ins(5), 2: _fit_ins(5)}, timeout=0.5)
    assert replies == {1: None, 2: None}  # 2 never connected, 1 too slow
    assert time.monotonic() - started < 3
    release.set()
    deadline = time.monotonic() + 5
    while not hub_server.rejections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("not outstanding" in r for r in hub_server.rejections())


def test_keys_command_and_serve_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from secfl.cli import main

    out = tmp_path / "pki"
    assert main(["keys", "init", "--out", str(out), "--clients", "2", "--no-decryptor"]) == 0
    assert sorted(p.name for p in (out / "federation" / "certs").iterdir()) == [
        "client-0.pem",
        "client-1.pem",
        "server-0.pem",
    ]
    assert main(["keys", "issue", "--pki", str(out), "--role", "client", "--id", "2"]) == 0
    assert main(["keys", "revoke", "--pki", str(out), "client-0"]) == 0
    assert sorted(pki.Federation(out / "federation").client_keys()) == [1, 2]
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text(
        "security: {randomness: seeded}\naggregation: {protection: masking, min_cohort: 2}\n"
    )
    assert main(["serve", str(seeded), "--out", str(tmp_path / "run"), "--pki", str(out)]) == 2
    assert "accept only 'os'" in capsys.readouterr().err
    plain = tmp_path / "plain.yaml"
    plain.write_text("aggregation: {protection: none}\n")
    client = ["--credentials", str(out / "client-1"), "--federation", str(out / "federation")]
    assert main(["join", str(plain), "--server", "localhost:1", *client, "--state", "s"]) == 2
    assert "not deployable" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_client_data_file_must_match_the_model(tmp_path: Path) -> None:
    from secfl.data.datasets import Dataset
    from secfl.deploy.join import _load_npz
    from secfl.errors import DataError

    like = Dataset("digits", np.zeros((4, 64), np.float32), np.zeros(4, np.int64), 10)
    good = tmp_path / "mine.npz"
    np.savez(good, x=np.ones((7, 64)), y=np.arange(7) % 10)
    mine = _load_npz(good, like)
    assert len(mine) == 7 and mine.num_classes == 10 and mine.x.dtype == np.float32
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.ones((7, 63)), y=np.arange(7))
    with pytest.raises(DataError, match="the model expects"):
        _load_npz(bad, like)
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        _load_npz(tmp_path / "missing.npz", like)


def test_client_sample_level_ledger_survives_a_restart(pki_dir: Path, tmp_path: Path) -> None:
    from secfl.deploy.join import build_client

    config = config_from_dict(
        {
            "data": {"dataset": "digits", "num_clients": 4, "partition": {"kind": "iid"}},
            "model": {"kind": "mlp", "hidden": [8]},
            "client": {"epochs": 1},
            "aggregation": {"protection": "masking", "min_cohort": 2},
            "privacy": {"sample_level": {"noise_multiplier": 1.0, "delta": 1e-4}},
        }
    )
    credentials = pki.Credentials.load(pki_dir / "client-1")
    federation = pki.Federation(pki_dir / "federation")
    app, handler, size = build_client(config, credentials, federation, tmp_path)
    assert app.privacy is not None and app.privacy.ledger.events == []
    weights = np.zeros(size, np.float32)
    ins = FitIns(round=1, attempt=0, model_hash=model_hash(weights), weights=weights)
    reply = handler(ins.to_bytes())
    assert reply is not None and isinstance(decode_message(reply), FitRes)
    assert len(app.privacy.ledger.events) == 1
    # a restarted client process reads its ledger back: the charge is not forgotten
    again, _, _ = build_client(config, credentials, federation, tmp_path)
    assert again.privacy is not None
    assert [(e.round, e.attempt) for e in again.privacy.ledger.events] == [(1, 0)]
    assert again.privacy.ledger.epsilon() == pytest.approx(app.privacy.ledger.epsilon())
