"""One process per party on 127.0.0.1: secure DP rounds over mutual TLS, a server
killed with SIGKILL mid-round that resumes with a fresh attempt, and the trust module
(vote over sub-cohorts, ``trust.dormant.reset``) run by the deployed server.

Every process is started with ``python -m secfl`` (the installed command line) and stopped
in a ``finally``; ports come from binding port 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from secfl.audit.events import read_events
from secfl.deploy import pki
from secfl.record.checkpoint import read_checkpoint

CLIENTS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Starts ``secfl`` subcommands, keeps their logs, and always stops them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "secfl", *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        self.running[name] = process
        return process

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.running[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.folder.glob("*.log"))
        )

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "pki"
    pki.init_pki(folder, clients=CLIENTS, decryptor=True)
    return folder


def _config(
    folder: Path, protection: str, rounds: int, extra: dict[str, Any] | None = None
) -> Path:
    """The deployment's YAML; ``extra`` replaces or adds top-level blocks (``None`` drops one)."""
    raw: dict[str, Any] = {
        "name": f"deploy-{protection}",
        "seed": 0,
        "rounds": rounds,
        "security": {"randomness": "os"},
        "data": {"dataset": "digits", "num_clients": CLIENTS, "partition": {"kind": "iid"}},
        "model": {"kind": "mlp", "hidden": [16]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "evaluation": {"per_client": False},
        "aggregation": {"protection": protection, "min_cohort": 2},
        "privacy": {"user_level": {"noise_multiplier": 0.1, "delta": 1e-2, "clip_norm": 1.0}},
    }
    if protection == "ckks":
        raw["aggregation"]["ckks"] = {"clip_range": 4.0}
    for key, value in (extra or {}).items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = folder / f"{protection}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start_federation(
    procs: Processes, pki_dir: Path, config: Path, out: Path, port: int, *, decryptor: bool
) -> None:
    procs.start(
        "server",
        "serve", str(config), "--out", str(out), "--pki", str(pki_dir),
        "--listen", f"127.0.0.1:{port}", "--connect-timeout", "90", "--stage-timeout", "30",
    )  # fmt: skip
    if decryptor:
        procs.start(
            "decryptor",
            "decryptor", str(config), "--server", f"localhost:{port}", "--pki", str(pki_dir),
            "--out", str(out.parent / "decryptor"), "--deadline", "90",
        )  # fmt: skip
    for i in range(CLIENTS):
        procs.start(
            f"client-{i}",
            "join", str(config), "--server", f"localhost:{port}",
            "--credentials", str(pki_dir / f"client-{i}"),
            "--federation", str(pki_dir / "federation"),
            "--state", str(out.parent / f"state-{i}"), "--deadline", "90",
        )  # fmt: skip


def _events(out: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(out / "events.jsonl") if e["event"] == kind]


def _completed_rounds(procs: Processes, out: Path) -> list[dict[str, Any]]:
    """Wait for the server and every client to exit 0; the metrics rows, each round with
    every client surviving."""
    assert procs.wait("server", 150) == 0, procs.logs()
    for i in range(CLIENTS):
        assert procs.wait(f"client-{i}", 20) == 0, procs.logs()
    rounds: list[dict[str, Any]] = json.loads((out / "metrics.json").read_text())["rounds"]
    assert all(r["survivors"] == CLIENTS and r["dropped"] == 0 for r in rounds)
    return rounds


@pytest.mark.parametrize("protection", ["masking", "ckks"])
def test_secure_dp_rounds_over_mutual_tls(
    protection: str, procs: Processes, pki_dir: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, protection, rounds=2)
    out = tmp_path / "run"
    _start_federation(procs, pki_dir, config, out, _free_port(), decryptor=protection == "ckks")
    rounds = _completed_rounds(procs, out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["accuracy"] > 0.15  # 10 classes: it learnt from the noised sums
    connected = _events(out, "deploy_connected")
    assert sorted({e["party"] for e in connected if e["role"] == "client"}) == [0, 1, 2]
    dp = _events(out, "dp_event")
    assert [(e["round"], e["level"]) for e in dp] == [(1, "user"), (2, "user")]
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["rounds"][-1]["user_level"]["epsilon"] > 0
    if protection == "masking":
        assert len(_events(out, "secagg_unmasked")) == 2
    else:
        assert procs.wait("decryptor", 20) == 0, procs.logs()
        releases = [
            e
            for e in read_events(tmp_path / "decryptor" / "decryptor-events.jsonl")
            if e["event"] == "ckks_release"
        ]
        assert [(e["round"], e["clients"]) for e in releases] == [(1, [0, 1, 2]), (2, [0, 1, 2])]


def test_server_killed_mid_round_resumes_with_a_fresh_attempt(
    procs: Processes, pki_dir: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, "masking", rounds=3)
    out = tmp_path / "run"
    port = _free_port()
    _start_federation(procs, pki_dir, config, out, port, decryptor=False)
    deadline = time.monotonic() + 150
    killed_after: str | None = None
    while killed_after is None:
        if time.monotonic() > deadline or procs.running["server"].poll() is not None:
            pytest.fail(f"round 2 never started\n{procs.logs()}")
        if (out / "events.jsonl").exists():
            stages = [e for e in _events(out, "deploy_stage") if e["round"] == 2]
            if stages:
                procs.running["server"].send_signal(signal.SIGKILL)
                procs.running["server"].wait(10)
                killed_after = stages[-1]["stage"]
        time.sleep(0.02)
    assert not any(e["round"] == 2 for e in _events(out, "checkpoint_written"))
    # restart on the same port and run directory; the clients reconnect on their own
    procs.start(
        "server-restarted",
        "serve", str(config), "--out", str(out), "--pki", str(pki_dir),
        "--listen", f"127.0.0.1:{port}", "--connect-timeout", "90", "--stage-timeout", "30",
    )  # fmt: skip
    assert procs.wait("server-restarted", 150) == 0, procs.logs()
    for i in range(CLIENTS):
        assert procs.wait(f"client-{i}", 20) == 0, procs.logs()

    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [(r["round"], r["attempt"]) for r in rounds] == [(1, 0), (2, 1), (3, 0)]
    assert all(r["survivors"] == CLIENTS for r in rounds)
    retried = _events(out, "round_retried")
    assert [(e["round"], e["attempt"], e["previous_attempt"]) for e in retried] == [(2, 1, 0)]
    assert retried[0]["last_stage"] == killed_after
    # nothing counted twice: one completion and one checkpoint per round
    assert [e["round"] for e in _events(out, "round_completed")] == [1, 2, 3]
    assert [e["round"] for e in _events(out, "checkpoint_written")] == [1, 2, 3]
    # every participant of the interrupted attempt is recorded as its dropout
    restart_drops = [e for e in _events(out, "client_dropped") if e["stage"] == "server_restart"]
    assert sorted(e["client"] for e in restart_drops) == [0, 1, 2]
    assert all((e["round"], e["attempt"]) == (2, 0) for e in restart_drops)
    started = [(e["round"], e["attempt"]) for e in _events(out, "round_started")]
    assert started == [(1, 0), (2, 0), (2, 1), (3, 0)]
    # the ledger charges the retried attempt, and the interrupted one if it got that far
    interrupted_charged = bool(_events(out, "attempt_charged"))
    releasing = {"MaskedInputIns", "ConsistencyCheckIns", "UnmaskIns"}
    assert interrupted_charged == (killed_after in releasing)
    charged = [(e["round"], e["attempt"]) for e in _events(out, "dp_event")]
    expected = [(1, 0), *([(2, 0)] if interrupted_charged else []), (2, 1), (3, 0)]
    assert charged == expected
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["cumulative"]["user_level"]["events"] == len(expected)


def test_trust_vote_and_dormant_reset_over_mutual_tls(
    procs: Processes, pki_dir: Path, tmp_path: Path
) -> None:
    """Trust under masking, deployed: the vote over sub-cohorts runs in the server process,
    ``trust.dormant.reset`` prunes the revealed model after every round, and the round
    checkpoint carries the trust state."""
    data = {
        "dataset": "digits",
        "num_clients": CLIENTS,
        "partition": {"kind": "iid"},
        "shared": {"per_class": 2},
    }
    trust = {"defense": "vote", "dormant": {"reset": "masking"}}
    config = _config(
        tmp_path, "masking", rounds=2, extra={"data": data, "trust": trust, "privacy": None}
    )
    out = tmp_path / "run"
    _start_federation(procs, pki_dir, config, out, _free_port(), decryptor=False)
    rounds = _completed_rounds(procs, out)
    assert [r["round"] for r in rounds] == [1, 2]
    # the vote ran in the server process, once per round, over the one sub-cohort {0, 1, 2}
    # (3 clients, min_cohort 2: floor(3 / 2) = 1 sub-cohort), and kept it
    votes = _events(out, "trust_vote")
    assert [(e["round"], e["attempt"], e["candidates"]) for e in votes] == [
        (1, 0, "sub-cohorts"),
        (2, 0, "sub-cohorts"),
    ]
    assert all(e["members"] == {"0": [0, 1, 2]} and e["trusted_party"] == 0 for e in votes)
    assert [e["round"] for e in _events(out, "trust_cohort_kept")] == [1, 2]
    assert not _events(out, "trust_cohort_flag") and not _events(out, "trust_excluded")
    # trust.dormant.reset (TrustModule.after_round), once per round on the revealed model
    prunes = _events(out, "trust_prune")
    assert [(e["round"], e["attempt"]) for e in prunes] == [(1, 0), (2, 0)]
    dormant = prunes[-1]["layers"]["0"]
    hidden, features = 16, 64  # the first Linear of the mlp [16] on 8x8 digits
    assert 0 < len(dormant) < features
    assert prunes[0]["zeroed"] == hidden * len(prunes[0]["layers"]["0"])  # fresh init: all set
    assert all(e["zeroed"] > 0 and e["removed_norm"] > 0 for e in prunes)
    # the last checkpoint holds the pruned model and the trust state
    checkpoint = read_checkpoint(out)
    assert checkpoint.round == 2
    first = checkpoint.arrays["global"][: hidden * features].reshape(hidden, features)
    assert not first[:, dormant].any()
    assert first[:, [u for u in range(features) if u not in dormant]].all()
    assert checkpoint.state["trust"] == {
        "defense": "vote",
        "reputation": {"values": {"0": 1.0, "1": 1.0, "2": 1.0}},
    }
