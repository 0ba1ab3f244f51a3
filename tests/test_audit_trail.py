"""The signed, hash-chained audit trail: chain and signatures, receipts, `secfl audit`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import secfl.runner
from secfl.audit.chain import GENESIS_PREV, canonical_bytes, seal
from secfl.audit.events import EventLog, head_path, read_events
from secfl.audit.keys import load_or_create_audit_key, public_key_path
from secfl.audit.messages import RECEIPT_CONTEXT, ServerReceipt, receipt_body
from secfl.audit.receipts import ReceiptBook, verify_receipt
from secfl.audit.transcript import Transcript
from secfl.audit.verify import verify_run
from secfl.cli import main
from secfl.config import RunConfig
from secfl.crypto.sign import SigningKey, public_key_pem
from secfl.encode.flatten import model_hash
from secfl.errors import AuditError
from secfl.messages import FitIns
from secfl.runner import run
from secfl.transport.base import Transport
from secfl.wire import decode_message

from .conftest import small_config

SERVER = SigningKey.from_seed(bytes(range(32)))  # tests only: a fixed server audit key
OTHER = SigningKey.from_seed(bytes(range(1, 33)))
RECORDS = 12


# ------------------------------------------------------------------ the chain alone


def _write_log(folder: Path, signer: SigningKey = SERVER) -> list[bytes]:
    log = EventLog(folder / "events.jsonl", clock=lambda: 1.5, signer=signer)
    log.emit("run_started", config_fingerprint="f" * 64, randomness="seeded", secure=False,
             protection="none")  # fmt: skip
    for r in range(1, RECORDS):
        log.emit("round_started", round=r, attempt=0, participants=[0, 1, 2])
    log.close()
    return (folder / "events.jsonl").read_bytes().splitlines(keepends=True)


def _rewrite(folder: Path, lines: list[bytes]) -> None:
    (folder / "events.jsonl").write_bytes(b"".join(lines))


def _resign(lines: list[bytes], signer: SigningKey) -> list[bytes]:
    """An attacker's rewrite: a consistent chain under ``signer``."""
    out, prev = [], GENESIS_PREV
    for line in lines:
        record = {k: v for k, v in json.loads(line).items() if k not in ("hash", "sig")}
        record["prev"] = prev
        sealed = seal(record, signer)
        prev = sealed["hash"]
        out.append(canonical_bytes(sealed) + b"\n")
    return out


def _problems(folder: Path, key: SigningKey = SERVER) -> list[str]:
    return [str(p) for p in verify_run(folder, key.public_bytes()).problems]


KAT_LINE = (
    '{"event":"warning","genesis":{"config_fingerprint":null,"format":"secfl-audit/1",'
    '"run_id":"00000000000000000000000000000000",'
    '"server_key":"605a0d553d17ef6ae76bd1bd6667c226d750df806c9af0d722b073b9bbe813b8"},'
    '"hash":"a611531f942114cc18d814c15b516346f8f8eed735bac0daa270c7181e8828b1",'
    '"message":"h\\u00e9llo",'
    '"prev":"0000000000000000000000000000000000000000000000000000000000000000","seq":0,'
    '"sig":"ca48fcc9e82ef2e7c0a8f651f7ab23efa3ca7cc7cb3462bfa70951f5ab3e7f6e739f500ab9c90c'
    '3154d6fc23fd132a817b6d758a7b48723eefef1e1398065a01","time":1.5}'
)


def test_known_answer_record_vector() -> None:
    """protocols/audit_log.md's vector: Ed25519 seed of 32 zero bytes, record 0."""
    key = SigningKey.from_seed(bytes(32))
    log_dir = Path(tempfile.mkdtemp())
    try:
        log = EventLog(log_dir / "events.jsonl", clock=lambda: 1.5, signer=key, run_id="00" * 16)
        log.emit("warning", message="h\u00e9llo")
        log.close()
        assert (log_dir / "events.jsonl").read_text() == KAT_LINE + "\n"
    finally:
        shutil.rmtree(log_dir)
    # the hash by hand: SHA-256 of the domain label and the line without hash and sig
    body = json.loads(KAT_LINE)
    del body["hash"], body["sig"]
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert (
        hashlib.sha256(b"secfl/audit/record/v1\n" + text).hexdigest()
        == json.loads(KAT_LINE)["hash"]
    )


def test_untouched_log_verifies_and_read_events_hides_chain_fields(tmp_path: Path) -> None:
    lines = _write_log(tmp_path)
    assert _problems(tmp_path) == []
    first = json.loads(lines[0])
    assert first["prev"] == GENESIS_PREV and first["genesis"]["format"] == "secfl-audit/1"
    assert len(first["genesis"]["run_id"]) == 32
    assert [json.loads(x)["prev"] for x in lines[1:]] == [json.loads(x)["hash"] for x in lines[:-1]]
    events = read_events(tmp_path / "events.jsonl")
    assert [e["seq"] for e in events] == list(range(RECORDS))
    assert not {"prev", "hash", "sig", "genesis"} & set(events[0])
    assert json.loads(head_path(tmp_path / "events.jsonl").read_text())["seq"] == RECORDS - 1
    # the same log checked against another key: every record is wrongly signed
    wrong = _problems(tmp_path, OTHER)
    assert sum("wrongly signed" in p for p in wrong) == RECORDS


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["alter", "alter_rehash", "remove", "swap", "resign"]),
    index=st.integers(0, RECORDS - 1),
)
def test_any_change_to_any_record_is_detected_and_located(kind: str, index: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lines = _write_log(folder)
        line_of = f"events.jsonl line {index + 1}"
        if kind == "alter":  # change a value, keep hash and signature
            record = json.loads(lines[index])
            record["time"] = 2.5
            lines[index] = canonical_bytes(record) + b"\n"
            expect = [f"{line_of} (seq {index}): altered"]
        elif kind == "alter_rehash":  # change a value and recompute the hash: no key to sign
            record = json.loads(lines[index])
            record["time"] = 2.5
            forged = seal({k: v for k, v in record.items() if k not in ("hash", "sig")}, None)
            forged["sig"] = record["sig"]
            lines[index] = canonical_bytes(forged) + b"\n"
            expect = [f"{line_of} (seq {index}): wrongly signed"]
        elif kind == "remove":
            del lines[index]
            expect = (
                [f"events.head.json: missing: the log ends at seq {index - 1}"]
                if index == RECORDS - 1
                else [f"{line_of} (seq {index + 1}): missing: seq {index} removed"]
            )
        elif kind == "swap":
            i = min(index, RECORDS - 2)
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
            expect = [
                f"events.jsonl line {i + 1} (seq {i + 1}): reordered",
                f"events.jsonl line {i + 2} (seq {i}): reordered",
            ]
        else:  # re-sign everything, consistently, with another key
            lines = _resign(lines, OTHER)
            expect = [f"{line_of} (seq {index}): wrongly signed"]
        _rewrite(folder, lines)
        problems = _problems(folder)
        assert problems, f"{kind} at {index} went undetected"
        for expected in expect:
            assert any(p.startswith(expected) for p in problems), (expected, problems)
        if kind in ("alter", "alter_rehash"):  # only the altered record is named (and its
            # successor's link, or the head naming its old hash)
            named = (line_of + " ", f"events.jsonl line {index + 2} ", "events.head.json")
            assert all(p.startswith(named) for p in problems), problems


def test_torn_tail_is_repaired_and_the_chain_continues(tmp_path: Path) -> None:
    _write_log(tmp_path)
    with (tmp_path / "events.jsonl").open("ab") as f:
        f.write(b'{"event":"round_sta')  # a crash mid-write
    # before the repair the auditor is told, and every whole record still verifies
    result = verify_run(tmp_path, SERVER.public_bytes())
    assert result.verified and any("torn" in n for n in result.notes)
    log = EventLog(tmp_path / "events.jsonl", signer=SERVER)
    log.emit("warning", message="after the crash")
    log.close()
    assert _problems(tmp_path) == []
    events = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events[-2:]] == ["log_repaired", "warning"]
    assert events[-2]["seq"] == RECORDS and events[-2]["dropped_bytes"] == 19
    with pytest.raises(AuditError, match="signed by the audit key"):
        EventLog(tmp_path / "events.jsonl", signer=OTHER)


# ------------------------------------------------------------------ receipts


def _receipt(signer: SigningKey = SERVER, **overrides: Any) -> ServerReceipt:
    fields: dict[str, Any] = {
        "run_id": b"A" * 16,
        "round": 1,
        "attempt": 0,
        "client_id": 0,
        "participants": (0, 1, 2),
        "survivors": (0, 1, 2),
        "commitment": b"",
        "model_hash": b"m" * 32,
        "aggregate_hash": b"g" * 32,
        "log_head": b"h" * 32,
        "signature": b"",
    }
    fields.update(overrides)
    unsigned = ServerReceipt(**fields)
    return ServerReceipt(
        **{**fields, "signature": signer.sign(RECEIPT_CONTEXT, receipt_body(unsigned))}
    )


def test_receipt_from_another_run_round_attempt_client_or_key_is_rejected() -> None:
    book = ReceiptBook(0, server_key=SERVER.public_bytes(), run_id=b"A" * 16)
    request = FitIns(round=1, attempt=0, model_hash=b"x", weights=np.zeros(3, np.float32))
    book.witness(request, request.to_bytes(), b"reply bytes")
    own = Transcript(0, 1, 0)
    own.add(request.to_bytes(), b"reply bytes")
    good = _receipt(commitment=own.digest())
    cases = {
        "another run": _receipt(run_id=b"B" * 16, commitment=own.digest()),
        "another round": _receipt(round=2, commitment=own.digest()),
        "another attempt": _receipt(attempt=1, commitment=own.digest()),
        "another client": _receipt(client_id=1, commitment=own.digest()),
        "another key": _receipt(OTHER, commitment=own.digest()),
        "another transcript": _receipt(commitment=b"\x00" * 32),
    }
    reasons = {}
    for name, receipt in cases.items():
        ack = book.on_receipt(receipt)
        assert not ack.accepted, name
        reasons[name] = ack.reason
    assert "run" in reasons["another run"]
    assert "exchanged nothing" in reasons["another round"]
    assert "exchanged nothing" in reasons["another attempt"]
    assert "client 1" in reasons["another client"]
    assert "signature" in reasons["another key"]
    assert "own transcript" in reasons["another transcript"]
    assert book.receipts == {}
    assert book.on_receipt(good).accepted and book.receipts[1] == good
    # verify_receipt pins the round it expects, so a replayed old receipt fails too
    with pytest.raises(AuditError, match="expected round 2"):
        verify_receipt(
            good,
            server_key=SERVER.public_bytes(),
            run_id=b"A" * 16,
            client_id=0,
            round_index=2,
            attempt=0,
        )
    # and the next broadcast must carry the promised model
    weights = np.ones(3, np.float32)
    with pytest.raises(Exception, match="promised"):
        book.check_broadcast(
            FitIns(round=2, attempt=0, model_hash=model_hash(weights), weights=weights)
        )
    assert any("different models" in d for d in book.detections)


# ------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def server_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The server's key file (outside any run directory) and its public key for auditors."""
    folder = tmp_path_factory.mktemp("server-keys")
    (folder / "audit.pem").write_bytes(SERVER.private_pem())
    (folder / "audit.pub").write_bytes(public_key_pem(SERVER.public_bytes()))
    return folder / "audit.pem", folder / "audit.pub"


def _config(key: Path, **overrides: Any) -> RunConfig:
    settings = {"rounds": 2, "security.audit_key": str(key), "evaluation.per_client": False}
    return small_config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def two_runs(
    tmp_path_factory: pytest.TempPathFactory, server_key: tuple[Path, Path]
) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("runs")
    a = run(_config(server_key[0]), base / "a").out_dir
    b = run(_config(server_key[0]), base / "b").out_dir
    return a, b


def test_a_run_records_what_the_auditor_needs(two_runs: tuple[Path, Path]) -> None:
    a, _ = two_runs
    events = read_events(a / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.count("round_transcript") == 2 and kinds.count("receipts_issued") == 2
    done = [e for e in events if e["event"] == "round_completed"]
    issued = [e for e in events if e["event"] == "receipts_issued"]
    assert [d["model_hash"] for d in done] == [i["model_hash"] for i in issued]
    assert all(i["accepted"] == [0, 1, 2, 3, 4] and i["disputed"] == {} for i in issued)
    transcript = next(e for e in events if e["event"] == "round_transcript")
    assert set(transcript["clients"]) == {"0", "1", "2", "3", "4"}
    assert all(c["requests"] == c["replies"] == 1 for c in transcript["clients"].values())
    lines = (a / "receipts" / "client-3.jsonl").read_text().splitlines()
    stored = [json.loads(x) for x in lines]
    assert [(s["round"], s["accepted"], s["included"]) for s in stored] == [
        (1, True, True),
        (2, True, True),
    ]
    receipt = ServerReceipt.from_bytes(bytes.fromhex(stored[0]["receipt"]))
    assert receipt.commitment.hex() == stored[0]["own_commitment"]
    assert receipt.commitment.hex() == transcript["clients"]["3"]["hash"]
    # the run directory holds no private key, only the key's fingerprint
    for path in a.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_secfl_audit_exit_codes_and_located_change(
    two_runs: tuple[Path, Path],
    server_key: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, _ = two_runs
    public = str(server_key[1])
    assert main(["audit", str(a), "--server-key", public]) == 0
    out = capsys.readouterr().out
    assert "VERIFIED" in out and "problems: 0" in out and "NOT VERIFIED" not in out
    assert main(["audit", str(a)]) == 3
    out = capsys.readouterr().out
    assert "UNVERIFIED" in out and "privacy ledger: none" in out
    other = tmp_path / "other.pub"
    other.write_text(OTHER.public_bytes().hex())
    assert main(["audit", str(a), "--server-key", str(other)]) == 1
    assert "wrongly signed" in capsys.readouterr().out
    # a key read from inside the run directory is refused
    shutil.copy(public, a / "server.pub")
    try:
        assert main(["audit", str(a), "--server-key", str(a / "server.pub")]) == 2
        assert "inside the run directory" in capsys.readouterr().err
    finally:
        (a / "server.pub").unlink()
    # alter one round record in a copy: exit 1, and the record is named
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    lines = (copy / "events.jsonl").read_bytes().splitlines(keepends=True)
    index = next(i for i, x in enumerate(lines) if b'"round_completed"' in x)
    lines[index] = lines[index].replace(b'"round":1', b'"round":7')
    (copy / "events.jsonl").write_bytes(b"".join(lines))
    assert main(["audit", str(copy), "--server-key", public, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is False
    assert report["problems"][0]["where"] == f"events.jsonl line {index + 1} (seq {index})"
    assert report["problems"][0]["what"].startswith("altered")


def test_receipts_from_another_run_fail_the_audit(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_runs
    copy = tmp_path / "b"
    shutil.copytree(b, copy)
    # the seeded runs exchanged identical bytes, so only the run id tells the receipts apart
    foreign = (a / "receipts" / "client-0.jsonl").read_text().splitlines()[0]
    with (copy / "receipts" / "client-0.jsonl").open("a") as f:
        f.write(foreign + "\n")
    problems = [str(p) for p in verify_run(copy, SERVER.public_bytes()).problems]
    assert len(problems) == 1 and problems[0].startswith("receipts/client-0.jsonl line 3")
    assert "receipt is for run" in problems[0]
    # a receipt of round 1 replayed as the file's only line for client 1 still belongs to
    # round 1: it verifies, so the log's receipts_issued record is what pins the round
    lines = (copy / "receipts" / "client-1.jsonl").read_text().splitlines()
    entry = json.loads(lines[1])
    receipt = ServerReceipt.from_bytes(bytes.fromhex(entry["receipt"]))
    forged = _receipt(
        run_id=receipt.run_id,
        round=1,
        client_id=1,
        participants=receipt.participants,
        commitment=receipt.commitment,
    )
    entry["receipt"] = forged.to_bytes().hex()
    (copy / "receipts" / "client-1.jsonl").write_text(lines[0] + "\n" + json.dumps(entry) + "\n")
    problems = [str(p) for p in verify_run(copy, SERVER.public_bytes()).problems]
    assert any(
        p.startswith("receipts/client-1.jsonl line 2") and "no receipts_issued" in p
        for p in problems
    ), problems


@pytest.mark.parametrize("mode", ["masking", "ckks"])
def test_secure_modes_and_resume_after_a_torn_tail_verify(
    mode: str, server_key: tuple[Path, Path], tmp_path: Path
) -> None:
    config = _config(server_key[0], **{"aggregation.protection": mode, "aggregation.min_cohort": 3})
    folder = tmp_path / mode
    run(config, folder, stop_after=1)
    with (folder / "events.jsonl").open("ab") as f:
        f.write(b'{"event":"round_started","att')  # killed mid-write
    with (folder / "receipts" / "client-2.jsonl").open("ab") as f:
        f.write(b'{"accepted": tr')  # a client killed mid-write too
    resumed = run(config, folder, resume=True)
    assert [r["round"] for r in resumed.history] == [1, 2]
    result = verify_run(folder, SERVER.public_bytes())
    assert result.verified, [str(p) for p in result.problems]
    assert result.receipts == 10  # 5 clients x 2 rounds, each accepted and logged
    kinds = [e["event"] for e in read_events(folder / "events.jsonl")]
    assert "log_repaired" in kinds and "run_resumed" in kinds
    assert kinds.index("log_repaired") < kinds.index("run_resumed")
    # resuming under another server key is refused
    (tmp_path / "other.pem").write_bytes(OTHER.private_pem())
    other = _config(
        tmp_path / "other.pem", **{"aggregation.protection": mode, "aggregation.min_cohort": 3}
    )
    with pytest.raises(AuditError, match="signed by the audit key"):
        run(other, folder, resume=True)


class _SplitView:
    """A malicious server's transport: in round 2 client 0 gets a different model (whose
    weights match the hash it carries), everyone else the real broadcast."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        altered = dict(requests)
        message = decode_message(requests[next(iter(requests))]) if requests else None
        if isinstance(message, FitIns) and message.round == 2 and 0 in requests:
            weights = np.array(message.weights) + np.float32(0.01)
            altered[0] = FitIns(
                round=2, attempt=message.attempt, model_hash=model_hash(weights), weights=weights
            ).to_bytes()
        return self.inner.exchange(altered)


def test_a_server_giving_clients_different_models_is_caught_by_receipts(
    monkeypatch: pytest.MonkeyPatch, server_key: tuple[Path, Path], tmp_path: Path
) -> None:
    original: Callable[..., Transport] = secfl.runner.with_simulated_dropouts

    def wrapped(inner: Transport, *args: Any, **kwargs: Any) -> Transport:
        return _SplitView(original(inner, *args, **kwargs))

    monkeypatch.setattr(secfl.runner, "with_simulated_dropouts", wrapped)
    folder = tmp_path / "split"
    run(_config(server_key[0], rounds=3), folder)
    events = read_events(folder / "events.jsonl")
    refused = [e for e in events if e["event"] == "client_dropped" and e["round"] == 2]
    assert [e["client"] for e in refused] == [0]
    assert "signed receipt for round 1 promised" in refused[0]["reason"]
    assert "different models" in refused[0]["reason"]
    others = [e for e in events if e["event"] == "round_completed" and e["round"] == 2]
    assert others[0]["survivors"] == [1, 2, 3, 4]
    # the auditor sees the dispute: the server's transcript of client 0 is not what client 0
    # received, so client 0 rejected its round-2 receipt
    problems = [str(p) for p in verify_run(folder, SERVER.public_bytes()).problems]
    assert any("client 0" in p and "round 2" in p for p in problems), problems


def test_default_audit_key_is_private_random_and_outside_run_dirs(tmp_path: Path) -> None:
    home = Path(os.environ["SECFL_HOME"])
    assert tmp_path.parents[1] in home.parents or "secfl-home" in str(home)  # never ~
    key = load_or_create_audit_key()
    path = home / "keys" / "server_audit_ed25519.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_path(path).read_bytes() == public_key_pem(key.public_bytes())
    assert load_or_create_audit_key().public_bytes() == key.public_bytes()
    os.environ["SECFL_HOME"] = str(tmp_path / "elsewhere")  # restored by the autouse fixture
    assert load_or_create_audit_key().public_bytes() != key.public_bytes()
    inside = tmp_path / "run" / "audit.pem"
    inside.parent.mkdir()
    inside.write_bytes(key.private_pem())
    with pytest.raises(AuditError, match="inside the run directory"):
        load_or_create_audit_key(inside, run_dir=tmp_path / "run")
    with pytest.raises(AuditError, match="does not exist"):
        load_or_create_audit_key(tmp_path / "missing.pem")


@pytest.mark.slow  # the torn-tail tests above cover the repair; this kills a real process
def test_sigkilled_cli_run_resumes_to_a_verifiable_chain(
    server_key: tuple[Path, Path], tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    import yaml

    raw = _config(server_key[0], rounds=4).to_dict()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    folder = tmp_path / "killed"
    command = [sys.executable, "-m", "secfl", "run", str(config), "--no-progress"]
    proc = subprocess.Popen([*command, "--out", str(folder)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = folder / "metrics.json"
            if metrics.exists() and '"round": 2' in metrics.read_text():
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    subprocess.run([*command, "--resume", str(folder)], check=True, capture_output=True)
    audit = [sys.executable, "-m", "secfl", "audit", str(folder)]
    out = subprocess.run([*audit, "--server-key", str(server_key[1])], capture_output=True)
    assert out.returncode == 0, out.stdout.decode()[-3000:]
    assert subprocess.run(audit, capture_output=True).returncode == 3
