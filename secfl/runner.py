"""``secfl.run``: one federated experiment in simulation, with a run directory.

All roles live in this process but talk only through the transport and typed messages.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from secfl.attacks.simulation import with_adversary
from secfl.audit.events import EventLog, read_events
from secfl.audit.keys import load_or_create_audit_key
from secfl.audit.receipts import ReceiptBook, ReceiptIssuer, receipt_sink
from secfl.audit.transcript import TranscriptRecorder
from secfl.client.app import ClientApp
from secfl.client.trainer import evaluate
from secfl.config import RunConfig
from secfl.data.datasets import Dataset
from secfl.data.federated import FederatedData, build_federated_data
from secfl.encode.flatten import ParameterLayout, flatten_parameters, load_parameters, model_hash
from secfl.models import build_model
from secfl.privacy.central import UserLevelMechanism
from secfl.privacy.distributed import user_level_mechanism
from secfl.privacy.federation import PrivacyRecorder
from secfl.randomness import Randomness
from secfl.record import rundir
from secfl.record.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from secfl.record.report import write_report
from secfl.refine.memorisation import MemorisationReport, memorisation_check
from secfl.refine.run import build_refiner, record_refinement
from secfl.server.loop import FederatedServer, RoundOutcome
from secfl.server.optimizers import ServerOptimizer, check_update_kind, make_server_optimizer
from secfl.server.protection import Protection
from secfl.transport.base import Transport
from secfl.transport.dropout import with_simulated_dropouts
from secfl.transport.inprocess import InProcessTransport
from secfl.trust.defense import TrustModule, build_trust


@dataclass(eq=False)
class RunResult:
    """What :func:`run` returns: the metrics history and the final global model."""

    history: list[dict[str, Any]]
    model: nn.Module
    out_dir: Path
    config: RunConfig
    #: Why the run stopped before ``config.rounds`` (a privacy budget ran out), or None.
    stopped: str | None = None
    #: Each task's final model when ``server.strategy`` runs several (``model``: the first).
    models: dict[str, nn.Module] | None = None


def initial_model(config: RunConfig, data: FederatedData, randomness: Randomness) -> nn.Module:
    """The global model at round 0; its initialisation is part of the seeded design."""
    seed = randomness.stream("model.init").seed_int()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config.model, data.input_shape, data.num_classes)


#: Where each protection mode's builder lives; imported only when the mode is used.
_PROTECTION_BUILDERS = {
    "none": "secfl.server.protection:build_plaintext_protection",
    "masking": "secfl.secagg.simulation:build_protection",
    "ckks": "secfl.he.simulation:build_protection",
}


def make_protection(
    config: RunConfig,
    clients: list[ClientApp],
    randomness: Randomness,
    events: EventLog,
    *,
    user_level: UserLevelMechanism | None = None,
    trust: TrustModule | None = None,
) -> Protection:
    """The server side of the configured protection mode; the builder also equips the
    simulated clients with their side of the protocol (each role keeps its own state) and
    with the user-level DP mechanism (central noise, or each client's noise share), and
    gives the server the trust module (``trust``; a mode without it yet refuses one)."""
    module_name, _, attribute = _PROTECTION_BUILDERS[config.aggregation.protection].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    protection: Protection = builder(
        config, clients, randomness, events, user_level=user_level, trust=trust
    )
    return protection


def make_clients(
    config: RunConfig,
    data: FederatedData,
    model_factory: Callable[[], nn.Module],
    randomness: Randomness,
    privacy: PrivacyRecorder,
    events: EventLog,
    folder: Path,
) -> list[ClientApp]:
    """A federation's clients, one per part of ``data.clients``, each with its privacy
    state and its receipt book under ``folder`` (the simulation and every strategy's
    federations)."""
    return [
        ClientApp(
            i,
            part,
            model_factory=model_factory,
            config=config.client,
            randomness=randomness,
            privacy=privacy.for_client(i),
            receipts=_receipt_book(events, folder, i),
        )
        for i, part in enumerate(data.clients)
    ]


def make_server(
    config: RunConfig,
    weights: np.ndarray,
    clients: list[ClientApp],
    transport: Transport,
    randomness: Randomness,
    events: EventLog,
    *,
    user_level: UserLevelMechanism | None,
    trust: TrustModule | None,
) -> tuple[ServerOptimizer, FederatedServer]:
    """A federation's server optimizer and :class:`FederatedServer` over ``clients``
    (reached through ``transport``), with the protection of ``config`` (the simulation and
    every strategy's federations)."""
    optimizer = make_server_optimizer(config.server, weights.size)
    server = FederatedServer(
        config=config,
        weights=weights,
        optimizer=optimizer,
        protection=make_protection(
            config, clients, randomness, events, user_level=user_level, trust=trust
        ),
        transport=transport,
        client_ids=[c.client_id for c in clients],
        randomness=randomness,
        events=events,
    )
    return optimizer, server


def _spread(values: np.ndarray) -> dict[str, float]:
    return {
        "min": float(values.min()),
        "p10": float(np.percentile(values, 10)),
        "median": float(np.median(values)),
        "max": float(values.max()),
        "std": float(values.std()),
    }


class _Experimenter:
    """The experimenter's view in simulation: test metrics and per-client accuracy spread.
    Nothing here is sent to the server."""

    def __init__(self, config: RunConfig, data: FederatedData, model: nn.Module) -> None:
        self.config = config
        self.data = data
        self.model = model
        sizes = np.array([len(c) for c in data.clients])
        self._owner = np.repeat(np.arange(len(sizes)), sizes)
        self._sizes = sizes
        self._pool = Dataset(
            "clients",
            np.concatenate([c.x for c in data.clients]),
            np.concatenate([c.y for c in data.clients]),
            data.num_classes,
        )

    def measure(self, weights: np.ndarray) -> dict[str, Any]:
        load_parameters(self.model, weights)
        bs = self.config.evaluation.batch_size
        correct, loss = evaluate(self.model, self.data.test, batch_size=bs)
        row: dict[str, Any] = {"accuracy": float(correct.mean()), "loss": float(loss)}
        if self.config.evaluation.per_client:
            client_correct, _ = evaluate(self.model, self._pool, batch_size=bs)
            per_client = np.bincount(self._owner, weights=client_correct) / self._sizes
            row["client_accuracy"] = _spread(per_client)
        return row

    def memorisation(self, synthetic: np.ndarray, *, max_test: int = 1000) -> MemorisationReport:
        """The memorisation check of a synthetic set against the clients' records."""
        return memorisation_check(synthetic, self._pool.x, self.data.test.x[:max_test])


def run(
    config: RunConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = False,
    clock: Callable[[], float] = time.time,
    stop_after: int | None = None,
) -> RunResult:
    """Run (or with ``resume=True`` continue) the experiment ``config`` describes.

    ``out_dir`` defaults to ``runs/<name>-<seed>``. ``stop_after`` ends the process's work
    after that many rounds of this call (tests use it to emulate an interruption).
    """
    folder = Path(out_dir) if out_dir is not None else Path("runs") / f"{config.name}-{config.seed}"
    fingerprint = config.fingerprint()
    checkpoint: Checkpoint | None = None
    if resume:
        checkpoint = read_checkpoint(folder, expected_fingerprint=fingerprint)
    else:
        rundir.prepare_new_run_dir(folder)
    rundir.write_config(folder, config.to_dict())

    randomness = Randomness(config.security.randomness, config.seed)
    # the server's audit key: never from the seed, never inside the run directory
    signer = load_or_create_audit_key(config.security.audit_key, run_dir=folder)
    events = EventLog(
        folder / rundir.EVENTS_NAME, clock=clock, signer=signer, config_fingerprint=fingerprint
    )
    threads = torch.get_num_threads()
    if config.simulation.torch_threads is not None:
        torch.set_num_threads(config.simulation.torch_threads)
    try:
        if config.server.strategy is not None:
            return _run_strategy(
                config, folder, randomness, events, checkpoint, progress, clock, stop_after
            )
        return _run(config, folder, randomness, events, checkpoint, progress, clock, stop_after)
    finally:
        torch.set_num_threads(threads)
        events.close()


def _run_strategy(
    config: RunConfig,
    folder: Path,
    randomness: Randomness,
    events: EventLog,
    checkpoint: Checkpoint | None,
    progress: bool,
    clock: Callable[[], float],
    stop_after: int | None,
) -> RunResult:
    """Several tasks over one device population (``server.strategy``, secfl.strategies)."""
    from secfl.strategies.federation_round import StrategyRunContext
    from secfl.strategies.multitask import run_scheduled
    from secfl.strategies.pool import run_pool
    from secfl.strategies.tiers_run import run_tiers

    strategy = config.server.strategy
    kind = strategy.kind if strategy is not None else None
    run_strategy = {"tiers": run_tiers, "pool": run_pool}.get(kind or "", run_scheduled)
    history, models, stopped = run_strategy(
        StrategyRunContext(
            config, folder, randomness, events, checkpoint, progress, clock, stop_after
        )
    )
    return RunResult(
        history=history,
        model=next(iter(models.values())),
        out_dir=folder,
        config=config,
        stopped=stopped,
        models=models,
    )


def _run(
    config: RunConfig,
    folder: Path,
    randomness: Randomness,
    events: EventLog,
    checkpoint: Checkpoint | None,
    progress: bool,
    clock: Callable[[], float],
    stop_after: int | None,
) -> RunResult:
    check_update_kind(config)
    data = build_federated_data(config.data, randomness)
    privacy = PrivacyRecorder(config, [len(c) for c in data.clients], folder, events)
    template = privacy.prepare_model(
        lambda: initial_model(config, data, randomness), notify=checkpoint is None
    )()
    layout = ParameterLayout.of(template)
    weights = flatten_parameters(template)
    user_level = user_level_mechanism(config, weights.size)
    privacy.attach_mechanism(user_level)

    model_factory = privacy.prepare_model(
        lambda: build_model(config.model, data.input_shape, data.num_classes)
    )
    clients = make_clients(config, data, model_factory, randomness, privacy, events, folder)
    transport = with_simulated_dropouts(
        with_adversary(
            InProcessTransport({c.client_id: c.handle for c in clients})
            if config.simulation.transport == "inprocess"
            else _ray_transport(config),
            config,
            clients,
            randomness=randomness,
            events=events,
        ),
        config.simulation,
        protection=config.aggregation.protection,
        randomness=randomness,
        events=events,
    )
    # outermost: it hashes exactly the bytes the server sends and receives
    recorder = TranscriptRecorder(transport)
    receipts = ReceiptIssuer(events=events, recorder=recorder)
    # The server's reference update trains a copy of the global model on data.shared.
    trust = build_trust(
        config,
        model_factory=model_factory,
        shared=data.shared,
        randomness=randomness,
        events=events,
    )
    optimizer, server = make_server(
        config,
        weights,
        clients,
        recorder,
        randomness,
        events,
        user_level=user_level,
        trust=trust,
    )
    experimenter = _Experimenter(config, data, model_factory())
    refiner = build_refiner(config, clients, data, model_factory, randomness, events, privacy)

    history: list[dict[str, Any]] = []
    first_round = 1
    if checkpoint is None:
        announce_run(events, config, randomness)
        rundir.write_json_atomic(
            folder / rundir.CLIENT_DATA_NAME,
            {
                "note": "experimenter's view; never sent to the server in secure modes",
                "class_counts": data.class_counts,
                "sizes": [len(c) for c in data.clients],
                "shared_size": len(data.shared),
                "test_size": len(data.test),
            },
        )
    else:
        server.weights[...] = checkpoint.arrays["global"]
        optimizer.load_state_dict(
            {k[len("opt.") :]: v for k, v in checkpoint.arrays.items() if k.startswith("opt.")}
        )
        history = list(checkpoint.state["history"])
        privacy.load_state(checkpoint.state.get("privacy"))
        if trust is not None:
            trust.load_state(checkpoint.state.get("trust"), checkpoint.arrays)
        if refiner is not None:
            refiner.load_state(checkpoint.arrays)
        first_round = checkpoint.round + 1
        events.emit("run_resumed", from_round=checkpoint.round)

    bar = tqdm(
        total=config.rounds,
        initial=first_round - 1,
        disable=not progress,
        unit="round",
        dynamic_ncols=True,
    )
    done = 0
    try:
        for round_index in range(first_round, config.rounds + 1):
            if stop_after is not None and done >= stop_after:
                break
            if privacy.enabled and privacy.check_round(round_index) is not None:
                break
            started = clock()
            resumed = checkpoint is not None and round_index == first_round
            attempt = _attempt_for(round_index, events, randomness) if resumed else 0
            before = server.weights.copy()
            outcome = server.run_round(round_index, attempt)
            if trust is not None and outcome.aggregate is not None:
                # post-aggregation defense on the revealed global model (trust.dormant.reset)
                trust.after_round(
                    server.weights, round_index=round_index, attempt=attempt, events=events
                )
            refined = None
            if refiner is not None and outcome.aggregate is not None:
                refined = refiner.refine(
                    round_index,
                    attempt,
                    before=before,
                    aggregate=server.weights,
                    revealed=outcome.aggregate.revealed,
                    participants=list(outcome.participants),
                )
                server.weights[...] = refined.weights
            if privacy.enabled:
                privacy.record_round(outcome)
            row = _record_round(config, outcome, experimenter, server.weights, events)
            if refined is not None:
                row["refine"] = record_refinement(refined, experimenter, outcome, events)
            row["time_s"] = clock() - started
            history.append(row)
            # after every change to the global model: the receipt names the next broadcast
            receipts.issue(outcome, server.weights)
            digest = write_checkpoint(
                folder,
                round_checkpoint(
                    config,
                    round_index,
                    server.weights,
                    optimizer,
                    history,
                    privacy,
                    trust,
                    extra_arrays=refiner.arrays() if refiner is not None else None,
                ),
            )
            events.emit("checkpoint_written", round=round_index, sha256=digest)
            events.sync()
            rundir.write_metrics(folder, history)
            bar.update(1)
            bar.set_postfix(
                round=round_index, loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}"
            )
            done += 1
    finally:
        bar.close()

    final_model = model_factory()
    load_parameters(final_model, server.weights)
    if history and (history[-1]["round"] == config.rounds or privacy.stopped is not None):
        synthetic = None
        if refiner is not None and refiner.synthetic is not None:
            synthetic = (refiner.synthetic.x, refiner.synthetic.y)
        _finish(
            config,
            folder,
            final_model,
            server.weights,
            layout,
            history,
            data,
            randomness,
            events,
            synthetic=synthetic,
        )
    return RunResult(
        history=history,
        model=final_model,
        out_dir=folder,
        config=config,
        stopped=privacy.stopped,
    )


def _receipt_book(events: EventLog, folder: Path, client_id: int) -> ReceiptBook | None:
    """A simulated client's receipts: the server key and run id reach it out of band."""
    if events.signer is None:
        return None
    return ReceiptBook(
        client_id,
        server_key=events.signer.public_bytes(),
        run_id=bytes.fromhex(events.run_id),
        sink=receipt_sink(folder, client_id),
    )


def _ray_transport(config: RunConfig) -> Transport:
    from secfl.deploy.ray_transport import RayTransport

    return RayTransport(config)


def round_checkpoint(
    config: RunConfig,
    round_index: int,
    weights: np.ndarray,
    optimizer: ServerOptimizer,
    history: list[dict[str, Any]],
    privacy: PrivacyRecorder,
    trust: TrustModule | None,
    *,
    extra_arrays: dict[str, np.ndarray] | None = None,
) -> Checkpoint:
    """The server's state after a completed round (the simulation and ``secfl serve``)."""
    return Checkpoint(
        round=round_index,
        config_fingerprint=config.fingerprint(),
        arrays={
            "global": weights,
            **{f"opt.{k}": v for k, v in optimizer.state_dict().items()},
            **(trust.arrays() if trust is not None else {}),
            **(extra_arrays or {}),
        },
        state={
            "history": history,
            "privacy": privacy.state(),
            **({"trust": trust.state()} if trust is not None else {}),
        },
    )


def announce_run(events: EventLog, config: RunConfig, randomness: Randomness) -> None:
    """The first events of a new run (single-task or strategy): ``run_started`` and, in
    ``seeded`` mode, the ``insecure_randomness`` warning."""
    events.emit(
        "run_started",
        config_fingerprint=config.fingerprint(),
        randomness=randomness.mode,
        secure=randomness.secure,
        protection=config.aggregation.protection,
    )
    if not randomness.secure:
        events.emit(
            "insecure_randomness",
            mode=randomness.mode,
            reason="security.randomness=seeded: keys, masks and noise are reproducible "
            "from the seed; simulation and tests only",
        )


def _attempt_for(round_index: int, events: EventLog, randomness: Randomness) -> int:
    """The attempt number of a round (DESIGN 3b). ``seeded``: always 0, so a resumed round
    replays bit-identically. ``os``: one more than any earlier start of this round in the
    event log, so a round retried after a crash gets fresh keys and masks and clients,
    which remember what they released per (round, attempt), never mix two attempts."""
    if not randomness.secure:
        return 0
    attempts = [
        int(e["attempt"])
        for e in read_events(events.path)
        if e.get("event") == "round_started" and e.get("round") == round_index
    ]
    return max(attempts) + 1 if attempts else 0


def round_row(outcome: RoundOutcome) -> dict[str, Any]:
    """A metrics row's participation fields (the simulation and ``secfl serve``)."""
    agg = outcome.aggregate
    return {
        "round": outcome.round,
        "attempt": outcome.attempt,
        "participants": len(outcome.participants),
        "survivors": len(agg.survivors) if agg else 0,
        "dropped": len(agg.dropped) if agg else len(outcome.participants),
    }


#: A metrics row's accuracy and loss in a round that is not evaluated.
NOT_EVALUATED = {"accuracy": float("nan"), "loss": float("nan")}


def _record_round(
    config: RunConfig,
    outcome: RoundOutcome,
    experimenter: _Experimenter,
    weights: np.ndarray,
    events: EventLog,
) -> dict[str, Any]:
    row = trained_row(outcome)
    if evaluation_due(config, outcome.round):
        row.update(experimenter.measure(weights))
    else:
        row.update(NOT_EVALUATED)
    emit_round_completed(events, outcome, row, weights)
    return row


def trained_row(outcome: RoundOutcome) -> dict[str, Any]:
    """:func:`round_row` plus the participants' mean training loss when the round
    released one."""
    row = round_row(outcome)
    agg = outcome.aggregate
    if agg is not None and agg.train_loss is not None:
        row["train_loss"] = agg.train_loss
    return row


def evaluation_due(config: RunConfig, round_index: int) -> bool:
    """Whether the model is evaluated after ``round_index`` (every ``evaluation.every``
    rounds and after the last)."""
    return round_index % config.evaluation.every == 0 or round_index == config.rounds


def emit_round_completed(
    events: EventLog, outcome: RoundOutcome, row: dict[str, Any], weights: np.ndarray
) -> None:
    """``round_completed``: the round's survivors, the row's accuracy and loss and the hash
    of ``weights``, the model broadcast next."""
    agg = outcome.aggregate
    events.emit(
        "round_completed",
        round=outcome.round,
        attempt=outcome.attempt,
        survivors=list(agg.survivors) if agg else [],
        accuracy=row["accuracy"],
        loss=row["loss"],
        model_hash=model_hash(weights).hex(),
    )


def _finish(
    config: RunConfig,
    folder: Path,
    model: nn.Module,
    weights: np.ndarray,
    layout: ParameterLayout,
    history: list[dict[str, Any]],
    data: FederatedData,
    randomness: Randomness,
    events: EventLog,
    *,
    synthetic: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    rundir.write_model(
        folder,
        model,
        metadata={
            "model_hash": model_hash(weights).hex(),
            "layout": layout.describe(),
            "config_fingerprint": config.fingerprint(),
        },
    )
    rundir.write_metrics(folder, history)
    write_report(
        folder / rundir.REPORT_NAME,
        config=config.to_dict(),
        history=history,
        class_counts=data.class_counts,
        secure_randomness=randomness.secure,
        synthetic=synthetic,
    )
    final = history[-1]
    events.emit(
        "run_finished", rounds=final["round"], accuracy=final["accuracy"], loss=final["loss"]
    )
