"""``secfl bench deploy``: rounds over gRPC/mTLS with one process per client, and Ray.

Figures (flat, gated keys):

- ``rounds_per_minute``: secure rounds (mode ``masking``, user-level DP off) per minute with
  20 client processes on loopback and a model of d ~= 1e5 parameters; the server runs in
  this process, every client is its own ``python -m secfl join`` process. Per round: from
  ``round_started`` to ``round_completed`` in the server's event log, median over rounds.
- ``bytes_per_client_per_round``: secfl payload bytes (requests plus accepted replies,
  without gRPC/TLS framing) per participant per round, from ``deploy_stage_done``.
- ``deploy_vs_inprocess_time_ratio``: median deployed round time over the median round
  time of the same configuration simulated in this process (``secfl.run``).
- ``ray_vs_inprocess_time_ratio``: median round time with 500 simulated clients in Ray
  actors (local instance) over the same run in-process (``seeded`` randomness); details
  record whether both runs ended with bit-identical models (``ray_matches_inprocess``).

``--smoke``: 3 client processes, a tiny model, one round, 8 Ray clients; not gated.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from secfl.audit.events import read_events
from secfl.bench.harness import BenchSettings, register_benchmark
from secfl.config import RunConfig, config_from_dict
from secfl.errors import BenchmarkError


def _deploy_config(*, clients: int, hidden: int, rounds: int, seeded: bool = False) -> RunConfig:
    return config_from_dict(
        {
            "name": "bench-deploy",
            "seed": 0,
            "rounds": rounds,
            "security": {"randomness": "seeded" if seeded else "os"},
            "data": {"dataset": "digits", "num_clients": clients, "partition": {"kind": "iid"}},
            "model": {"kind": "mlp", "hidden": [hidden]},
            "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "evaluation": {"per_client": False},
            "aggregation": {"protection": "masking", "min_cohort": max(2, clients // 2)},
        }
    )


def _round_times(events: list[dict[str, Any]]) -> list[float]:
    started: dict[tuple[int, int], float] = {}
    times = []
    for e in events:
        key = (int(e.get("round", 0)), int(e.get("attempt", 0)))
        if e["event"] == "round_started":
            started[key] = float(e["time"])
        elif e["event"] == "round_completed" and key in started:
            times.append(float(e["time"]) - started[key])
    return times


def _bytes_per_client_round(events: list[dict[str, Any]]) -> float:
    per_round: dict[tuple[int, int], list[float]] = {}
    participants: dict[tuple[int, int], int] = {}
    for e in events:
        key = (int(e.get("round", 0)), int(e.get("attempt", 0)))
        if e["event"] == "deploy_stage_done":
            per_round.setdefault(key, []).append(float(e["bytes_out"]) + float(e["bytes_in"]))
        elif e["event"] == "round_started":
            participants[key] = max(1, len(e["participants"]))
    values = [sum(v) / participants[k] for k, v in per_round.items() if k in participants]
    return float(statistics.median(values))


def _deployed(
    config: RunConfig, folder: Path, *, timeout: float
) -> tuple[list[float], float, float]:
    """Run ``config`` with a server thread here and one process per client; returns
    (round times, bytes per client per round, seconds until every client had connected)."""
    from secfl.deploy import pki
    from secfl.deploy.serve import ServeOptions, serve

    keys = pki.init_pki(folder / "pki", clients=config.data.num_clients, decryptor=False)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    port_file = folder / "port"
    out = folder / "run"
    errors: list[BaseException] = []

    def server() -> None:
        try:
            serve(
                config,
                credentials_dir=keys / "server-0",
                federation_dir=keys / "federation",
                out_dir=out,
                options=ServeOptions(
                    listen="127.0.0.1:0",
                    port_file=port_file,
                    connect_timeout_s=timeout,
                    stage_timeout_s=timeout,
                ),
                log=lambda line: None,
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if time.monotonic() > deadline or not thread.is_alive():
            raise BenchmarkError(f"deploy bench: the server did not start: {errors}")
        time.sleep(0.05)
    port = port_file.read_text().strip()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = []
    try:
        for i in range(config.data.num_clients):
            log = (folder / f"client-{i}.log").open("wb")
            command = [
                *(sys.executable, "-m", "secfl", "join", str(config_path)),
                *("--server", f"localhost:{port}", "--state", str(folder / "state")),
                *("--credentials", str(keys / f"client-{i}")),
                *("--federation", str(keys / "federation"), "--deadline", str(timeout)),
            ]
            # our own interpreter and arguments, no shell
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)  # noqa: S603
            )
            log.close()
        thread.join(timeout)
        if thread.is_alive() or errors:
            raise BenchmarkError(f"deploy bench: the server failed or timed out: {errors}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    events = read_events(out / "events.jsonl")
    connected = [e["time"] for e in events if e["event"] == "deploy_connected"]
    listening = next(e["time"] for e in events if e["event"] == "deploy_listening")
    startup = float(max(connected) - listening) if connected else float("nan")
    return _round_times(events), _bytes_per_client_round(events), startup


def _inprocess_round_times(config: RunConfig, folder: Path) -> tuple[list[float], np.ndarray]:
    from secfl.encode.flatten import flatten_parameters
    from secfl.runner import run

    result = run(config, folder)
    return [float(r["time_s"]) for r in result.history], flatten_parameters(result.model)


@register_benchmark(
    "deploy",
    "rounds/min and bytes per client over gRPC/mTLS with 20 client processes (d~1e5) vs "
    "in-process; Ray vs in-process with 500 simulated clients",
)
def bench_deploy(settings: BenchSettings) -> dict[str, Any]:
    if settings.smoke:
        clients, hidden, rounds, ray_clients, ray_rounds = 3, 8, 1, 8, 1
    else:
        # digits MLP 64 -> 1330 -> 10: 99,780 parameters
        clients, hidden, rounds, ray_clients, ray_rounds = (
            20,
            1330,
            3 if settings.quick else 5,
            500,
            2,
        )
    with tempfile.TemporaryDirectory(prefix="secfl-bench-deploy-") as scratch:
        folder = Path(scratch)
        deploy_config = _deploy_config(clients=clients, hidden=hidden, rounds=rounds)
        deployed_times, bytes_per_client, startup = _deployed(
            deploy_config, folder / "deploy", timeout=600.0
        )
        inprocess_times, _ = _inprocess_round_times(deploy_config, folder / "inprocess")

        ray_config = _deploy_config(clients=ray_clients, hidden=16, rounds=ray_rounds, seeded=True)
        ray_config = ray_config.with_overrides(
            **{"aggregation.min_cohort": 3, "aggregation.masking.graph": "k_regular"}
        )
        plain_times, plain_model = _inprocess_round_times(ray_config, folder / "ray-baseline")
        ray_times, ray_model = _inprocess_round_times(
            ray_config.with_overrides(**{"simulation.transport": "ray"}), folder / "ray"
        )
        try:
            import ray

            ray.shutdown()
        except ImportError:  # pragma: no cover - RayTransport raised already
            pass
    deploy_round = statistics.median(deployed_times)
    return {
        "rounds_per_minute": 60.0 / deploy_round,
        "bytes_per_client_per_round": bytes_per_client,
        "deploy_vs_inprocess_time_ratio": deploy_round / statistics.median(inprocess_times),
        "ray_vs_inprocess_time_ratio": statistics.median(ray_times)
        / statistics.median(plain_times),
        "ray_matches_inprocess": bool(np.array_equal(plain_model, ray_model)),
        "deploy": {
            "clients": clients,
            "model_parameters": _model_size(deploy_config),
            "rounds": rounds,
            "protection": "masking (complete graph), os randomness, mutual TLS on 127.0.0.1",
            "round_s": deployed_times,
            "inprocess_round_s": inprocess_times,
            "clients_connected_after_s": startup,
        },
        "ray": {
            "clients": ray_clients,
            "model_parameters": _model_size(ray_config),
            "rounds": ray_rounds,
            "protection": "masking (k_regular graph), seeded randomness, local Ray instance",
            "round_s": ray_times,
            "inprocess_round_s": plain_times,
        },
    }


def _model_size(config: RunConfig) -> int:
    from secfl.data.federated import build_federated_data
    from secfl.randomness import Randomness
    from secfl.runner import initial_model

    randomness = Randomness("seeded", config.seed)
    data = build_federated_data(config.data, randomness)
    model = initial_model(config, data, randomness)
    return int(sum(p.numel() for p in model.parameters()))
