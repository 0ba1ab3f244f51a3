"""Several federated tasks over one simulated device population (``server.strategy:
{kind: scheduler}``).

Every task is an ordinary secfl federation (its own data split over the devices, model,
clients, protection, DP ledger and :class:`~secfl.server.loop.FederatedServer`); the only
difference from ``secfl run`` of one task is who takes part: each round the scheduler
(:mod:`secfl.strategies.scheduler`) assigns available devices to tasks and every task's
server runs its round with exactly those participants (``run_round(participants=...)``).
A cohort smaller than ``aggregation.min_cohort`` is never run: the task skips the round
(``strategy_task_skipped``). Because the strategy only chooses participants, every
protection mode works unchanged.

Trust and adversary (``trust:``, ``adversary:``; :mod:`secfl.strategies.cohort_trust`, as
the model pool): each task has its own trust module, which runs inside the task's round
over exactly the devices the scheduler assigned it; reputation and suspicion are per
device, shared by every task's module (a device is one client of every task); under
``masking`` a device whose suspicion reached the bound is made ineligible before the
assignment. One adversary (one set of malicious devices) attacks every task.

The run directory holds the usual files at the top (``metrics.json`` with one row per round
and the per-task rows under ``tasks``, ``events.jsonl`` with the scheduler's decisions, one
checkpoint for everything) and one folder per task under ``tasks/NAME/`` (its event log,
``ledger.json``, final model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from secfl.audit.events import EventLog, register_event
from secfl.audit.receipts import ReceiptIssuer
from secfl.audit.transcript import TranscriptRecorder
from secfl.client.app import ClientApp
from secfl.client.trainer import evaluate
from secfl.config import (
    DataConfig,
    FixedSampling,
    RunConfig,
    SchedulerStrategy,
    SchedulerTaskConfig,
)
from secfl.data.federated import FederatedData, build_federated_data
from secfl.encode.flatten import flatten_parameters, load_parameters
from secfl.errors import ConfigError
from secfl.models import build_model
from secfl.privacy.distributed import user_level_mechanism
from secfl.privacy.federation import PrivacyRecorder
from secfl.randomness import Randomness
from secfl.record import rundir
from secfl.record.checkpoint import Checkpoint
from secfl.server.loop import FederatedServer
from secfl.server.optimizers import ServerOptimizer
from secfl.strategies import cohort_trust, federation_round
from secfl.strategies.devices import DevicePopulation, TaskWorkload, workload_of
from secfl.strategies.federation_round import StrategyRunContext
from secfl.strategies.scheduler import (
    AssignmentPolicy,
    RoundRequest,
    check_assignment,
    jain_index,
    make_policy,
    task_round_times,
)
from secfl.transport.base import Transport
from secfl.transport.dropout import with_simulated_dropouts
from secfl.transport.inprocess import InProcessTransport
from secfl.trust.defense import TrustModule, build_trust

register_event(
    "strategy_started",
    ("strategy", "policy", "tasks", "devices", "speed_median", "bandwidth_median"),
)
register_event(
    "strategy_assignment",
    ("round", "available", "assigned", "round_time_s"),
)
register_event("strategy_task_skipped", ("round", "task", "cohort", "min_cohort", "reason"))

TASKS_DIR = "tasks"


def task_config(config: RunConfig, task: SchedulerTaskConfig) -> RunConfig:
    """The single-task run config of ``task``: the run's settings with the task's data,
    model, local training and privacy (the run's ``privacy`` when the task has none)."""
    raw = config.to_dict()
    raw["name"] = f"{config.name}-{task.name}"
    raw["data"] = task.data.model_dump(mode="json")
    raw["model"] = task.model.model_dump(mode="json")
    raw["client"] = task.client.model_dump(mode="json")
    if task.privacy is not None:
        raw["privacy"] = task.privacy.model_dump(mode="json")
    raw["server"]["strategy"] = None
    # the cohort size the task's mechanisms plan for (no sampling amplification is claimed:
    # the scheduler's choice is not a uniform or Poisson sample)
    raw["server"]["sampling"] = {"kind": "fixed", "clients_per_round": task.devices_per_round}
    from secfl.config import config_from_dict

    return config_from_dict(raw)


@dataclass(eq=False)
class TaskFederation:
    """One task's federation: clients, server, ledger, test data, workload."""

    spec: SchedulerTaskConfig
    config: RunConfig
    data: FederatedData
    server: FederatedServer
    optimizer: ServerOptimizer
    privacy: PrivacyRecorder
    events: EventLog
    folder: Path
    model: nn.Module
    workload: TaskWorkload
    receipts: ReceiptIssuer
    clock_s: float = 0.0
    rounds_run: int = 0
    rounds_skipped: int = 0
    #: The task's trust module (with ``trust:``); its reputation and suspicion are shared
    #: with the other federations' (:func:`secfl.strategies.cohort_trust.share_trust_state`).
    trust: TrustModule | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def can_pay(self, round_index: int) -> np.ndarray:
        """Devices whose remaining sample-level budget for this task pays one more round
        (the task's own ledgers and accountant: what the client itself enforces)."""
        out = np.ones(self.config.data.num_clients, dtype=bool)
        if self.config.privacy.budget.client_epsilon is None:
            return out
        for client_id, client in self.privacy.clients.items():
            out[client_id] = not client.exhausted(round_index)
        return out

    def remaining_epsilon(self) -> list[float] | None:
        budget = self.config.privacy.budget.client_epsilon
        if budget is None or not self.privacy.clients:
            return None
        return [
            budget - self.privacy.clients[i].ledger.epsilon()
            for i in range(self.config.data.num_clients)
        ]

    def measure(self) -> dict[str, float]:
        load_parameters(self.model, self.server.weights)
        correct, loss = evaluate(
            self.model, self.data.test, batch_size=self.config.evaluation.batch_size
        )
        return {"accuracy": float(correct.mean()), "loss": float(loss)}


def build_task(
    config: RunConfig,
    task: SchedulerTaskConfig,
    folder: Path,
    randomness: Randomness,
    events: EventLog,
    *,
    fresh: bool,
    clock: Callable[[], float] = time.time,
    model_builder: Callable[[FederatedData, bool], nn.Module] | None = None,
    trust: bool = False,
    adversary: Callable[[Transport, list[ClientApp], EventLog], Transport] | None = None,
) -> TaskFederation:
    """A task's federation, wired like ``secfl.run`` wires one (no refinement; adversary
    and trust only when asked for: every strategy wires them through
    :mod:`secfl.strategies.cohort_trust`). ``model_builder(data, initial)`` replaces the
    task's model (``initial``: the round-0 global model, seeded initialisation; otherwise a
    client's template, whose weights are overwritten). ``trust``: build the task's trust module from
    ``trust:`` (:func:`~secfl.trust.defense.build_trust`, over the task's own model and the
    public shared set) and give it to the protection. ``adversary(inner, clients, events)``
    wraps the clients' transport inside the dropout simulator, where ``secfl.run`` puts
    its adversary."""
    from secfl.runner import initial_model, make_clients, make_server

    cfg = task_config(config, task)
    task_folder = folder / TASKS_DIR / task.name
    task_folder.mkdir(parents=True, exist_ok=True)
    task_events = EventLog(
        task_folder / rundir.EVENTS_NAME,
        clock=clock,
        signer=events.signer,
        config_fingerprint=cfg.fingerprint(),
    )
    data = build_federated_data(cfg.data, randomness)
    privacy = PrivacyRecorder(cfg, [len(c) for c in data.clients], task_folder, task_events)
    build: Callable[[FederatedData, bool], nn.Module] = model_builder or (
        lambda d, initial: (
            initial_model(cfg, d, randomness)
            if initial
            else build_model(cfg.model, d.input_shape, d.num_classes)
        )
    )
    template = privacy.prepare_model(lambda: build(data, True), notify=fresh)()
    weights = flatten_parameters(template)
    user_level = user_level_mechanism(cfg, weights.size)
    privacy.attach_mechanism(user_level)
    model_factory = privacy.prepare_model(lambda: build(data, False))
    clients = make_clients(cfg, data, model_factory, randomness, privacy, task_events, task_folder)
    inner: Transport = InProcessTransport({c.client_id: c.handle for c in clients})
    if adversary is not None:
        inner = adversary(inner, clients, task_events)
    transport = with_simulated_dropouts(
        inner,
        cfg.simulation,
        protection=cfg.aggregation.protection,
        randomness=randomness,
        events=task_events,
    )
    # outermost, as in a single-task run: it hashes exactly the bytes the server exchanges
    recorder = TranscriptRecorder(transport)
    defense = (
        build_trust(
            cfg,
            model_factory=model_factory,
            shared=data.shared,
            randomness=randomness,
            events=task_events,
        )
        if trust
        else None
    )
    optimizer, server = make_server(
        cfg,
        weights,
        clients,
        recorder,
        randomness,
        task_events,
        user_level=user_level,
        trust=defense,
    )
    workload = workload_of(
        task.name,
        template,
        data.input_shape,
        epochs=cfg.client.epochs,
        records=np.array([len(c) for c in data.clients]),
    )
    return TaskFederation(
        spec=task,
        config=cfg,
        data=data,
        server=server,
        optimizer=optimizer,
        privacy=privacy,
        events=task_events,
        folder=task_folder,
        model=model_factory(),
        workload=workload,
        receipts=ReceiptIssuer(events=task_events, recorder=recorder),
        trust=defense,
    )


def build_federations(
    config: RunConfig,
    specs: Sequence[SchedulerTaskConfig],
    folder: Path,
    randomness: Randomness,
    events: EventLog,
    *,
    clients: int,
    fresh: bool,
    clock: Callable[[], float] = time.time,
    model_builders: Sequence[Callable[[FederatedData, bool], nn.Module]] | None = None,
) -> tuple[list[TaskFederation], cohort_trust.RunAdversary | None]:
    """One federation per spec (:func:`build_task`, with ``model_builders[i]`` for spec
    ``i`` when given) over a population of ``clients``, with ``trust:`` a trust module each
    (their per-client reputation and suspicion shared) and with ``adversary:`` the run's
    one adversary (drawn once, before the federations are built) around each federation's
    clients; returns the federations and that adversary."""
    adversary = cohort_trust.draw_adversary(config, clients, randomness, events)
    builders: list[Callable[[FederatedData, bool], nn.Module] | None] = (
        [None] * len(specs) if model_builders is None else list(model_builders)
    )
    feds = [
        build_task(
            config,
            spec,
            folder,
            randomness,
            events,
            fresh=fresh,
            clock=clock,
            model_builder=builder,
            trust=config.trust is not None,
            adversary=None if adversary is None else adversary.wrapper(config, randomness),
        )
        for spec, builder in zip(specs, builders, strict=True)
    ]
    cohort_trust.share_trust_state(feds)
    return feds, adversary


def check_strategy_config(config: RunConfig) -> SchedulerStrategy:
    strategy = config.server.strategy
    if strategy is None or strategy.kind != "scheduler":
        raise ConfigError("server.strategy must be {kind: scheduler} for a multi-task run")
    if config.refine is not None:
        # refinement tunes one global model after each round; the scheduler has one per task
        raise ConfigError(
            "server.strategy 'scheduler' does not support ['refine'] yet; remove it (allowed "
            "with the scheduler: trust, adversary)"
        )
    check_trust_reference(config, [(f"tasks[{i}]", t.data) for i, t in enumerate(strategy.tasks)])
    user_level = [
        t.name
        for t in strategy.tasks
        if (t.privacy if t.privacy is not None else config.privacy).user_level is not None
    ]
    if user_level:
        # Its noise is calibrated for a fixed cohort (distributed shares: per participant);
        # a scheduled cohort can be smaller, and no amplification theorem covers the choice.
        raise ConfigError(
            f"server.strategy 'scheduler' does not support privacy.user_level yet (tasks "
            f"{user_level}); use privacy.sample_level with privacy.budget.client_epsilon"
        )
    if config.server.sampling != FixedSampling():
        raise ConfigError(
            "server.sampling is not used with server.strategy 'scheduler' (the scheduler "
            "chooses every task's participants); leave it unset"
        )
    if config.simulation.transport != "inprocess":
        raise ConfigError(
            "server.strategy 'scheduler' runs its tasks in process; simulation.transport "
            f"{config.simulation.transport!r} is not supported: allowed inprocess"
        )
    for i, task in enumerate(strategy.tasks):
        if task.devices_per_round < config.aggregation.min_cohort:
            raise ConfigError(
                f"server.strategy.tasks[{i}].devices_per_round={task.devices_per_round} is "
                f"below aggregation.min_cohort={config.aggregation.min_cohort}: every round "
                "of the task would be skipped; allowed >= min_cohort"
            )
    return strategy


def check_trust_reference(config: RunConfig, datasets: list[tuple[str, DataConfig]]) -> None:
    """Trust whose defense needs the server's reference update (``fltrust``, the vote's
    ``reference`` rule) trains it on each federation's own public shared set: refuse,
    naming the federation, when one has none."""
    trust = config.trust
    if trust is None or trust.defense == "none":
        return
    if not (
        trust.defense == "fltrust" or (trust.defense == "vote" and "reference" in trust.vote.rules)
    ):
        return
    empty = [
        f"{name}.data.shared.per_class" for name, data in datasets if data.shared.per_class < 1
    ]
    if empty:
        raise ConfigError(
            f"trust.defense={trust.defense!r} trains the server's reference update on each "
            f"task's public shared set, and server.strategy {empty} is 0: allowed >= 1 (or "
            "a vote without the 'reference' rule)"
        )


@dataclass(eq=False)
class StrategyRun:
    """The scheduler's state between rounds (checkpointed)."""

    participation: np.ndarray
    history: list[dict[str, Any]]


def run_scheduled(
    run: StrategyRunContext,
) -> tuple[list[dict[str, Any]], dict[str, nn.Module], str | None]:
    """Run (or continue from ``run.checkpoint``) the multi-task experiment; returns the history,
    each task's final model and why it stopped early (None)."""
    config, folder, randomness, events, checkpoint = (
        run.config,
        run.folder,
        run.randomness,
        run.events,
        run.checkpoint,
    )
    strategy = check_strategy_config(config)
    population = DevicePopulation.draw(strategy.devices, randomness)
    # one draw of the malicious devices for every task (a device is a client of each)
    tasks, adversary = build_federations(
        config,
        strategy.tasks,
        folder,
        randomness,
        events,
        clients=population.count,
        fresh=checkpoint is None,
        clock=run.clock,
    )
    policy = make_policy(strategy.policy, fairness_weight=strategy.fairness_weight)
    times = np.stack([t.workload.device_times(population) for t in tasks], axis=1)
    within_limit = (
        np.ones_like(times, dtype=bool)
        if strategy.max_device_time is None
        else times <= strategy.max_device_time
    )
    wanted = np.array([t.spec.devices_per_round for t in tasks], dtype=np.int64)
    state = StrategyRun(participation=np.zeros(population.count, dtype=np.int64), history=[])

    def announce() -> None:
        events.emit(
            "strategy_started",
            strategy="scheduler",
            policy=policy.name,
            tasks={
                t.name: {
                    "flops_per_record": t.workload.flops_per_record,
                    "upload_bytes": t.workload.upload_bytes,
                    "devices_per_round": int(t.spec.devices_per_round),
                }
                for t in tasks
            },
            devices=population.count,
            speed_median=float(np.median(population.speed)),
            bandwidth_median=float(np.median(population.bandwidth)),
        )
        cohort_trust.announce_adversary_and_notices(
            events,
            adversary,
            [
                cohort_trust.single_subcohort_notice(
                    config,
                    {f"task {t.name!r}": t.spec.devices_per_round for t in tasks},
                    remedy=(
                        "more server.strategy.tasks[].devices_per_round gives the vote several "
                        "sub-cohorts"
                    ),
                ),
                cohort_trust.dp_dormant_notice(tasks),
            ],
        )

    def play_round(round_index: int, resumed: bool) -> dict[str, Any]:
        return _run_scheduled_round(
            config, round_index, population, tasks, policy, times, within_limit, wanted,
            state, randomness, events, resumed,
        )  # fmt: skip

    return run_task_rounds(
        run,
        tasks,
        state,
        announce=announce,
        play_round=play_round,
        postfix=lambda row: {"acc": f"{row['accuracy']:.3f}", "jain": f"{row['jain_index']:.3f}"},
    )


def run_task_rounds(
    run: StrategyRunContext,
    tasks: list[TaskFederation],
    state: StrategyRun,
    *,
    announce: Callable[[], None],
    play_round: Callable[[int, bool], dict[str, Any]],
    postfix: Callable[[dict[str, Any]], dict[str, str]],
) -> tuple[list[dict[str, Any]], dict[str, nn.Module], None]:
    """The run of the strategies whose state is a :class:`StrategyRun` (the scheduler, the
    tiers): :func:`~secfl.strategies.federation_round.run_federation_rounds` with its
    checkpoint, then the final files once the last round is played. Returns the history,
    each task's final model and why it stopped early (None)."""
    config = run.config
    models, _ = federation_round.run_federation_rounds(
        run,
        tasks,
        state,
        announce=announce,
        restore=lambda saved: _restore(saved, tasks, state),
        play_round=play_round,
        checkpoint_of=lambda round_index: _checkpoint(config, round_index, tasks, state),
        postfix=postfix,
    )
    if state.history and state.history[-1]["round"] == config.rounds:
        _finish(config, run.folder, tasks, state, run.randomness, run.events)
    return state.history, models, None


def skip_task_round(
    task: TaskFederation, cohort: int, round_index: int, min_cohort: int, events: EventLog
) -> dict[str, Any] | None:
    """Whether ``task`` sits this round out: a cohort below ``min_cohort`` or a privacy budget
    that cannot pay. If so the skip is logged (``strategy_task_skipped``), counted, and its
    metrics row returned; None when the round runs."""
    reason = None
    if cohort < min_cohort:
        reason = f"cohort {cohort} below aggregation.min_cohort={min_cohort}"
    elif task.privacy.enabled and task.privacy.check_round(round_index) is not None:
        reason = f"privacy budget: {task.privacy.stopped}"
    if reason is None:
        return None
    events.emit(
        "strategy_task_skipped",
        round=round_index,
        task=task.name,
        cohort=cohort,
        min_cohort=min_cohort,
        reason=reason,
    )
    task.rounds_skipped += 1
    return {
        "round": round_index,
        "skipped": reason,
        "participants": 0,
        "round_time_s": 0.0,
        "clock_s": task.clock_s,
    }


def _run_scheduled_round(
    config: RunConfig,
    round_index: int,
    population: DevicePopulation,
    tasks: list[TaskFederation],
    policy: AssignmentPolicy,
    times: np.ndarray,
    within_limit: np.ndarray,
    wanted: np.ndarray,
    state: StrategyRun,
    randomness: Randomness,
    events: EventLog,
    resumed: bool,
) -> dict[str, Any]:
    from secfl.runner import NOT_EVALUATED, _attempt_for, evaluation_due, trained_row

    available = population.available(randomness, round_index)
    attempts = [_attempt_for(round_index, t.events, randomness) if resumed else 0 for t in tasks]
    # suspicion is per device (masking): a device over the bound is not eligible for any
    # task, so every cohort is assigned from admitted devices and keeps >= min_cohort
    admitted = cohort_trust.admitted_mask(
        tasks, available, round_index=round_index, attempt=max(attempts), events=events
    )
    payable = np.stack([t.can_pay(round_index) for t in tasks], axis=1)
    request = RoundRequest(
        round=round_index,
        times=times,
        eligible=(available & admitted)[:, None] & payable & within_limit,
        wanted=wanted,
        participation=state.participation.copy(),
    )
    assignment = policy.assign(
        request, randomness.stream("strategy.assignment", round_index=round_index)
    )
    check_assignment(request, assignment)  # fail closed, whichever policy decided
    round_times = task_round_times(request, assignment)
    events.emit(
        "strategy_assignment",
        round=round_index,
        available=int(available.sum()),
        assigned={t.name: list(a) for t, a in zip(tasks, assignment, strict=True)},
        round_time_s={t.name: float(s) for t, s in zip(tasks, round_times, strict=True)},
    )
    min_cohort = config.aggregation.min_cohort
    rows: dict[str, dict[str, Any]] = {}
    for t, (task, devices) in enumerate(zip(tasks, assignment, strict=True)):
        skipped = skip_task_round(task, len(devices), round_index, min_cohort, events)
        if skipped is not None:
            rows[task.name] = {**skipped, **NOT_EVALUATED}
            continue
        # the round, then the post-aggregation defense on the task's revealed model
        # (trust.dormant.reset)
        outcome = federation_round.train_task_round(
            task,
            round_index,
            attempts[t],
            devices,
            participation=state.participation,
            round_time=float(round_times[t]),
        )
        row = trained_row(outcome)
        row.update(task.measure() if evaluation_due(config, round_index) else NOT_EVALUATED)
        row["round_time_s"] = float(round_times[t])
        row["clock_s"] = task.clock_s
        remaining = task.remaining_epsilon()
        if remaining is not None:
            row["min_remaining_epsilon"] = float(min(remaining))
        # after every change to the task's model: the receipt names the next broadcast
        federation_round.complete_round(task, outcome, row)
        rows[task.name] = row
    accuracies = [r["accuracy"] for r in rows.values()]
    losses = [r["loss"] for r in rows.values()]
    return {
        "round": round_index,
        # the run's headline figures: the mean over tasks (each task's row is under tasks)
        "accuracy": float(np.mean(accuracies)),
        "loss": float(np.mean(losses)),
        "participants": int(sum(len(a) for a in assignment)),
        "available": int(available.sum()),
        "round_time_s": float(round_times.max()),
        "jain_index": jain_index(state.participation),
        "tasks": rows,
    }


def _checkpoint(
    config: RunConfig, round_index: int, tasks: list[TaskFederation], state: StrategyRun
) -> Checkpoint:
    task_state = {
        task.name: {
            "privacy": task.privacy.state(),
            "clock_s": task.clock_s,
            "rounds_run": task.rounds_run,
            "rounds_skipped": task.rounds_skipped,
        }
        for task in tasks
    }
    # trust: each task's centre (NAME.trust.*), the per-client state shared by all once
    return federation_round.federations_checkpoint(
        config,
        round_index,
        tasks,
        arrays={"strategy.participation": state.participation},
        state={"history": state.history, "tasks": task_state},
    )


def _restore(checkpoint: Checkpoint, tasks: list[TaskFederation], state: StrategyRun) -> None:
    state.participation[...] = checkpoint.arrays["strategy.participation"]
    state.history = list(checkpoint.state["history"])
    for task in tasks:
        saved = checkpoint.state["tasks"][task.name]
        task.privacy.load_state(saved["privacy"])
        task.clock_s = float(saved["clock_s"])
        task.rounds_run = int(saved["rounds_run"])
        task.rounds_skipped = int(saved["rounds_skipped"])
    federation_round.restore_federations(checkpoint, tasks)


def summary(history: list[dict[str, Any]], *, tail: int = 3) -> dict[str, Any]:
    """Per task: final accuracy (the last evaluation) and the mean of the last ``tail``
    evaluations, simulated time, rounds run and skipped; the final Jain index of
    per-device participation."""
    if not history:
        return {}
    tasks: dict[str, Any] = {}
    for name in history[-1]["tasks"]:
        rows = [r["tasks"][name] for r in history]
        evaluated = [float(r["accuracy"]) for r in rows if math.isfinite(r["accuracy"])]
        tasks[name] = {
            "final_accuracy": evaluated[-1] if evaluated else float("nan"),
            "final_accuracy_tail_mean": float(np.mean(evaluated[-tail:]))
            if evaluated
            else float("nan"),
            "evaluations_in_tail": min(tail, len(evaluated)),
            "clock_s": rows[-1]["clock_s"],
            "rounds_run": sum(1 for r in rows if "skipped" not in r),
            "rounds_skipped": sum(1 for r in rows if "skipped" in r),
        }
    return {"tasks": tasks, "jain_index": history[-1]["jain_index"]}


def _finish(
    config: RunConfig,
    folder: Path,
    tasks: list[TaskFederation],
    state: StrategyRun,
    randomness: Randomness,
    events: EventLog,
) -> None:
    federation_round.write_final_outputs(config, folder, tasks, state.history, randomness)
    federation_round.emit_run_finished(events, state.history)
