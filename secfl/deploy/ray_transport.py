"""``simulation.transport: ray``: simulated clients run in Ray actors, locally or on a cluster.

The run's clients are split into ``simulation.ray_workers`` shards; each shard lives in one
Ray actor that builds the same :class:`~secfl.client.app.ClientApp` objects the in-process
simulation builds (same data partition, same protocol side from the mode's builder) and
answers request bytes with reply bytes. An ``exchange`` sends each shard its requests as one
Ray task and gathers the replies, so the server, its protection and the trust module run
unchanged in the driver.

Randomness. With ``security.randomness: seeded`` every client stream is keyed by (seed,
round, attempt, party, purpose), so a configuration gives bit-identical results in-process
and on Ray. With ``os`` each worker would draw its own identity keys, which the driver's
registry could not pin; that mode is refused here (use ``secfl serve/join`` to deploy).
Sample-level DP (its ledgers live with the clients) and ``adversary:`` (its adapters reach
into client objects) are refused as well.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secfl.config import RunConfig, config_from_dict
from secfl.errors import ConfigError


def check_ray_config(config: RunConfig) -> None:
    if config.security.randomness != "seeded":
        raise ConfigError(
            "simulation.transport='ray' needs security.randomness='seeded' (each worker "
            "would otherwise draw identity keys the server cannot pin); deploy with "
            "secfl serve/join for os randomness"
        )
    if config.privacy.sample_level is not None:
        raise ConfigError(
            "simulation.transport='ray' does not support privacy.sample_level yet (the "
            "clients' ledgers live in the workers); allowed: privacy.user_level"
        )
    if config.adversary is not None:
        raise ConfigError("simulation.transport='ray' does not support adversary: yet")


class ClientShard:
    """Hosts some of the run's simulated clients (the body of a Ray actor)."""

    def __init__(self, raw_config: dict[str, Any], client_ids: list[int]) -> None:
        import torch

        from secfl.audit.events import EventLog
        from secfl.client.app import ClientApp
        from secfl.data.federated import build_federated_data
        from secfl.encode.flatten import flatten_parameters
        from secfl.models import build_model
        from secfl.privacy.distributed import user_level_mechanism
        from secfl.privacy.federation import PrivacyRecorder
        from secfl.randomness import Randomness
        from secfl.runner import initial_model, make_protection

        config = config_from_dict(raw_config)
        torch.set_num_threads(config.simulation.torch_threads or 1)
        self._scratch = tempfile.TemporaryDirectory(prefix="secfl-ray-")
        folder = Path(self._scratch.name)
        events = EventLog(folder / "events.jsonl")
        randomness = Randomness(config.security.randomness, config.seed)
        data = build_federated_data(config.data, randomness)
        privacy = PrivacyRecorder(config, [len(c) for c in data.clients], folder, events)
        template = initial_model(config, data, randomness)
        user_level = user_level_mechanism(config, flatten_parameters(template).size)

        def model_factory() -> torch.nn.Module:
            return build_model(config.model, data.input_shape, data.num_classes)

        clients = [
            ClientApp(
                i,
                part,
                model_factory=model_factory,
                config=config.client,
                randomness=randomness,
                privacy=privacy.for_client(i),
            )
            for i, part in enumerate(data.clients)
        ]
        # the mode's builder equips every client exactly as in-process (seeded identity keys);
        # this shard keeps only its own
        make_protection(config, clients, randomness, events, user_level=user_level, trust=None)
        wanted = set(client_ids)
        self._apps = {c.client_id: c for c in clients if c.client_id in wanted}

    def handle_many(self, requests: dict[int, bytes]) -> dict[int, bytes | None]:
        return {cid: self._apps[cid].handle(payload) for cid, payload in requests.items()}


class RayTransport:
    """A :class:`~secfl.transport.base.Transport` whose clients live in Ray actors."""

    def __init__(self, config: RunConfig) -> None:
        check_ray_config(config)
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is a dev/deploy dependency
            raise ConfigError(
                "simulation.transport='ray' needs Ray: pip install 'ray>=2.9,<3'"
            ) from exc
        self._ray: Any = ray
        settings = config.simulation
        if not ray.is_initialized():
            ray.init(
                address=settings.ray_address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        n = config.data.num_clients
        workers = settings.ray_workers or max(1, min(n, int(ray.cluster_resources().get("CPU", 1))))
        shards = [list(range(n))[w::workers] for w in range(workers)]
        # one actor per shard; its work is CPU-bound but a shard must never wait for a slot
        actor: Any = ray.remote(num_cpus=0.01)(ClientShard)
        self._actors: list[Any] = [
            actor.remote(config.to_dict(), shard) for shard in shards if shard
        ]
        self._owner = {cid: w for w, shard in enumerate(shards) for cid in shard}
        ray.get([a.handle_many.remote({}) for a in self._actors])  # wait until all are built

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        grouped: dict[int, dict[int, bytes]] = {}
        for cid, payload in requests.items():
            if cid not in self._owner:
                raise ConfigError(f"no simulated client with id {cid}")
            grouped.setdefault(self._owner[cid], {})[cid] = bytes(payload)
        futures = [self._actors[w].handle_many.remote(batch) for w, batch in grouped.items()]
        replies: dict[int, bytes | None] = {}
        for part in self._ray.get(futures):
            replies.update(part)
        return {cid: replies.get(cid) for cid in requests}

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
