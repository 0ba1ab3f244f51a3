"""The run steps shared by the strategies that run several federations over one client
population (``pool``, ``scheduler``, ``tiers``), around each strategy's own round:

* :func:`run_federation_rounds`: a new run's first events or a resumed run's restored
  state, then the round loop, with the checkpoint, ``metrics.json`` and progress bar
  after every round;
* :func:`train_task_round`, :func:`complete_round`: a federation's round over the cohort
  the strategy handed it, and its bookkeeping once its model is final for the round;
* :func:`federations_checkpoint`, :func:`restore_federations`: every federation's model,
  server optimizer and trust state in the one checkpoint;
* :func:`final_models`, :func:`write_final_outputs`, :func:`emit_run_finished`: the end
  of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch import nn
from tqdm import tqdm

from secfl.audit.events import EventLog
from secfl.config import RunConfig
from secfl.encode.flatten import load_parameters, model_hash
from secfl.randomness import Randomness
from secfl.record import rundir
from secfl.record.checkpoint import Checkpoint, write_checkpoint
from secfl.record.report import write_report
from secfl.server.loop import RoundOutcome
from secfl.strategies import cohort_trust

if TYPE_CHECKING:  # avoids an import cycle with multitask
    from secfl.strategies.multitask import TaskFederation


@dataclass(frozen=True, eq=False)
class StrategyRunContext:
    """What a strategy's run is handed by :func:`secfl.run`: the run's config, folder,
    randomness and event log, the checkpoint it continues from (None: a new run), whether
    it shows a progress bar, its clock, and at most how many rounds to play now."""

    config: RunConfig
    folder: Path
    randomness: Randomness
    events: EventLog
    checkpoint: Checkpoint | None
    progress: bool
    clock: Callable[[], float]
    stop_after: int | None


class RoundsState(Protocol):
    """A strategy's state between rounds: at least the metrics rows so far."""

    history: list[dict[str, Any]]


def run_federation_rounds(
    run: StrategyRunContext,
    feds: Sequence[TaskFederation],
    state: RoundsState,
    *,
    announce: Callable[[], None],
    restore: Callable[[Checkpoint], None],
    play_round: Callable[[int, bool], dict[str, Any]],
    checkpoint_of: Callable[[int], Checkpoint],
    postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
    stop_reason: Callable[[int], str | None] | None = None,
) -> tuple[dict[str, nn.Module], str | None]:
    """A strategy's run from its start (``run.checkpoint`` None: ``run_started`` and the rest
    of :func:`~secfl.runner.announce_run`, then the strategy's ``announce``) or from
    ``run.checkpoint`` (the strategy's ``restore``, then ``run_resumed``) to round
    ``config.rounds``, at most ``run.stop_after`` rounds. ``play_round(round_index, resumed)``
    plays a round and returns its metrics row (``resumed``: the first round after a
    restart), which gets its ``time_s`` and joins ``state.history``; after each round the
    checkpoint (``checkpoint_of(round_index)``, ``checkpoint_written``), the log synced and
    ``metrics.json``. ``stop_reason(rounds_played)``, asked before every round and at the
    end, stops the run early when not None. Every federation's log is closed at the end.
    Returns every federation's final model (:func:`final_models`) and the stop reason."""
    config, folder, events, checkpoint, clock = (
        run.config,
        run.folder,
        run.events,
        run.checkpoint,
        run.clock,
    )
    if checkpoint is None:
        from secfl.runner import announce_run

        announce_run(events, config, run.randomness)
        announce()
        first_round = 1
    else:
        restore(checkpoint)
        first_round = checkpoint.round + 1
        events.emit("run_resumed", from_round=checkpoint.round)

    history = state.history
    bar = tqdm(total=config.rounds, initial=first_round - 1, disable=not run.progress, unit="round")
    done = 0
    try:
        for round_index in range(first_round, config.rounds + 1):
            if run.stop_after is not None and done >= run.stop_after:
                break
            if stop_reason is not None and stop_reason(done) is not None:
                break
            started = clock()
            resumed = checkpoint is not None and round_index == first_round
            row = play_round(round_index, resumed)
            row["time_s"] = clock() - started
            history.append(row)
            digest = write_checkpoint(folder, checkpoint_of(round_index))
            events.emit("checkpoint_written", round=round_index, sha256=digest)
            events.sync()
            rundir.write_metrics(folder, history)
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(**postfix(row))
            done += 1
    finally:
        bar.close()
        for fed in feds:
            fed.events.close()
    return final_models(feds), None if stop_reason is None else stop_reason(done)


def train_task_round(
    task: TaskFederation,
    round_index: int,
    attempt: int,
    cohort: Sequence[int],
    *,
    participation: np.ndarray,
    round_time: float,
) -> RoundOutcome:
    """``task``'s round over ``cohort``: the server's round, the trust step on its
    revealed model (:func:`~secfl.strategies.cohort_trust.after_round`), the DP ledgers'
    record, the cohort's ``participation`` counts and the task's simulated clock
    (``round_time``) and rounds run."""
    outcome = task.server.run_round(round_index, attempt, participants=cohort)
    cohort_trust.after_round(task, outcome, round_index=round_index)
    if task.privacy.enabled:
        task.privacy.record_round(outcome)
    participation[list(cohort)] += 1
    task.clock_s += round_time
    task.rounds_run += 1
    return outcome


def complete_round(fed: TaskFederation, outcome: RoundOutcome, row: dict[str, Any]) -> None:
    """A federation's round, closed once its model is final for the round (after every
    change to it): ``round_completed`` in its log, its clients' receipts naming the model
    broadcast next, its log synced."""
    from secfl.runner import emit_round_completed

    emit_round_completed(fed.events, outcome, row, fed.server.weights)
    fed.receipts.issue(outcome, fed.server.weights)
    fed.events.sync()


def federations_checkpoint(
    config: RunConfig,
    round_index: int,
    feds: Sequence[TaskFederation],
    *,
    arrays: Mapping[str, np.ndarray],
    state: Mapping[str, Any],
) -> Checkpoint:
    """The checkpoint after ``round_index``: the strategy's own ``arrays`` and ``state``,
    then every federation's global model (``NAME.global``), server optimizer
    (``NAME.opt.*``) and trust state (each one's centre, ``NAME.trust.*``; the per-client
    state they share, once, as ``trust``)."""
    saved_arrays = dict(arrays)
    for fed in feds:
        saved_arrays[f"{fed.name}.global"] = fed.server.weights
        for key, value in fed.optimizer.state_dict().items():
            saved_arrays[f"{fed.name}.opt.{key}"] = value
    saved_arrays.update(cohort_trust.trust_arrays(feds))
    saved = dict(state)
    shared = cohort_trust.trust_state(feds)
    if shared is not None:
        saved["trust"] = shared
    return Checkpoint(
        round=round_index,
        config_fingerprint=config.fingerprint(),
        arrays=saved_arrays,
        state=saved,
    )


def restore_federations(checkpoint: Checkpoint, feds: Sequence[TaskFederation]) -> None:
    """Every federation's global model, server optimizer and trust state from a
    :func:`federations_checkpoint`."""
    for fed in feds:
        fed.server.weights[...] = checkpoint.arrays[f"{fed.name}.global"]
        prefix = f"{fed.name}.opt."
        fed.optimizer.load_state_dict(
            {k[len(prefix) :]: v for k, v in checkpoint.arrays.items() if k.startswith(prefix)}
        )
    cohort_trust.restore_trust(checkpoint, feds)


def final_models(feds: Sequence[TaskFederation]) -> dict[str, nn.Module]:
    """Every federation's model, loaded with its final global weights, by name."""
    models: dict[str, nn.Module] = {}
    for fed in feds:
        load_parameters(fed.model, fed.server.weights)
        models[fed.name] = fed.model
    return models


def write_final_outputs(
    config: RunConfig,
    folder: Path,
    feds: Sequence[TaskFederation],
    history: list[dict[str, Any]],
    randomness: Randomness,
    *,
    report_history: list[dict[str, Any]] | None = None,
) -> None:
    """The end of a run's files: every federation's final model (in its folder), the
    run's ``metrics.json`` and report (``report_history``: the rows it draws, by default
    ``history``)."""
    for fed in feds:
        rundir.write_model(
            fed.folder,
            fed.model,
            metadata={
                "model_hash": model_hash(fed.server.weights).hex(),
                "config_fingerprint": fed.config.fingerprint(),
            },
        )
    rundir.write_metrics(folder, history)
    write_report(
        folder / rundir.REPORT_NAME,
        config=config.to_dict(),
        history=history if report_history is None else report_history,
        class_counts=feds[0].data.class_counts,
        secure_randomness=randomness.secure,
    )


def emit_run_finished(events: EventLog, history: list[dict[str, Any]]) -> None:
    """``run_finished`` with the last row's round, accuracy and loss."""
    final = history[-1]
    events.emit(
        "run_finished", rounds=final["round"], accuracy=final["accuracy"], loss=final["loss"]
    )
