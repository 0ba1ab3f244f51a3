"""``secfl bench secagg --smoke``: tiny, ungated, but every documented key is present."""

from __future__ import annotations

from pathlib import Path

from secfl.bench import run_benchmark

GATED = (
    "client_ratio_vs_prg_per_neighbour",
    "server_ratio_vs_plaintext_complete_drop0",
    "server_ratio_vs_plaintext_k4_drop10",
    "shamir_speedup_vs_flower",
)


def test_secagg_bench_smoke_reports_every_key(tmp_path: Path) -> None:
    report = run_benchmark("secagg", out=tmp_path / "secagg.json", smoke=True)
    assert (tmp_path / "secagg.json").exists()
    for key in GATED:
        assert key in report
    assert report["threads"] >= 1
    assert report["prg_expand_ms"] > 0 and report["plaintext_sum_ms"] > 0
    for name in ("complete_drop0", "k4_drop0", "k4_drop10", "complete_drop10"):
        variant = report["by_variant"][name]
        assert set(variant["server_stage_ms"]) == {
            "advertise_keys",
            "share_keys",
            "masked_input",
            "consistency_check",
            "unmask",
        }
        assert variant["survivors"] == variant["n"] - variant["dropped"]
    flower = report["flower"]
    if flower["available"]:
        assert report["shamir_speedup_vs_flower"] is not None
    else:  # never faked: null with a reason
        assert report["shamir_speedup_vs_flower"] is None and flower["reason"]
