"""The bench harness's kept work folder: finished runs are reused, unfinished ones redone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from secfl.bench.harness import WORKDIR_ENV, bench_workdir, run_in_processes

CALLS: list[str] = []


@dataclass(frozen=True)
class _Case:
    label: str

    @property
    def name(self) -> str:
        return f"case-{self.label}"


def _run(case: _Case, workdir: str) -> dict[str, Any]:
    CALLS.append(case.label)
    (Path(workdir) / case.name).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / case.name / "partial").write_text("x")
    return {"label": case.label, "value": len(case.label)}


def test_finished_runs_are_reused_and_unfinished_ones_start_clean(tmp_path: Path) -> None:
    CALLS.clear()
    cases = [_Case("a"), _Case("bb")]
    first = run_in_processes(_run, cases, tmp_path, workers=1)
    assert first[_Case("bb")] == {"label": "bb", "value": 2}
    assert CALLS == ["a", "bb"]
    # an interrupted run: its folder exists but holds no result
    (tmp_path / "case-ccc").mkdir()
    (tmp_path / "case-ccc" / "stale").write_text("old")
    again = run_in_processes(_run, [*cases, _Case("ccc")], tmp_path, workers=1)
    assert CALLS == ["a", "bb", "ccc"]
    assert again == {**first, _Case("ccc"): {"label": "ccc", "value": 3}}
    assert not (tmp_path / "case-ccc" / "stale").exists()


def test_bench_workdir_is_kept_only_when_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    with bench_workdir() as temporary:
        assert temporary.is_dir()
    assert not temporary.exists()
    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path / "kept"))
    with bench_workdir() as kept:
        (kept / "run").mkdir()
    assert (tmp_path / "kept" / "run").is_dir()
