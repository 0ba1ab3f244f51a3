"""Benchmark harness: timing medians, machine info, JSON output.

Every benchmark measures its baseline in the same process and run, because these machines
are shared and noisy: only ratios measured side by side are comparable. Gated figures are flat
top-level keys; details nest below (DESIGN 7b).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from secfl.errors import BenchmarkError

CaseT = TypeVar("CaseT", bound=Hashable)


def run_in_processes(
    run_one: Callable[[CaseT, str], dict[str, Any]],
    cases: Sequence[CaseT],
    workdir: Path,
    workers: int,
) -> dict[CaseT, dict[str, Any]]:
    """``run_one(case, workdir)`` for every distinct case, in ``workers`` processes (1: in
    this one). ``run_one`` must be a module-level function (it is pickled by name)."""
    unique = list(dict.fromkeys(cases))
    if workers <= 1 or len(unique) <= 1:
        return {c: run_kept(run_one, c, str(workdir)) for c in unique}
    # spawn: a fresh interpreter per worker (torch and OpenMP state are not fork-safe)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {c: pool.submit(run_kept, run_one, c, str(workdir)) for c in unique}
        return {c: future.result() for c, future in futures.items()}


@dataclass(frozen=True, eq=False)
class TimedRun:
    """A federated run's result with its wall and CPU seconds (the process's own)."""

    result: Any
    seconds: float
    cpu_seconds: float


def timed_run(config: Any, folder: Path, *, quiet: bool = False) -> TimedRun:
    """``secfl.run(config, folder)``, timed; ``quiet`` hides its warnings (mode none's
    plaintext warning, once per federation of a strategy)."""
    import warnings

    from secfl.runner import run

    started, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        result = run(config, folder)
    return TimedRun(result, time.perf_counter() - started, time.process_time() - cpu)


#: Environment variable naming a work folder that outlives the bench run (see bench_workdir).
WORKDIR_ENV = "SECFL_BENCH_WORKDIR"


def run_kept(run_one: Callable[[CaseT, str], dict[str, Any]], case: CaseT, workdir: str) -> Any:
    """``run_one(case, workdir)``, its result also written to ``<workdir>/<name>/result.json``
    where the case has a ``name``; a result already there is reused, so a bench run
    interrupted in a kept work folder (``SECFL_BENCH_WORKDIR``) picks up where it stopped.
    A run interrupted before its result was written starts over in a clean folder."""
    name = getattr(case, "name", None)
    if not isinstance(name, str):
        return run_one(case, workdir)
    done = Path(workdir) / name / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(done.parent, ignore_errors=True)
    out = run_one(case, workdir)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(out))
    return out


@contextmanager
def bench_workdir() -> Iterator[Path]:
    """The runs' work folder: ``$SECFL_BENCH_WORKDIR`` when set (kept, and reused by
    :func:`run_kept`), otherwise a temporary folder removed afterwards."""
    kept = os.environ.get(WORKDIR_ENV)
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        yield Path(kept)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@dataclass(frozen=True)
class BenchSettings:
    quick: bool
    smoke: bool

    @property
    def repeats(self) -> int:
        return 1 if self.smoke else (3 if self.quick else 7)


BenchFunction = Callable[[BenchSettings], dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    function: BenchFunction


_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(name: str, summary: str) -> Callable[[BenchFunction], BenchFunction]:
    def wrap(function: BenchFunction) -> BenchFunction:
        _REGISTRY[name] = Benchmark(name, summary, function)
        return function

    return wrap


def time_repeats(function: Callable[[], object], repeats: int, *, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine_info() -> dict[str, Any]:
    import numpy
    import torch

    return {
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run_registered(name: str, *, out: Path, quick: bool, smoke: bool) -> dict[str, Any]:
    bench = _REGISTRY.get(name)
    if bench is None:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {sorted(_REGISTRY)}")
    settings = BenchSettings(quick=quick, smoke=smoke)
    before = machine_info()
    started = time.perf_counter()
    figures = bench.function(settings)
    report: dict[str, Any] = {
        **figures,
        "benchmark": name,
        "quick": quick,
        "smoke": smoke,
        "repeats": settings.repeats,
        "wall_s": time.perf_counter() - started,
        "machine": {**before, "load_average_after": list(os.getloadavg())},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def registry() -> dict[str, Benchmark]:
    return dict(_REGISTRY)
