"""``secfl bench deploy --smoke``: tiny and ungated, but every documented key is present,
and the seeded Ray run ends with exactly the in-process model."""

from __future__ import annotations

import json
from pathlib import Path

from secfl.bench import available_benchmarks, run_benchmark

GATED = (
    "rounds_per_minute",
    "bytes_per_client_per_round",
    "deploy_vs_inprocess_time_ratio",
    "ray_vs_inprocess_time_ratio",
)


def test_deploy_bench_smoke(tmp_path: Path) -> None:
    assert "deploy" in available_benchmarks()
    report = run_benchmark("deploy", out=tmp_path / "deploy.json", smoke=True)
    assert json.loads((tmp_path / "deploy.json").read_text())["benchmark"] == "deploy"
    for key in GATED:
        assert report[key] > 0, key
    assert report["ray_matches_inprocess"] is True
    deploy = report["deploy"]
    assert deploy["clients"] == 3 and len(deploy["round_s"]) == deploy["rounds"] == 1
    # a masking round moves at least the model to and the masked vector from each client
    assert report["bytes_per_client_per_round"] > 2 * 4 * deploy["model_parameters"]
    assert report["ray"]["clients"] == 8
