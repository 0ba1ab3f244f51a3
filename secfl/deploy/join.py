"""``secfl join`` (a client process) and ``secfl decryptor`` (the CKKS key holder process).

Both dial the server (:class:`~secfl.deploy.party.PartyConnection`) and answer its requests
with the same sans-I/O objects the simulation uses: a :class:`~secfl.client.app.ClientApp`
equipped with its SecAgg or CKKS side, or a :class:`~secfl.he.decryptor.Decryptor`. Their
identity is their certificate; the other clients' pinned identity keys come from the
federation's certificates.

A client's data: by default its part of the configured dataset's partition (the partition
is a design choice fixed by the config's seed, so every process computes the same split;
this is how the examples and tests run). ``data_file`` (``--data FILE.npz`` with arrays
``x`` and ``y``) gives a real client its own records instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from secfl.client.app import ClientApp
from secfl.config import RunConfig
from secfl.crypto import ckks
from secfl.data.datasets import Dataset
from secfl.data.federated import build_federated_data
from secfl.deploy.framing import message_limits
from secfl.deploy.party import Handler, PartyConnection
from secfl.deploy.pki import Credentials, Federation, write_file_atomic
from secfl.deploy.roles import (
    ThreadSafeEventLog,
    check_deployable,
    decryptor_policy,
    distributed_noise,
    equip_client,
)
from secfl.encode.flatten import flatten_parameters
from secfl.errors import ConfigError, DataError
from secfl.he.decryptor import Decryptor
from secfl.models import build_model
from secfl.privacy.federation import ClientPrivacy, PrivacyRecorder
from secfl.randomness import Randomness
from secfl.runner import initial_model


def _load_npz(path: Path, like: Dataset) -> Dataset:
    try:
        with np.load(path) as arrays:
            x = np.asarray(arrays["x"], dtype=np.float32)
            y = np.asarray(arrays["y"], dtype=np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"--data {str(path)!r}: needs arrays 'x' and 'y' ({exc})") from None
    if x.shape[1:] != like.x.shape[1:] or len(x) != len(y) or len(x) == 0:
        raise DataError(
            f"--data {str(path)!r}: x has shape {x.shape}, the model expects (n, "
            f"{', '.join(map(str, like.x.shape[1:]))}) with one label per row"
        )
    return Dataset("client", x, y, like.num_classes)


def build_client(
    config: RunConfig,
    credentials: Credentials,
    federation: Federation,
    state_dir: Path,
    *,
    data_file: Path | None = None,
) -> tuple[ClientApp, Handler, int]:
    """The client's app with its protocol side attached; returns (app, the byte handler to
    serve, model size)."""
    check_deployable(config)
    party = credentials.party
    if party.role != "client":
        raise ConfigError(f"these credentials are a {party.role!r} certificate, not a client")
    if party.party_id >= config.data.num_clients:
        raise ConfigError(
            f"client id {party.party_id} is outside data.num_clients={config.data.num_clients}"
        )
    randomness = Randomness("os", config.seed)
    data = build_federated_data(config.data, randomness)
    own = data.clients[party.party_id]
    if data_file is not None:
        own = _load_npz(data_file, own)
    state_dir.mkdir(parents=True, exist_ok=True)
    events = ThreadSafeEventLog(state_dir / f"client-{party.party_id}-events.jsonl")
    privacy = PrivacyRecorder(config, [len(c) for c in data.clients], state_dir, events)
    model_size = flatten_parameters(initial_model(config, data, randomness)).size
    user_level = distributed_noise(config, model_size)

    def model_factory() -> object:
        return build_model(config.model, data.input_shape, data.num_classes)

    app = ClientApp(
        party.party_id,
        own,
        model_factory=model_factory,  # type: ignore[arg-type]
        config=config.client,
        randomness=randomness,
        privacy=privacy.for_client(party.party_id),
    )
    equip_client(
        app,
        config,
        identity=credentials.identity(),
        registry=federation.registry(),
        state_dir=state_dir,
        user_level=user_level,
    )
    own_privacy = privacy.for_client(party.party_id)
    handler: Handler = app.handle
    if own_privacy is not None:
        path = state_dir / f"client-{party.party_id}-privacy.json"
        handler = _persisting_ledger(app, own_privacy, path)
    return app, handler, model_size


def _persisting_ledger(app: ClientApp, privacy: ClientPrivacy, path: Path) -> Handler:
    """Sample-level DP: the client's ledger survives its restarts. Loaded at start; written
    (fsync'd) after every request, before the reply, so an update never leaves uncharged."""
    if path.exists():
        privacy.ledger.load_state(json.loads(path.read_text(encoding="utf-8"))["ledger"])
    handle = app.handle

    def handle_and_persist(payload: bytes) -> bytes | None:
        reply = handle(payload)
        document = {"client": app.client_id, "ledger": privacy.ledger.state()}
        write_file_atomic(path, json.dumps(document).encode(), private=True)
        return reply

    return handle_and_persist


def join(
    config: RunConfig,
    *,
    server: str,
    credentials_dir: str | Path,
    federation_dir: str | Path,
    state_dir: str | Path,
    data_file: str | Path | None = None,
    deadline_s: float = 120.0,
    log: Callable[[str], None] = print,
) -> str:
    """Run one client until the server says goodbye; returns the goodbye reason."""
    credentials = Credentials.load(credentials_dir)
    federation = Federation(federation_dir)
    app, handler, model_size = build_client(
        config,
        credentials,
        federation,
        Path(state_dir),
        data_file=Path(data_file) if data_file is not None else None,
    )
    connection = PartyConnection(
        server,
        credentials,
        handler,
        config_fingerprint=config.fingerprint(),
        limits=message_limits(model_size=model_size, num_clients=config.data.num_clients),
        deadline_s=deadline_s,
        log=lambda line: log(f"client {app.client_id}: {line}"),
    )
    return connection.run()


def run_decryptor(
    config: RunConfig,
    *,
    server: str,
    credentials_dir: str | Path,
    federation_dir: str | Path,
    out_dir: str | Path,
    deadline_s: float = 120.0,
    log: Callable[[str], None] = print,
) -> str:
    """Run the CKKS decryptor until the server says goodbye. Its releases and refusals go
    to ``out_dir/decryptor-events.jsonl``; the secret keys live only in memory."""
    check_deployable(config)
    if config.aggregation.protection != "ckks":
        raise ConfigError("secfl decryptor serves aggregation.protection=ckks only")
    credentials = Credentials.load(credentials_dir)
    if credentials.party.role != "decryptor":
        raise ConfigError(f"these credentials are a {credentials.party.role!r} certificate")
    federation = Federation(federation_dir)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    events = ThreadSafeEventLog(folder / "decryptor-events.jsonl")
    try:
        preset = ckks.get_preset(config.aggregation.ckks.preset)
        decryptor = Decryptor(
            preset,
            decryptor_policy(config),
            client_keys=federation.client_keys(),
            randomness=Randomness("os", config.seed),
            events=events,
        )
        randomness = Randomness("os", config.seed)
        data = build_federated_data(config.data, randomness)
        model_size = flatten_parameters(initial_model(config, data, randomness)).size
        connection = PartyConnection(
            server,
            credentials,
            decryptor.handle,
            config_fingerprint=config.fingerprint(),
            limits=message_limits(model_size=model_size, num_clients=config.data.num_clients),
            deadline_s=deadline_s,
            log=lambda line: log(f"decryptor: {line}"),
        )
        return connection.run()
    finally:
        events.close()
