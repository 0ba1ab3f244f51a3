"""End-to-end runs: determinism, the run directory, checkpoints and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import secfl
from secfl.audit.events import read_events
from secfl.errors import CheckpointError, RunDirectoryError
from secfl.record.checkpoint import CHECKPOINT_NAME, read_checkpoint

from .conftest import ROOT, small_config

COMPARED = ("round", "accuracy", "loss", "train_loss", "client_accuracy", "survivors")


def _metrics(folder: Path) -> list[dict]:
    rows = json.loads((folder / "metrics.json").read_text())["rounds"]
    return [{k: r[k] for k in COMPARED if k in r} for r in rows]


def test_run_directory_contents(tmp_path: Path) -> None:
    result = secfl.run(small_config(), tmp_path / "run")
    folder = result.out_dir
    for name in ("config.yaml", "metrics.json", "events.jsonl", "model.safetensors",
                 "report.html", CHECKPOINT_NAME, "client_data.json"):  # fmt: skip
        assert (folder / name).exists(), name
    assert secfl.load_config(folder / "config.yaml") == result.config
    rows = json.loads((folder / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert {"accuracy", "loss", "client_accuracy", "participants"} <= rows[0].keys()
    events = [e["event"] for e in read_events(folder / "events.jsonl")]
    assert events[0] in ("warning", "run_started")
    assert "insecure_randomness" in events and events[-1] == "run_finished"
    assert events.count("round_completed") == 3
    tensors = load_file(folder / "model.safetensors")
    assert sum(t.size for t in tensors.values()) == sum(
        p.numel() for p in result.model.parameters()
    )
    html = (folder / "report.html").read_text()
    assert (
        "<svg" in html
        and "INSECURE" in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )


def test_seeded_runs_are_bit_identical_and_seeds_differ(tmp_path: Path) -> None:
    a = secfl.run(small_config(rounds=2), tmp_path / "a")
    b = secfl.run(small_config(rounds=2), tmp_path / "b")
    c = secfl.run(small_config(rounds=2, seed=1), tmp_path / "c")
    assert _metrics(a.out_dir) == _metrics(b.out_dir)
    wa = np.concatenate([p.detach().numpy().ravel() for p in a.model.parameters()])
    wb = np.concatenate([p.detach().numpy().ravel() for p in b.model.parameters()])
    wc = np.concatenate([p.detach().numpy().ravel() for p in c.model.parameters()])
    assert np.array_equal(wa, wb)
    assert not np.array_equal(wa, wc)


def test_os_randomness_is_not_marked_insecure(tmp_path: Path) -> None:
    result = secfl.run(small_config(rounds=1, **{"security.randomness": "os"}), tmp_path / "r")
    events = read_events(result.out_dir / "events.jsonl")
    assert not any(e["event"] == "insecure_randomness" for e in events)
    started = next(e for e in events if e["event"] == "run_started")
    assert started["secure"] is True
    assert "INSECURE" not in (result.out_dir / "report.html").read_text()


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    config = small_config(rounds=4, **{"server.optimizer": "fedadam", "server.lr": 0.01})
    whole = secfl.run(config, tmp_path / "whole")
    part = secfl.run(config, tmp_path / "part", stop_after=2)
    assert len(part.history) == 2
    assert not (tmp_path / "part" / "model.safetensors").exists()
    resumed = secfl.run(config, tmp_path / "part", resume=True)
    assert _metrics(resumed.out_dir) == _metrics(whole.out_dir)
    events = [e["event"] for e in read_events(tmp_path / "part" / "events.jsonl")]
    assert "run_resumed" in events


def test_refuses_to_overwrite_and_to_resume_mismatched_or_corrupt(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    secfl.run(small_config(rounds=1), folder)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        secfl.run(small_config(rounds=1), folder)
    with pytest.raises(CheckpointError, match="different run config"):
        secfl.run(small_config(rounds=2, seed=5), folder, resume=True)
    ckpt = folder / CHECKPOINT_NAME
    raw = bytearray(ckpt.read_bytes())
    raw[-5] ^= 0xFF  # flip a bit in the last tensor
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(folder)
    ckpt.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="corrupt"):
        secfl.run(small_config(rounds=2), folder, resume=True)
    assert ckpt.read_bytes() == b"\x00" * 7, "a bad checkpoint is never overwritten"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        secfl.run(small_config(rounds=2), tmp_path / "empty", resume=True)


def _secfl(*args: str) -> list[str]:
    return [sys.executable, "-m", "secfl", *args]


def test_cli_run_sigkill_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """SIGKILL a real `secfl run` after its second checkpoint, resume, compare exactly."""
    config = tmp_path / "c.yaml"
    text = (ROOT / "examples" / "digits.yaml").read_text()
    config.write_text(text.replace("rounds: 30", "rounds: 6"))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_secfl("run", str(config), "--out", str(whole), "--no-progress"), check=True)
    proc = subprocess.Popen(_secfl("run", str(config), "--out", str(killed), "--no-progress"))
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (killed / "metrics.json").exists():
                rows = json.loads((killed / "metrics.json").read_text())["rounds"]
                if len(rows) >= 2:
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = read_checkpoint(killed).round
    assert done < 6, "the run should have been killed before finishing"
    out = subprocess.run(
        _secfl("run", str(config), "--resume", str(killed), "--no-progress"),
        check=True,
        capture_output=True,
        text=True,
    )
    assert "accuracy" in out.stdout
    assert _metrics(killed) == _metrics(whole)
    first = json.loads((whole / "metrics.json").read_text())["rounds"]
    assert first[-1]["accuracy"] > first[0]["accuracy"] + 0.2, "accuracy rose over the run"


def test_cli_errors_are_clean(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: -3\n")
    out = subprocess.run(_secfl("run", str(bad)), capture_output=True, text=True)
    assert out.returncode == 2
    assert "rounds" in out.stderr and "Traceback" not in out.stderr
    helped = subprocess.run(_secfl("--help"), capture_output=True, text=True, check=True)
    for command in ("run", "bench"):
        assert command in helped.stdout
