"""``secfl serve CONFIG``: the server process of a deployment, and its crash recovery.

The same round as :func:`secfl.run` (``FederatedServer`` and the mode's protection), with
the transport replaced by the mutual-TLS hub and the clients' identity keys taken from the
federation's certificates.

Durability. Every stage boundary is journalled in the fsync'd event log before requests
leave (``deploy_stage`` / ``deploy_stage_done``, :class:`~secfl.deploy.hub.HubTransport`);
every completed round is checkpointed (model, optimiser, privacy ledger, trust state,
history) atomically. Restarted on the same ``--out`` after ``kill -9`` at any point, the
server resumes after the last checkpointed round. A round that had started but not been
checkpointed is restarted as the next *attempt* (``round_retried``): fresh keys and masks,
because its clients may already have released shares of the old attempt, and clients,
which log per (round, attempt) which share they released, never mix two attempts. Nothing
the interrupted attempt collected is applied, so no update is counted twice; every client
of the interrupted attempt is recorded as a dropout of it (``client_dropped``,
stage ``server_restart``); and if the attempt had reached the stage where masked inputs or
ciphertexts were collected, its planned user-level DP event is charged to the ledger
(``attempt_charged``), since the server may have seen the release before it crashed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secfl.audit.events import read_events, register_event
from secfl.client.trainer import evaluate
from secfl.config import RunConfig
from secfl.data.federated import build_federated_data
from secfl.deploy.framing import message_limits
from secfl.deploy.hub import Hub, HubTransport, start_server
from secfl.deploy.pki import Credentials, Federation
from secfl.deploy.roles import (
    ThreadSafeEventLog,
    check_deployable,
    distributed_noise,
    server_protection,
)
from secfl.encode.flatten import flatten_parameters, load_parameters, model_hash
from secfl.errors import ConfigError, ProtocolError
from secfl.he.messages import Refusal
from secfl.models import build_model
from secfl.privacy.federation import PrivacyRecorder
from secfl.randomness import Randomness
from secfl.record import rundir
from secfl.record.checkpoint import CHECKPOINT_NAME, Checkpoint, read_checkpoint, write_checkpoint
from secfl.runner import initial_model, round_checkpoint, round_row
from secfl.server.loop import FederatedServer, RoundOutcome
from secfl.server.optimizers import check_update_kind, make_server_optimizer
from secfl.trust.defense import build_trust

register_event("round_retried", ("round", "attempt", "previous_attempt", "last_stage"))
register_event("attempt_charged", ("round", "attempt", "reason"))
register_event("deploy_listening", ("address", "port", "session"))

#: Stages after which the server may have learnt a release of the attempt.
_RELEASING_STAGES = {"MaskedInputIns", "ConsistencyCheckIns", "UnmaskIns", "CkksFitIns"}


@dataclass(frozen=True)
class ServeOptions:
    listen: str = "127.0.0.1:0"
    #: clients that must be connected before round 1 (None: every registered client)
    wait_clients: int | None = None
    connect_timeout_s: float = 120.0
    #: a party that has not replied within this many seconds is a dropout of the stage
    stage_timeout_s: float = 60.0
    #: where to write the bound port (tests and scripts pick port 0)
    port_file: Path | None = None


def _interrupted_attempts(events: list[dict[str, Any]], last_round: int) -> list[dict[str, Any]]:
    """Attempts of rounds after ``last_round`` (none of them is in the checkpoint); ``closed``
    says whether an earlier restart (or the round's end) already recorded it."""
    started: dict[tuple[int, int], dict[str, Any]] = {}
    for e in events:
        kind = e.get("event")
        if kind == "round_started" and int(e["round"]) > last_round:
            started[(int(e["round"]), int(e["attempt"]))] = {
                "round": int(e["round"]),
                "attempt": int(e["attempt"]),
                "participants": list(e.get("participants", [])),
                "stages": [],
                "closed": False,
            }
        elif kind in ("deploy_stage", "deploy_stage_done"):
            key = (int(e["round"]), int(e["attempt"]))
            if key in started:
                started[key]["stages"].append(e["stage"])
        elif kind in ("round_completed", "round_skipped", "attempt_closed"):
            key = (int(e["round"]), int(e["attempt"]))
            if key in started:
                started[key]["closed"] = True
    return list(started.values())


def next_attempt(events: list[dict[str, Any]], round_index: int) -> int:
    """One more than every earlier start of ``round_index`` (fresh keys on a retry)."""
    attempts = [
        int(e["attempt"])
        for e in events
        if e.get("event") == "round_started" and int(e.get("round", -1)) == round_index
    ]
    return max(attempts) + 1 if attempts else 0


register_event("attempt_closed", ("round", "attempt", "reason"))


def serve(
    config: RunConfig,
    *,
    credentials_dir: str | Path,
    federation_dir: str | Path,
    out_dir: str | Path,
    options: ServeOptions | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the federation's server until ``config.rounds`` are done; returns the history."""
    options = options or ServeOptions()
    check_deployable(config)
    credentials = Credentials.load(credentials_dir)
    if credentials.party.role != "server":
        raise ConfigError(f"{credentials_dir}: certificate role is {credentials.party.role!r}")
    federation = Federation(federation_dir)
    folder = Path(out_dir)
    events_path = folder / rundir.EVENTS_NAME
    resuming = events_path.exists()
    checkpoint: Checkpoint | None = None
    if resuming and (folder / CHECKPOINT_NAME).exists():
        checkpoint = read_checkpoint(folder, expected_fingerprint=config.fingerprint())
    elif not resuming:
        rundir.prepare_new_run_dir(folder)
    rundir.write_config(folder, config.to_dict())
    events = ThreadSafeEventLog(events_path)
    try:
        return _serve(
            config, credentials, federation, folder, events, checkpoint, resuming, options, log
        )
    finally:
        events.close()


def _serve(
    config: RunConfig,
    credentials: Credentials,
    federation: Federation,
    folder: Path,
    events: ThreadSafeEventLog,
    checkpoint: Checkpoint | None,
    resuming: bool,
    options: ServeOptions,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    randomness = Randomness("os", config.seed)
    data = build_federated_data(config.data, randomness)
    client_keys = {
        cid: key for cid, key in federation.client_keys().items() if cid < config.data.num_clients
    }
    if len(client_keys) < max(2, config.aggregation.min_cohort):
        raise ConfigError(
            f"{len(client_keys)} valid client certificates in {federation.folder}/certs, fewer "
            f"than aggregation.min_cohort={config.aggregation.min_cohort}"
        )
    privacy = PrivacyRecorder(config, [len(c) for c in data.clients], folder, events)
    template = initial_model(config, data, randomness)
    weights = flatten_parameters(template)
    user_level = distributed_noise(config, weights.size)
    privacy.attach_mechanism(user_level)

    def model_factory() -> Any:
        return build_model(config.model, data.input_shape, data.num_classes)

    trust = build_trust(
        config,
        model_factory=model_factory,
        shared=data.shared,
        randomness=randomness,
        events=events,
    )
    ckks_mode = config.aggregation.protection == "ckks"
    hub = Hub(
        federation,
        events=events,
        config_fingerprint=config.fingerprint(),
        limits=message_limits(model_size=weights.size, num_clients=len(client_keys)),
        client_keys=client_keys,
        roles=("client", "decryptor") if ckks_mode else ("client",),
    )
    # built before listening: a configuration the mode refuses fails before anyone connects
    protection = server_protection(
        config,
        client_keys=client_keys,
        decryptor=_decryptor_channel(hub, options.stage_timeout_s) if ckks_mode else None,
        user_level=user_level,
        trust=trust,
    )
    grpc_server, port = start_server(
        hub,
        listen=options.listen,
        cert_pem=credentials.cert_pem,
        key_pem=credentials.key_pem,
        ca_pem=federation.ca_pem,
        max_parties=len(client_keys) + 1,
    )
    host = options.listen.rsplit(":", 1)[0]
    events.emit("deploy_listening", address=host, port=port, session=f"{hub.session:x}")
    if options.port_file is not None:
        tmp = options.port_file.with_name(options.port_file.name + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(options.port_file)
    log(f"listening on {host}:{port} (mutual TLS), {len(client_keys)} registered clients")
    try:
        wanted = options.wait_clients if options.wait_clients is not None else len(client_keys)
        if ckks_mode and not hub.wait_for("decryptor", 1, options.connect_timeout_s):
            raise ProtocolError(f"no decryptor connected within {options.connect_timeout_s} s")
        if not hub.wait_for("client", wanted, options.connect_timeout_s):
            raise ProtocolError(
                f"{len(hub.connected('client'))} of {wanted} clients connected within "
                f"{options.connect_timeout_s} s"
            )
        check_update_kind(config)
        optimizer = make_server_optimizer(config.server, weights.size)
        server = FederatedServer(
            config=config,
            weights=weights,
            optimizer=optimizer,
            protection=protection,
            transport=HubTransport(hub, timeout=options.stage_timeout_s, events=events),
            client_ids=sorted(client_keys),
            randomness=randomness,
            events=events,
        )
        history: list[dict[str, Any]] = []
        first_round = 1
        if checkpoint is not None:
            server.weights[...] = checkpoint.arrays["global"]
            optimizer.load_state_dict(
                {k[4:]: v for k, v in checkpoint.arrays.items() if k.startswith("opt.")}
            )
            history = list(checkpoint.state["history"])
            privacy.load_state(checkpoint.state.get("privacy"))
            if trust is not None:
                trust.load_state(checkpoint.state.get("trust"), checkpoint.arrays)
            first_round = checkpoint.round + 1
        if resuming:
            events.emit("run_resumed", from_round=first_round - 1)
            _close_interrupted(events, privacy, user_level, first_round - 1)
        else:
            events.emit(
                "run_started",
                config_fingerprint=config.fingerprint(),
                randomness="os",
                secure=True,
                protection=config.aggregation.protection,
            )
        events.sync()
        model = model_factory()
        for round_index in range(first_round, config.rounds + 1):
            if privacy.enabled and privacy.check_round(round_index) is not None:
                break
            started = time.monotonic()
            attempt = next_attempt(read_events(events.path), round_index)
            outcome = server.run_round(round_index, attempt)
            if trust is not None and outcome.aggregate is not None:
                # trust.dormant.reset on the revealed global model, as secfl.run does
                trust.after_round(
                    server.weights, round_index=round_index, attempt=attempt, events=events
                )
            if privacy.enabled:
                privacy.record_round(outcome)
            row = _record(config, outcome, model, server.weights, data.test, events)
            row["time_s"] = time.monotonic() - started
            history.append(row)
            digest = write_checkpoint(
                folder,
                round_checkpoint(
                    config, round_index, server.weights, optimizer, history, privacy, trust
                ),
            )
            events.emit("checkpoint_written", round=round_index, sha256=digest)
            events.sync()
            rundir.write_metrics(folder, history)
            log(
                f"round {round_index} attempt {attempt}: {row['survivors']} survivors, "
                f"accuracy {row['accuracy']:.4f}"
            )
        if history:
            load_parameters(model, server.weights)
            rundir.write_model(
                folder,
                model,
                metadata={
                    "model_hash": model_hash(server.weights).hex(),
                    "config_fingerprint": config.fingerprint(),
                },
            )
            final = history[-1]
            events.emit(
                "run_finished",
                rounds=final["round"],
                accuracy=final["accuracy"],
                loss=final["loss"],
            )
        return history
    finally:
        hub.close_all("run finished")
        grpc_server.stop(grace=2.0).wait(5.0)


def _decryptor_channel(hub: Hub, timeout: float) -> Callable[[bytes], bytes]:
    def channel(payload: bytes) -> bytes:
        reply = hub.call("decryptor", 0, payload, timeout)
        if reply is None:
            return Refusal(
                round=0, attempt=0, request="channel", reason="the decryptor did not answer"
            ).to_bytes()
        return reply

    return channel


def _close_interrupted(
    events: ThreadSafeEventLog,
    privacy: PrivacyRecorder,
    user_level: Any,
    last_round: int,
) -> None:
    """Record what a crash interrupted: dropouts, charged DP events, the retry to come.

    Every attempt after the checkpoint that reached a releasing stage is charged again on
    every restart (the checkpoint's ledger cannot contain it); events are written once."""
    for attempt in _interrupted_attempts(read_events(events.path), last_round):
        r, a = attempt["round"], attempt["attempt"]
        stages = attempt["stages"]
        released = bool(_RELEASING_STAGES.intersection(stages))
        charge = None
        if user_level is not None and privacy.global_ledger is not None and released:
            charge = user_level.planned_event(r, a)
            privacy.global_ledger.add(charge)
        if attempt["closed"]:
            continue
        if charge is not None:
            events.emit("dp_event", **charge.to_dict())
        for client in attempt["participants"]:
            events.emit(
                "client_dropped",
                round=r,
                attempt=a,
                client=client,
                stage="server_restart",
                reason="the server restarted during this attempt; its inputs are discarded",
            )
        if user_level is not None and released:
            events.emit(
                "attempt_charged",
                round=r,
                attempt=a,
                reason=f"interrupted after stage {stages[-1]}; a release may have been seen",
            )
        events.emit("attempt_closed", round=r, attempt=a, reason="server restart")
        events.emit(
            "round_retried",
            round=r,
            attempt=a + 1,
            previous_attempt=a,
            last_stage=stages[-1] if stages else "round_started",
        )


def _record(
    config: RunConfig,
    outcome: RoundOutcome,
    model: Any,
    weights: np.ndarray,
    test: Any,
    events: ThreadSafeEventLog,
) -> dict[str, Any]:
    agg = outcome.aggregate
    row = round_row(outcome)
    load_parameters(model, weights)
    correct, loss = evaluate(model, test, batch_size=config.evaluation.batch_size)
    row.update({"accuracy": float(correct.mean()), "loss": float(loss)})
    events.emit(
        "round_completed",
        round=outcome.round,
        attempt=outcome.attempt,
        survivors=list(agg.survivors) if agg else [],
        accuracy=row["accuracy"],
        loss=row["loss"],
    )
    return row
