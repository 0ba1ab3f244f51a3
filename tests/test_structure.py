"""Project structure: the import graph, threat models, models, the event log, benchmarks."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from secfl.audit.events import EventLog, read_events
from secfl.audit.threat_model import load_threat_model
from secfl.config import ModelConfig
from secfl.errors import ConfigError, SecflError
from secfl.models import build_model

from .conftest import ROOT

HAZARDOUS = ("cryptography.hazmat", "cryptography.x509", "tenseal")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_crypto_package_imports_hazardous_modules() -> None:
    offenders = []
    for path in sorted((ROOT / "secfl").rglob("*.py")):
        if (ROOT / "secfl" / "crypto") in path.parents:
            continue
        for name in _imports(path):
            if name.startswith(HAZARDOUS) or name == "cryptography":
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_no_assert_statements_for_validation_in_the_library() -> None:
    found = []
    for path in sorted((ROOT / "secfl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_every_threat_model_validates() -> None:
    files = sorted((ROOT / "threat_models").glob("*.yaml"))
    assert {f.stem for f in files} >= {"honest_but_curious_server", "malicious_server"}
    for path in files:
        model = load_threat_model(path)
        assert model.capabilities and model.applies_to
    hbc = load_threat_model(ROOT / "threat_models" / "honest_but_curious_server.yaml")
    none_scope = next(s for s in hbc.applies_to if s.protection == "none")
    assert none_scope.protects == [], "mode none protects nothing from the server"
    assert "in clear" in " ".join(hbc.reveals["none"])


def test_malformed_threat_model_is_refused(tmp_path: Path) -> None:
    src = (ROOT / "threat_models" / "honest_but_curious_server.yaml").read_text()
    bad = tmp_path / "honest_but_curious_server.yaml"
    bad.write_text(src.replace("schema_version: 1", "schema_version: 1\nsurprise: 3"))
    with pytest.raises(ConfigError, match="surprise"):
        load_threat_model(bad)
    bad.write_text(
        re.sub(
            r"guarantees:.*?(?=required_epsilon:)",
            "guarantees: [{metric: psnr, op: '~', threshold: 1}]\n",
            src,
            flags=re.S,
        )
    )
    with pytest.raises(ConfigError, match="op"):
        load_threat_model(bad)


@pytest.mark.parametrize(
    ("kind", "shape"), [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("cnn", (1, 40)), ("mlp", (30,))]
)
def test_models_use_groupnorm_never_batchnorm(kind: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(kind=kind), shape, 10)  # type: ignore[arg-type]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if kind == "cnn":
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    out = model(torch.zeros(3, *shape))
    assert out.shape == (3, 10)


def test_cnn_refuses_tabular_inputs() -> None:
    with pytest.raises(SecflError, match="use mlp"):
        build_model(ModelConfig(kind="cnn"), (30,), 2)


def test_event_log_types_fields_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, clock=lambda: 123.0)
    log.emit("warning", message="hello")
    with pytest.raises(SecflError, match="unknown event type"):
        log.emit("made_up")
    with pytest.raises(SecflError, match="missing fields"):
        log.emit("round_started", round=1)
    log.close()
    with path.open("a") as f:
        f.write('{"seq": 1, "event": "war')  # a crash mid-write
    log = EventLog(path, clock=lambda: 124.0)
    log.close()
    events = read_events(path)
    assert [e["event"] for e in events] == ["warning", "log_repaired"]
    assert [e["seq"] for e in events] == [0, 1] and events[1]["dropped_bytes"] > 0
    assert events[0]["time"] == 123.0


def test_bench_smoke_writes_gated_key(tmp_path: Path) -> None:
    out = tmp_path / "agg.json"
    subprocess.run(
        [sys.executable, "-m", "secfl", "bench", "aggregation", "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["ratio_vs_numpy_sum"] > 0
    assert report["machine"]["cores"] >= 1 and "load_average" in report["machine"]
    assert report["smoke"] is True
