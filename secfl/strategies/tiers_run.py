"""The hardware-tiers run (``server.strategy: {kind: tiers}``; :mod:`secfl.strategies.tiers`).

Every tier is a task of the multi-task machinery (:mod:`secfl.strategies.multitask`): an
ordinary secfl federation over the run's data, with the tier's width variant of the model,
whose server is handed the tier's participants each round. Each round, in order:

1. every tier draws its cohort among its available members whose DP budget pays (at least
   ``aggregation.min_cohort``, else the tier skips the round) and runs a secure round;
2. cross-tier transfer: every tier that trained distils the other tiers' revealed
   aggregates (those that have trained at least once) into its model on public inputs;
3. every tier is evaluated, its ``round_completed`` logged and its clients' receipts issued
   for the model that is broadcast next (after the transfer).

Trust and adversary (``trust:``, ``adversary:``; :mod:`secfl.strategies.cohort_trust`, as
the model pool and the scheduler): each tier is a federation with its own trust module,
which runs inside the tier's round over exactly the tier's round cohort (step 1);
``trust.dormant.reset`` acts on the tier's revealed aggregate right after its round, so the
transfer's teachers and students start from the defended models. Reputation and
suspicion are per client, shared by every tier's module; under ``masking`` a client whose
suspicion reached the bound is left out before any tier draws its cohort. One adversary
(one set of malicious clients) attacks every tier.

``metrics.json`` rows carry each tier's row under ``tasks`` (so ``report.html`` draws one
accuracy line per tier) plus the transfer's disagreement before and after; one checkpoint
holds everything, and the tier layout is recomputed from the design seed on resume.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from torch import nn

from secfl.audit.events import EventLog, register_event
from secfl.config import FixedSampling, RunConfig, SchedulerTaskConfig, TiersStrategy
from secfl.encode.flatten import load_parameters
from secfl.errors import ConfigError
from secfl.randomness import Randomness
from secfl.refine.inversion import InversionSettings, invert
from secfl.strategies import cohort_trust, federation_round
from secfl.strategies.federation_round import StrategyRunContext
from secfl.strategies.multitask import (
    StrategyRun,
    TaskFederation,
    build_federations,
    run_task_rounds,
    skip_task_round,
)
from secfl.strategies.scheduler import jain_index
from secfl.strategies.tiers import (
    HardwareProfiles,
    Tier,
    assign_tiers,
    capacity_score,
    cohort_size,
    draw_profiles,
    ensemble_disagreement,
    merge_tiers,
    parameter_count,
    scaled_model_config,
    transfer_between_tiers,
)

register_event("tiers_started", ("tiers", "clients", "min_cohort", "transfer"))
register_event("tiers_transfer", ("round", "learners", "teachers", "inputs", "disagreement"))


def check_tiers_config(config: RunConfig) -> TiersStrategy:
    strategy = config.server.strategy
    if not isinstance(strategy, TiersStrategy):
        raise ConfigError("server.strategy must be {kind: tiers} for a hardware-tiers run")
    refused = [
        key
        for key, value in (
            ("refine", config.refine),
            ("privacy.user_level", config.privacy.user_level),
        )
        if value is not None
    ]
    if refused:
        # user-level noise plans for a fixed cohort over all clients; a tier's is smaller.
        # refine tunes one global model; the tiers have one each (and their own transfer).
        raise ConfigError(
            f"server.strategy 'tiers' does not support {refused} yet; remove them (allowed "
            "with the tiers: trust, adversary)"
        )
    if config.server.sampling != FixedSampling():
        raise ConfigError(
            "server.sampling is not used with server.strategy 'tiers' (each tier draws its "
            "cohort: server.strategy.fraction); leave it unset"
        )
    if config.simulation.transport != "inprocess":
        raise ConfigError(
            "server.strategy 'tiers' runs its tiers in process; simulation.transport "
            f"{config.simulation.transport!r} is not supported: allowed inprocess"
        )
    if config.data.num_clients != strategy.devices.count:
        raise ConfigError(
            f"data.num_clients={config.data.num_clients} must equal "
            f"server.strategy.devices.count={strategy.devices.count} (one profile per client)"
        )
    transfer = strategy.transfer
    if transfer is not None and transfer.source != "synthetic" and config.data.shared.per_class < 1:
        raise ConfigError(
            f"server.strategy.transfer.source={transfer.source!r} distils on the public shared "
            "set; it needs data.shared.per_class >= 1 (or source: synthetic)"
        )
    return strategy


def tier_layout(
    config: RunConfig, strategy: TiersStrategy, randomness: Randomness
) -> tuple[HardwareProfiles, list[Tier]]:
    """The clients' profiles and the tiers that run (merged to ``min_cohort``)."""
    profiles = draw_profiles(strategy, randomness)
    tier_of = assign_tiers(
        capacity_score(profiles, strategy),
        rule=strategy.rule,
        cuts=strategy.cuts,
        tiers=len(strategy.tiers),
    )
    return profiles, merge_tiers(
        tier_of, tiers=len(strategy.tiers), min_cohort=config.aggregation.min_cohort
    )


def run_tiers(
    run: StrategyRunContext,
) -> tuple[list[dict[str, Any]], dict[str, nn.Module], str | None]:
    """Run (or continue) the tiered federation; returns the history, each tier's final
    model (by the name of the variant it trains) and why it stopped early (None)."""
    config, randomness, events, checkpoint = (
        run.config,
        run.randomness,
        run.events,
        run.checkpoint,
    )
    strategy = check_tiers_config(config)
    profiles, tiers = tier_layout(config, strategy, randomness)
    specs = [strategy.tiers[t.variant] for t in tiers]
    # one draw of the malicious clients for every tier
    tasks, adversary = build_federations(
        config,
        [
            SchedulerTaskConfig(
                name=spec.name,
                data=config.data,
                model=scaled_model_config(config.model, spec.width),
                client=config.client,
                devices_per_round=max(
                    config.aggregation.min_cohort,
                    cohort_size(
                        len(tier.members),
                        fraction=strategy.fraction,
                        min_cohort=config.aggregation.min_cohort,
                    ),
                ),
            )
            for tier, spec in zip(tiers, specs, strict=True)
        ],
        run.folder,
        randomness,
        events,
        clients=profiles.count,
        fresh=checkpoint is None,
        clock=run.clock,
    )
    # teacher copies of each tier's model: students must not change a teacher mid-transfer
    teachers = [copy.deepcopy(t.model) for t in tasks]
    times = [t.workload.device_times(profiles.population) for t in tasks]
    state = StrategyRun(participation=np.zeros(profiles.count, dtype=np.int64), history=[])

    def announce() -> None:
        events.emit(
            "tiers_started",
            tiers={
                task.name: {
                    "width": spec.width,
                    "members": list(tier.members),
                    "merged": [strategy.tiers[k].name for k in tier.merged],
                    "parameters": parameter_count(task.model),
                    "upload_bytes": task.workload.upload_bytes,
                    "max_device_time_s": float(np.max(time_[list(tier.members)])),
                    "min_memory_mib": float(np.min(profiles.memory_mib[list(tier.members)])),
                }
                for task, tier, spec, time_ in zip(tasks, tiers, specs, times, strict=True)
            },
            clients=profiles.count,
            min_cohort=config.aggregation.min_cohort,
            transfer=None if strategy.transfer is None else strategy.transfer.model_dump(),
        )
        cohort_trust.announce_adversary_and_notices(
            events,
            adversary,
            [
                cohort_trust.single_subcohort_notice(
                    config,
                    {f"tier {t.name!r}": t.spec.devices_per_round for t in tasks},
                    remedy="more members per tier or a larger server.strategy.fraction gives "
                    "the vote several sub-cohorts",
                ),
                cohort_trust.dp_dormant_notice(tasks),
            ],
        )

    def play_round(round_index: int, resumed: bool) -> dict[str, Any]:
        return _run_tiered_round(
            config, strategy, round_index, profiles, tiers, tasks, teachers, times, state,
            randomness, events, resumed,
        )  # fmt: skip

    return run_task_rounds(
        run,
        tasks,
        state,
        announce=announce,
        play_round=play_round,
        postfix=lambda row: {"acc": f"{row['accuracy']:.3f}"},
    )


def _cohort(
    strategy: TiersStrategy,
    tier: Tier,
    task: TaskFederation,
    available: np.ndarray,
    round_index: int,
    randomness: Randomness,
    min_cohort: int,
) -> tuple[int, ...]:
    """A uniform draw of the tier's cohort among its available (and, with trust, admitted)
    members that can pay."""
    payable = task.can_pay(round_index)
    candidates = [m for m in tier.members if available[m] and payable[m]]
    size = cohort_size(len(candidates), fraction=strategy.fraction, min_cohort=min_cohort)
    stream = randomness.stream("strategy.tiers.cohort", round_index=round_index, party=task.name)
    order = stream.permutation(len(candidates))
    return tuple(sorted(candidates[int(i)] for i in order[:size]))


def _run_tiered_round(
    config: RunConfig,
    strategy: TiersStrategy,
    round_index: int,
    profiles: HardwareProfiles,
    tiers: list[Tier],
    tasks: list[TaskFederation],
    teachers: list[nn.Module],
    times: list[np.ndarray],
    state: StrategyRun,
    randomness: Randomness,
    events: EventLog,
    resumed: bool,
) -> dict[str, Any]:
    from secfl.runner import NOT_EVALUATED, _attempt_for, evaluation_due, trained_row

    min_cohort = config.aggregation.min_cohort
    available = profiles.population.available(randomness, round_index)
    attempts = [_attempt_for(round_index, t.events, randomness) if resumed else 0 for t in tasks]
    # suspicion is per client (masking): a client over the bound is left out before any
    # tier draws its cohort, so every cohort is drawn from admitted members (>= min_cohort)
    admitted = cohort_trust.admitted_mask(
        tasks, available, round_index=round_index, attempt=max(attempts), events=events
    )
    rows: dict[str, dict[str, Any]] = {}
    outcomes: dict[int, Any] = {}
    for k, (tier, task) in enumerate(zip(tiers, tasks, strict=True)):
        cohort = _cohort(strategy, tier, task, admitted, round_index, randomness, min_cohort)
        skipped = skip_task_round(task, len(cohort), round_index, min_cohort, events)
        if skipped is not None:
            rows[task.name] = skipped
            continue
        round_time = float(np.max(times[k][list(cohort)]))
        # the round, then the tier's trust step on its revealed aggregate
        # (trust.dormant.reset), before the transfer: teachers and students are the
        # defended models
        outcome = federation_round.train_task_round(
            task,
            round_index,
            attempts[k],
            cohort,
            participation=state.participation,
            round_time=round_time,
        )
        row = trained_row(outcome)
        row["round_time_s"] = round_time
        row["clock_s"] = task.clock_s
        rows[task.name] = row
        outcomes[k] = outcome

    transfer = _transfer(
        config, strategy, round_index, tasks, teachers, sorted(outcomes), randomness
    )
    if transfer is not None:
        events.emit("tiers_transfer", round=round_index, **transfer)

    evaluate_now = evaluation_due(config, round_index)
    for k, task in enumerate(tasks):
        row = rows[task.name]
        row.update(task.measure() if evaluate_now else NOT_EVALUATED)
        if transfer is not None and task.name in transfer["disagreement"]:
            row["transfer_kl_before"], row["transfer_kl_after"] = transfer["disagreement"][
                task.name
            ]
        if k not in outcomes:
            continue
        # after the transfer: the receipt names the model that is broadcast next
        federation_round.complete_round(task, outcomes[k], row)
    accuracies = [r["accuracy"] for r in rows.values()]
    return {
        "round": round_index,
        # the headline: the mean over tiers (each tier's row is under tasks)
        "accuracy": float(np.mean(accuracies)),
        "loss": float(np.mean([r["loss"] for r in rows.values()])),
        "participants": int(sum(r["participants"] for r in rows.values())),
        "available": int(available.sum()),
        "jain_index": jain_index(state.participation),
        "tasks": rows,
    }


def _transfer(
    config: RunConfig,
    strategy: TiersStrategy,
    round_index: int,
    tasks: list[TaskFederation],
    teachers: list[nn.Module],
    trained: list[int],
    randomness: Randomness,
) -> dict[str, Any] | None:
    """Distil the other tiers into every tier that trained this round; None when there is
    nothing to transfer (no transfer configured, too early, fewer than two trained tiers)."""
    settings = strategy.transfer
    if settings is None or round_index < settings.start_round or not trained:
        return None
    ready = [k for k, t in enumerate(tasks) if t.rounds_run > 0]
    learners = [k for k in trained if len([j for j in ready if j != k]) >= 1]
    if len(ready) < 2 or not learners:
        return None
    for k in ready:
        load_parameters(teachers[k], tasks[k].server.weights)
    inputs = []
    if settings.source in ("shared", "both"):
        inputs.append(tasks[0].data.shared.x)
    if settings.source in ("synthetic", "both"):
        data = tasks[0].data
        synthetic = invert(
            [teachers[k] for k in ready],
            input_shape=data.input_shape,
            classes=list(range(data.num_classes)),
            settings=InversionSettings(
                per_class=settings.synthetic_per_class,
                steps=settings.synthetic_steps,
                feature_stats=0.0,
            ),
            stream=randomness.stream("strategy.tiers.inversion", round_index=round_index),
        )
        inputs.append(synthetic.x)
    x = np.concatenate([np.asarray(a, dtype=np.float32) for a in inputs])
    # only the tiers that have a model worth learning from take part, as teachers and students
    index = {k: i for i, k in enumerate(ready)}
    # copies of the tier's own model (as the privacy layer prepared it): same layout
    students = [copy.deepcopy(tasks[k].model) for k in ready]
    weights = [tasks[k].server.weights for k in ready]
    before = {
        tasks[k].name: ensemble_disagreement(
            teachers[k], [teachers[j] for j in ready if j != k], x, temperature=settings.temperature
        )
        for k in learners
    }
    new = transfer_between_tiers(
        students,
        [teachers[k] for k in ready],
        weights,
        x,
        settings=settings,
        streams=[
            randomness.stream(
                "strategy.tiers.transfer", round_index=round_index, party=tasks[k].name
            )
            for k in ready
        ],
        learners=[index[k] for k in learners],
    )
    disagreement: dict[str, list[float]] = {}
    for k in learners:
        load_parameters(students[index[k]], new[index[k]])
        after = ensemble_disagreement(
            students[index[k]],
            [teachers[j] for j in ready if j != k],
            x,
            temperature=settings.temperature,
        )
        disagreement[tasks[k].name] = [before[tasks[k].name], after]
    for k in learners:
        tasks[k].server.weights[...] = new[index[k]]
    return {
        "learners": [tasks[k].name for k in learners],
        "teachers": [tasks[k].name for k in ready],
        "inputs": len(x),
        "disagreement": disagreement,
    }
