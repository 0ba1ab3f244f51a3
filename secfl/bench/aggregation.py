"""Benchmark ``aggregation``: the real server aggregation path against ``acc += x``.

The path measured is :class:`~secfl.server.protection.PlaintextProtection` receiving N
encoded :class:`~secfl.messages.FitRes` messages from a transport, decoding, checking and
sample-weighting them. The baseline is a streaming float32 ``acc += x`` over the same arrays.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from secfl.audit.events import EventLog
from secfl.bench.harness import BenchSettings, median, register_benchmark, time_repeats
from secfl.encode.flatten import model_hash
from secfl.messages import FitIns, FitRes
from secfl.randomness import Randomness
from secfl.server.protection import PlaintextProtection, RoundContext


class _ReplayTransport:
    """Answers every request with the client's pre-encoded reply (what a network delivers)."""

    def __init__(self, replies: Mapping[int, bytes]) -> None:
        self._replies = replies

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        return {cid: self._replies[cid] for cid in requests}


def _digits_round_seconds(settings: BenchSettings, workdir: Path) -> float:
    from secfl.config import config_from_dict
    from secfl.runner import run

    config = config_from_dict(
        {
            "name": "bench-digits",
            "rounds": 2,
            "security": {"randomness": "seeded"},
            "data": {"dataset": "digits", "num_clients": 10},
            "client": {"epochs": 2, "batch_size": 16},
        }
    )
    result = run(config, workdir / "digits")
    return float(result.history[-1]["time_s"])  # round 2: after warm-up


@register_benchmark("aggregation", "server FedAvg aggregation path vs a numpy streaming sum")
def bench_aggregation(settings: BenchSettings) -> dict[str, Any]:
    n, d = (5, 10_000) if settings.smoke else (100, 1_000_000)
    weights = np.zeros(d, dtype=np.float32)
    broadcast = FitIns(round=1, attempt=0, model_hash=model_hash(weights), weights=weights)
    rng = np.random.default_rng(0)  # benchmark data, not secret
    replies = {
        i: FitRes(
            round=1,
            attempt=0,
            client_id=i,
            model_hash=broadcast.model_hash,
            num_samples=int(rng.integers(10, 500)),
            train_loss=0.5,
            update=rng.standard_normal(d, dtype=np.float32) * 0.01,
        ).to_bytes()
        for i in range(n)
    }
    arrays = [FitRes.from_bytes(b).update for b in replies.values()]
    transport = _ReplayTransport(replies)
    protection = PlaintextProtection()

    with tempfile.TemporaryDirectory() as tmp:
        events = EventLog(Path(tmp) / "events.jsonl")
        ctx = RoundContext(
            round=1,
            attempt=0,
            broadcast=broadcast,
            model_size=d,
            randomness=Randomness("seeded", 0),
            events=events,
        )

        def server_path() -> None:
            result = protection.aggregate(transport, list(range(n)), ctx)
            if result is None or len(result.survivors) != n:
                raise RuntimeError("aggregation lost updates")

        def numpy_sum() -> None:
            acc = np.zeros(d, dtype=np.float32)
            for x in arrays:
                acc += x

        # Interleave the two so that load changes affect both alike.
        server_times: list[float] = []
        numpy_times: list[float] = []
        for _ in range(settings.repeats):
            numpy_times += time_repeats(numpy_sum, 1)
            server_times += time_repeats(server_path, 1)
        events.close()
        t0 = time.perf_counter()
        round_s = _digits_round_seconds(settings, Path(tmp))
        digits_total = time.perf_counter() - t0

    server_s, numpy_s = median(server_times), median(numpy_times)
    return {
        "ratio_vs_numpy_sum": server_s / numpy_s,
        "digits_round_s": round_s,
        "details": {
            "n_updates": n,
            "d": d,
            "server_aggregation_s": server_s,
            "numpy_sum_s": numpy_s,
            "server_times_s": server_times,
            "numpy_times_s": numpy_times,
            "server_gb_per_s": n * d * 4 / server_s / 1e9,
            "digits_two_rounds_with_setup_s": digits_total,
        },
    }
