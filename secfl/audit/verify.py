"""``secfl audit``: verify a run directory's audit trail against the server's public key.

Checks, with a key the auditor obtained separately (never one read from the run directory):

* ``events.jsonl``: every line is a record in canonical encoding whose ``hash`` matches its
  content and whose ``sig`` verifies under the key; ``seq`` runs 0, 1, 2, ... without gaps,
  duplicates or reordering; each ``prev`` names the hash of the record before; record 0
  carries the genesis binding (format, run id, key fingerprint, config fingerprint);
* ``events.head.json``: the log still holds the record the head names (nothing cut off the
  end);
* ``config.yaml`` has the fingerprint the genesis record binds; ``model.safetensors`` is the
  model the last round recorded;
* ``receipts/client-<id>.jsonl``: every receipt is signed by the key, is for this run and
  that client, was issued in the log (``receipts_issued`` names its hash), commits to the
  transcript hash the log recorded for that client, anchors a record of the log, and names
  the model hash the log recorded; and the client accepted it.

Each problem names the file, the line and the seq it concerns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfl.audit.chain import (
    FORMAT,
    GENESIS_PREV,
    canonical_bytes,
    key_fingerprint,
    record_hash,
    verify_record_signature,
)
from secfl.audit.events import head_path
from secfl.audit.messages import ServerReceipt
from secfl.audit.receipts import RECEIPTS_DIR, receipt_digest, verify_receipt
from secfl.errors import AuditError, MessageError, SecflError, SignatureError

EVENTS_NAME = "events.jsonl"


@dataclass(frozen=True)
class Problem:
    """One thing that did not verify: where (file, line, seq) and what."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class AuditResult:
    run_dir: Path
    key_fingerprint: str
    records: int = 0
    receipts: int = 0
    run_id: str | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "run_id": self.run_id,
            "server_key_fingerprint": self.key_fingerprint,
            "records": self.records,
            "receipts": self.receipts,
            "problems": [{"where": p.where, "what": p.what} for p in self.problems],
            "notes": list(self.notes),
        }


@dataclass
class _Line:
    number: int  # 1-based line number in events.jsonl
    raw: bytes
    record: dict[str, Any] | None
    intact: bool = False  # canonical, hash matches, signature verifies

    @property
    def seq(self) -> int | None:
        seq = self.record.get("seq") if self.record is not None else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    def where(self) -> str:
        seq = self.seq
        return f"{EVENTS_NAME} line {self.number}" + (f" (seq {seq})" if seq is not None else "")


def verify_run(run_dir: str | Path, server_key: bytes) -> AuditResult:
    """Check the audit trail of ``run_dir`` against the raw Ed25519 ``server_key``."""
    folder = Path(run_dir)
    result = AuditResult(folder, key_fingerprint(server_key))
    log = folder / EVENTS_NAME
    if not log.exists():
        raise AuditError(f"{log} does not exist: not a secfl run directory")
    lines = _read_lines(log, result)
    result.records = len(lines)
    _check_records(lines, server_key, result)
    _check_sequence(lines, result)
    records = [line.record for line in lines if line.intact and line.record is not None]
    _check_genesis(lines, result)
    _check_head(folder, lines, result)
    _check_config_and_model(folder, records, result)
    _check_receipts(folder, records, server_key, result)
    return result


def _read_lines(log: Path, result: AuditResult) -> list[_Line]:
    raw = log.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        result.notes.append(
            f"{EVENTS_NAME} ends in {len(raw) - keep} bytes of a torn line (a crash mid-write; "
            "not a record; resuming the run removes it)"
        )
    out = []
    for number, text in enumerate(raw[:keep].split(b"\n")[:-1], start=1):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        out.append(_Line(number, text, value if isinstance(value, dict) else None))
    return out


def _check_records(lines: list[_Line], server_key: bytes, result: AuditResult) -> None:
    for line in lines:
        record = line.record
        if record is None:
            result.problems.append(Problem(line.where(), "altered: not a JSON record"))
            continue
        if line.seq is None:
            result.problems.append(Problem(line.where(), "altered: no integer seq"))
            continue
        if canonical_bytes(record) != line.raw:
            result.problems.append(
                Problem(line.where(), "altered: the line is not in the canonical encoding")
            )
            continue
        if record.get("hash") != record_hash(record):
            result.problems.append(
                Problem(line.where(), "altered: the record's content does not match its hash")
            )
            continue
        if "sig" not in record:
            result.problems.append(Problem(line.where(), "unsigned record"))
            continue
        try:
            verify_record_signature(server_key, record)
        except SignatureError:
            result.problems.append(
                Problem(
                    line.where(),
                    "wrongly signed: the signature does not verify under the given server key",
                )
            )
            continue
        line.intact = True


def _check_sequence(lines: list[_Line], result: AuditResult) -> None:
    """Gaps, duplicates, reordering, and prev links between consecutive records."""
    seen: dict[int, int] = {}
    present = {line.seq for line in lines if line.seq is not None}
    highest = -1
    previous: _Line | None = None
    for line in lines:
        seq = line.seq
        if seq is None:
            previous = None
            continue
        if seq in seen:
            result.problems.append(
                Problem(line.where(), f"duplicated: seq {seq} already appears on line {seen[seq]}")
            )
        elif seq < highest:
            result.problems.append(
                Problem(line.where(), f"reordered: seq {seq} comes after seq {highest}")
            )
        elif seq > highest + 1:
            missing = [s for s in range(highest + 1, seq) if s not in present]
            if missing:
                gap = f"seq {missing[0]}" + (f" to {missing[-1]}" if len(missing) > 1 else "")
                what = f"missing: {gap} removed before this record"
            else:
                what = f"reordered: seq {seq} comes before seq {highest + 1}"
            result.problems.append(Problem(line.where(), what))
        elif previous is not None and previous.seq == seq - 1 and line.record is not None:
            prev_hash = previous.record.get("hash") if previous.record is not None else None
            if line.record.get("prev") != prev_hash:
                result.problems.append(
                    Problem(line.where(), f"chain broken: prev does not name seq {seq - 1}")
                )
        if seq == 0 and line.record is not None and line.record.get("prev") != GENESIS_PREV:
            result.problems.append(Problem(line.where(), "chain broken: record 0 must have prev 0"))
        seen.setdefault(seq, line.number)
        highest = max(highest, seq)
        previous = line
    if lines and 0 not in seen:
        result.problems.append(Problem(f"{EVENTS_NAME} line 1", "missing: seq 0 (genesis)"))


def _check_genesis(lines: list[_Line], result: AuditResult) -> None:
    first = next((line for line in lines if line.seq == 0 and line.record is not None), None)
    if first is None or first.record is None:
        return
    genesis = first.record.get("genesis")
    if not isinstance(genesis, dict):
        result.problems.append(Problem(first.where(), "genesis binding missing from record 0"))
        return
    result.run_id = str(genesis.get("run_id"))
    if genesis.get("format") != FORMAT:
        result.problems.append(
            Problem(first.where(), f"genesis format {genesis.get('format')!r}, expected {FORMAT}")
        )
    if genesis.get("server_key") != result.key_fingerprint:
        result.problems.append(
            Problem(
                first.where(),
                f"the genesis record names server key {genesis.get('server_key')}, "
                f"the given key is {result.key_fingerprint}",
            )
        )


def _check_head(folder: Path, lines: list[_Line], result: AuditResult) -> None:
    path = head_path(folder / EVENTS_NAME)
    where = path.name
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
        seq, digest = int(head["seq"]), str(head["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        result.problems.append(
            Problem(where, "missing or unreadable: cannot tell whether records were cut off")
        )
        return
    by_seq = {line.seq: line for line in lines if line.seq is not None}
    last = max(by_seq, default=-1)
    if seq > last:
        result.problems.append(
            Problem(
                where,
                f"missing: the log ends at seq {last} but the head names seq {seq}: "
                f"seq {last + 1} to {seq} were removed from the end",
            )
        )
        return
    named = by_seq[seq].record if seq in by_seq else None
    if named is None or named.get("hash") != digest:
        result.problems.append(
            Problem(where, f"the head names seq {seq} with a hash the log does not hold")
        )
    elif seq < last:
        result.notes.append(
            f"{last - seq} signed record(s) after the head (a crash between writing a record "
            "and the head)"
        )


def _check_config_and_model(
    folder: Path, records: list[dict[str, Any]], result: AuditResult
) -> None:
    genesis = records[0].get("genesis") if records and records[0].get("seq") == 0 else None
    bound = genesis.get("config_fingerprint") if isinstance(genesis, dict) else None
    config_path = folder / "config.yaml"
    if bound is not None and config_path.exists():
        from secfl.config import load_config

        try:
            fingerprint = load_config(config_path).fingerprint()
        except SecflError as exc:
            fingerprint = f"unloadable ({exc})"
        if fingerprint != bound:
            result.problems.append(
                Problem(
                    "config.yaml",
                    f"fingerprint {fingerprint} differs from the one the log binds ({bound})",
                )
            )
    rounds = [r for r in records if r.get("event") == "round_completed" and "model_hash" in r]
    model_path = folder / "model.safetensors"
    if rounds and model_path.exists():
        from safetensors import safe_open

        with safe_open(str(model_path), framework="numpy") as f:
            saved = (f.metadata() or {}).get("model_hash")
        if saved != rounds[-1]["model_hash"]:
            result.problems.append(
                Problem(
                    "model.safetensors",
                    f"model_hash {saved} is not the model of the last round in the log "
                    f"(round {rounds[-1].get('round')}: {rounds[-1]['model_hash']})",
                )
            )


_RECEIPT_FILE = re.compile(r"client-(\d+)\.jsonl")


def _check_receipts(
    folder: Path, records: list[dict[str, Any]], server_key: bytes, result: AuditResult
) -> None:
    malicious = {
        c for r in records if r.get("event") == "adversary_selected" for c in r.get("clients", [])
    }
    for r in records:
        if r.get("event") != "receipts_issued":
            continue
        for client, reason in sorted((r.get("disputed") or {}).items()):
            what = (
                f"client {client} did not accept its receipt for round {r.get('round')}: {reason}"
            )
            if int(client) in malicious:
                result.notes.append(
                    f"{r.get('event')} seq {r.get('seq')}: {what} (simulated malicious client)"
                )
            else:
                result.problems.append(Problem(f"{EVENTS_NAME} seq {r.get('seq')}", what))
    folder_receipts = folder / RECEIPTS_DIR
    if not folder_receipts.is_dir() or result.run_id is None:
        return
    run_id = bytes.fromhex(result.run_id)
    issued_lists: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("event") == "receipts_issued":
            issued_lists.setdefault((r["round"], r["attempt"]), []).append(r)
    transcripts: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("event") == "round_transcript":
            transcripts.setdefault((r["round"], r["attempt"]), []).append(r)
    hashes = {r.get("hash") for r in records}
    for path in sorted(folder_receipts.glob("client-*.jsonl")):
        match = _RECEIPT_FILE.fullmatch(path.name)
        if match is None:
            continue
        client_id = int(match.group(1))
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{RECEIPTS_DIR}/{path.name} line {number}"
            problem = _check_one_receipt(
                text, client_id, server_key, run_id, issued_lists, transcripts, hashes
            )
            result.receipts += 1
            if problem is not None:
                result.problems.append(Problem(where, problem))
                continue
            entry = json.loads(text)
            if not entry.get("accepted", False):
                what = (
                    f"client {client_id} disputed its receipt for round {entry.get('round')}: "
                    f"{entry.get('reason')}"
                )
                if client_id in malicious:
                    result.notes.append(f"{where}: {what} (a simulated malicious client)")
                else:
                    result.problems.append(Problem(where, what))


def _check_one_receipt(
    text: str,
    client_id: int,
    server_key: bytes,
    run_id: bytes,
    issued: dict[tuple[int, int], list[dict[str, Any]]],
    transcripts: dict[tuple[int, int], list[dict[str, Any]]],
    hashes: set[Any],
) -> str | None:
    try:
        entry = json.loads(text)
        raw = bytes.fromhex(entry["receipt"])
        receipt = ServerReceipt.from_bytes(raw)
    except (ValueError, KeyError, TypeError, MessageError) as exc:
        return f"not a receipt ({exc})"
    try:
        verify_receipt(receipt, server_key=server_key, run_id=run_id, client_id=client_id)
    except AuditError as exc:
        return f"rejected: {exc}"
    key = (receipt.round, receipt.attempt)
    digest = receipt_digest(raw)
    events = [e for e in issued.get(key, []) if e.get("receipts", {}).get(str(client_id)) == digest]
    if not events:
        return (
            f"the log has no receipts_issued record for round {receipt.round} attempt "
            f"{receipt.attempt} naming this receipt (hash {digest[:16]}...)"
        )
    if events[0].get("model_hash") != receipt.model_hash.hex():
        return "the receipt's model hash differs from the one the log recorded"
    if receipt.log_head.hex() not in hashes:
        return "the receipt's log_head names no record of the log"
    recorded_hashes = {
        (t.get("clients", {}).get(str(client_id)) or {}).get("hash")
        for t in transcripts.get(key, [])
    }
    if receipt.commitment.hex() not in recorded_hashes:
        return "the receipt's commitment differs from the transcript hash the log recorded"
    return None


#: Exit codes of ``secfl audit``.
EXIT_VERIFIED = 0
EXIT_FAILED = 1
EXIT_UNVERIFIED = 3
_SHOWN = 50


def audit_command(run_dir: Path, *, server_key_path: str | None, as_json: bool) -> int:
    """``secfl audit``: verify (with a key) and print the ledger; the exit code says which."""
    from secfl.crypto.sign import load_public_key
    from secfl.errors import RunDirectoryError
    from secfl.privacy.report import format_ledger, load_ledger

    try:
        ledger: dict[str, Any] | None = load_ledger(run_dir)
    except RunDirectoryError:
        ledger = None
    result: AuditResult | None = None
    if server_key_path is not None:
        try:
            key = load_public_key(Path(server_key_path).expanduser().read_bytes())
        except (OSError, SignatureError) as exc:
            raise AuditError(f"cannot read --server-key {server_key_path!r}: {exc}") from None
        if Path(server_key_path).resolve().is_relative_to(run_dir.resolve()):
            raise AuditError(
                f"--server-key {server_key_path!r} lies inside the run directory: a key read "
                "from the run directory proves nothing; use the key the server's operator "
                "gave you"
            )
        result = verify_run(run_dir, key)
    code = (
        EXIT_UNVERIFIED if result is None else (EXIT_VERIFIED if result.verified else EXIT_FAILED)
    )
    if as_json:
        document: dict[str, Any] = result.to_json() if result is not None else {"verified": None}
        document["status"] = _status(result)
        document["ledger"] = ledger
        print(json.dumps(document, indent=1))
        return code
    print(f"audit of {run_dir}")
    if result is None:
        print(
            "UNVERIFIED: no --server-key given, so nothing below is verified. The log's own "
            f"claim (read from the run directory, proving nothing): {_claimed_key(run_dir)}. "
            "Obtain the server's public key separately and pass --server-key PATH."
        )
    else:
        print(f"server key fingerprint: {result.key_fingerprint}")
        print(f"run id: {result.run_id}")
        print(
            f"{EVENTS_NAME}: {result.records} records; receipts: {result.receipts} checked; "
            f"problems: {len(result.problems)}"
        )
        for problem in result.problems[:_SHOWN]:
            print(f"  PROBLEM {problem}")
        if len(result.problems) > _SHOWN:
            print(f"  ... and {len(result.problems) - _SHOWN} more (--json lists all)")
        for note in result.notes:
            print(f"  note: {note}")
    print()
    marker = "" if result is not None and result.verified else "[UNVERIFIED] "
    if ledger is None:
        print(f"{marker}privacy ledger: none (the run configured no DP mechanism)")
    else:
        for line in format_ledger(ledger).splitlines():
            print(f"{marker}{line}" if line else line)
    print()
    print(_status(result))
    return code


def _status(result: AuditResult | None) -> str:
    if result is None:
        return "UNVERIFIED (no --server-key)"
    if result.verified:
        return "VERIFIED: chain, signatures and receipts check out under the given key"
    return f"NOT VERIFIED: {len(result.problems)} problem(s)"


def _claimed_key(run_dir: Path) -> str:
    try:
        first = (run_dir / EVENTS_NAME).read_text(encoding="utf-8").split("\n", 1)[0]
        genesis = json.loads(first).get("genesis", {})
        return f"signed by the key with fingerprint {genesis.get('server_key')}"
    except (OSError, ValueError, AttributeError):
        return "no readable genesis record"
