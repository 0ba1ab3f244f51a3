"""``secfl bench``: performance benchmarks that write JSON with same-run baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secfl.bench import aggregation as _aggregation  # noqa: F401  (registers itself)
from secfl.bench import ckks as _ckks  # noqa: F401  (registers itself)
from secfl.bench import client_kd as _client_kd  # noqa: F401  (registers itself)
from secfl.bench import deploy as _deploy  # noqa: F401  (registers itself)
from secfl.bench import dp as _dp  # noqa: F401  (registers itself)
from secfl.bench import refine as _refine  # noqa: F401  (registers itself)
from secfl.bench import secagg as _secagg  # noqa: F401  (registers itself)
from secfl.bench import strategies as _strategies  # noqa: F401  (registers itself)
from secfl.bench import trust as _trust  # noqa: F401  (registers itself)
from secfl.bench.harness import register_benchmark, registry, run_registered


def available_benchmarks() -> dict[str, str]:
    return {name: b.summary for name, b in sorted(registry().items())}


def run_benchmark(
    name: str, *, out: Path, quick: bool = False, smoke: bool = False
) -> dict[str, Any]:
    return run_registered(name, out=out, quick=quick, smoke=smoke)


__all__ = ["available_benchmarks", "register_benchmark", "run_benchmark"]
