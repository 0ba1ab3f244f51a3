"""The random model sharing pool (CN119005361B, claims S401-S406; ``server.strategy:
{kind: pool}``).

A pool of base models (architectures and initialisations from the config). Each round:

1. the round's participants (every client, or ``participants_per_round`` drawn uniformly)
   advertise fresh pool keys, the server derives from them which models are drawn and who
   trains which (:mod:`secfl.strategies.pool_assign`), and every participant verifies its
   assignment before training (a mismatch raises :class:`PoolAssignmentError`);
2. each drawn model is an ordinary secfl federation (:func:`secfl.strategies.multitask.
   build_task`) that runs its round over its own cohort, at least ``aggregation.min_cohort``
   participants, in the configured protection mode;
3. every trained model is evaluated on the test split and its convergence test updated
   (:mod:`secfl.strategies.pool_select`); once all have converged (``stop_when_converged``)
   or the rounds are over, the acceptable set and the elimination rule pick the shared
   models (``pool.json`` and the ``pool_finished`` event).

Trust and adversary (``trust:``, ``adversary:``): each base model's federation has its own
trust module, which runs inside that model's round over exactly its cohort, as
``secfl.run`` runs it over a round (mode ``none`` and ``ckks``: the vote over the cohort's
updates or their scalars; ``masking``: the cohort is split into sub-cohorts of at least
``aggregation.min_cohort``). Reputation and suspicion are per *client*, shared by every base
model's module (a client's history is evidence about the client, whichever model it
trained); under ``masking`` a client whose suspicion reached the bound is left out before
the pool assignment, so the cohorts are dealt from admitted participants only. One
adversary (one set of malicious clients) attacks every base model. The shared parts
(per-client state, exclusion, adversary, checkpoint) are
:mod:`secfl.strategies.cohort_trust`, which the scheduler and the tiers use too.

Message sizes: every base model's parameter vector is padded with frozen zeros to the
largest model's size (:class:`PaddedModel`), so the broadcast, the update and every
protocol message of a participant have the same length whichever model it trains; the
padding's update is exactly zero, so it changes nothing in the sum. The cost: a small
model's participant sends as much as the largest model's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secfl.attacks.adversary import ADAPTED_MODES
from secfl.audit.events import EventLog, register_event
from secfl.client.trainer import evaluate
from secfl.config import (
    FixedSampling,
    PoolModelConfig,
    PoolStrategy,
    RunConfig,
    SchedulerTaskConfig,
)
from secfl.data.federated import FederatedData
from secfl.encode.flatten import load_parameters
from secfl.errors import ConfigError
from secfl.models import build_model
from secfl.randomness import Randomness
from secfl.record.checkpoint import Checkpoint
from secfl.strategies import cohort_trust, federation_round
from secfl.strategies.cohort_trust import RunAdversary
from secfl.strategies.federation_round import StrategyRunContext
from secfl.strategies.multitask import TaskFederation, build_federations
from secfl.strategies.pool_assign import PoolAssignment, PoolParticipant, assign
from secfl.strategies.pool_select import Candidate, eliminate, has_converged
from secfl.trust.defense import TrustModule

register_event("pool_started", ("models", "parameters", "padded_to", "models_per_round"))
register_event("pool_assignment", ("round", "attempt", "seed_inputs", "drawn", "cohorts"))
register_event("pool_round_skipped", ("round", "participants", "min_cohort", "reason"))
register_event("pool_finished", ("converged", "acceptable", "shared", "eliminated"))

POOL_NAME = "pool.json"


class PaddedModel(nn.Module):
    """``inner`` plus a frozen zero parameter that pads its parameter vector to ``size``
    (appended last, so the flattened vector is the inner model's followed by zeros)."""

    def __init__(self, inner: nn.Module, size: int) -> None:
        super().__init__()
        own = sum(int(p.numel()) for p in inner.parameters())
        if size < own:
            raise ConfigError(f"cannot pad a model of {own} parameters to {size}")
        self.inner = inner
        self.padding = nn.Parameter(torch.zeros(size - own), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def parameter_count(spec: PoolModelConfig, data: FederatedData) -> int:
    model = build_model(spec.model, data.input_shape, data.num_classes)
    return sum(int(p.numel()) for p in model.parameters())


def model_builder(
    spec: PoolModelConfig, index: int, size: int, randomness: Randomness
) -> Callable[[FederatedData, bool], nn.Module]:
    """Builds base model ``spec`` padded to ``size``; the initial model is seeded from the
    design stream ``model.init`` under the party ``pool-init-<init_seed>``, so entries with
    one architecture and different ``init_seed`` start from different weights."""
    init_seed = index if spec.init_seed is None else spec.init_seed

    def build(data: FederatedData, initial: bool) -> nn.Module:
        if not initial:
            return PaddedModel(build_model(spec.model, data.input_shape, data.num_classes), size)
        seed = randomness.stream("model.init", party=f"pool-init-{init_seed}").seed_int()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inner = build_model(spec.model, data.input_shape, data.num_classes)
        return PaddedModel(inner, size)

    return build


def check_pool_config(config: RunConfig) -> PoolStrategy:
    strategy = config.server.strategy
    if not isinstance(strategy, PoolStrategy):
        raise ConfigError("server.strategy must be {kind: pool} for a model-pool run")
    refused = [
        key
        for key, value in (
            ("refine", config.refine),
            ("privacy.sample_level", config.privacy.sample_level),
            ("privacy.user_level", config.privacy.user_level),
        )
        if value is not None
    ]
    if refused:
        # DP: a client's data trains several base models over the rounds, so one ledger
        # per client across the pool is needed first.
        raise ConfigError(
            f"server.strategy 'pool' does not support {refused} yet; remove them (allowed "
            "with the pool: trust, adversary)"
        )
    protection = config.aggregation.protection
    if config.adversary is not None and protection not in ADAPTED_MODES:
        raise ConfigError(
            f"adversary is not implemented yet for aggregation.protection={protection!r}; "
            f"allowed: {sorted(ADAPTED_MODES)}"
        )
    if config.server.sampling != FixedSampling():
        raise ConfigError(
            "server.sampling is not used with server.strategy 'pool' (use "
            "server.strategy.participants_per_round); leave it unset"
        )
    if config.simulation.transport != "inprocess":
        raise ConfigError(
            f"server.strategy 'pool' runs in process; simulation.transport "
            f"{config.simulation.transport!r} is not supported: allowed inprocess"
        )
    per_round = strategy.participants_per_round or config.data.num_clients
    if per_round > config.data.num_clients:
        raise ConfigError(
            f"server.strategy.participants_per_round={per_round} exceeds data.num_clients="
            f"{config.data.num_clients}"
        )
    if per_round < config.aggregation.min_cohort:
        raise ConfigError(
            f"server.strategy.participants_per_round={per_round} is below "
            f"aggregation.min_cohort={config.aggregation.min_cohort}: no model could be "
            "trained; allowed >= min_cohort"
        )
    return strategy


@dataclass(eq=False)
class PoolState:
    """Between rounds (checkpointed): the history and each model's test errors."""

    history: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, list[float]] = field(default_factory=dict)
    rounds_trained: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class Pool:
    """The base models' federations and the participants' pool-stage state."""

    strategy: PoolStrategy
    models: list[TaskFederation]
    parameters: dict[str, int]
    padded_to: int
    participants: dict[int, PoolParticipant]
    #: The first base model's trust module (None without trust); every model's module
    #: shares its per-client reputation and suspicion, and it admits the participants.
    trust: TrustModule | None = None
    #: The run's one adversary (its selection and whether it is new in the event log).
    adversary: RunAdversary | None = None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def by_name(self, name: str) -> TaskFederation:
        return self.models[self.names.index(name)]


def build_pool(
    config: RunConfig,
    folder: Path,
    randomness: Randomness,
    events: EventLog,
    *,
    fresh: bool,
    clock: Callable[[], float] = time.time,
) -> Pool:
    """One federation per base model (its folder ``tasks/NAME``), padded to one size."""
    strategy = check_pool_config(config)
    per_round = strategy.participants_per_round or config.data.num_clients
    specs = [
        SchedulerTaskConfig(
            name=m.name,
            data=config.data,
            model=m.model,
            client=config.client,
            privacy=None,
            devices_per_round=per_round,
        )
        for m in strategy.models
    ]
    from secfl.data.federated import build_federated_data

    probe = build_federated_data(config.data, randomness)
    parameters = {m.name: parameter_count(m, probe) for m in strategy.models}
    size = max(parameters.values())
    # one draw of the malicious clients for the whole pool
    models, adversary = build_federations(
        config,
        specs,
        folder,
        randomness,
        events,
        clients=config.data.num_clients,
        fresh=fresh,
        clock=clock,
        model_builders=[
            model_builder(m, i, size, randomness) for i, m in enumerate(strategy.models)
        ],
    )
    # the module whose per-client reputation and suspicion every model's module shares
    trust = models[0].trust
    names = [m.name for m in strategy.models]
    participants = {
        i: PoolParticipant(
            i,
            randomness,
            models=names,
            models_per_round=strategy.models_per_round,
            min_cohort=config.aggregation.min_cohort,
        )
        for i in range(config.data.num_clients)
    }
    return Pool(
        strategy,
        models,
        parameters,
        size,
        participants,
        trust=trust,
        adversary=adversary,
    )


def draw_participants(
    config: RunConfig, strategy: PoolStrategy, randomness: Randomness, round_index: int
) -> list[int]:
    n = config.data.num_clients
    if strategy.participants_per_round is None:
        return list(range(n))
    stream = randomness.stream("strategy.pool.participants", round_index=round_index)
    return sorted(int(i) for i in stream.permutation(n)[: strategy.participants_per_round])


def assign_round(
    pool: Pool,
    round_index: int,
    attempt: int,
    participants: list[int],
    min_cohort: int,
    *,
    tamper: Callable[[PoolAssignment], PoolAssignment] | None = None,
) -> tuple[PoolAssignment, dict[int, str]]:
    """The pool stage of a round: adverts, the server's assignment (``tamper``: tests
    emulate a cheating server), each participant's verification (raises on a mismatch)."""
    adverts = [pool.participants[i].advertise(round_index, attempt) for i in participants]
    assignment = assign(
        round_index,
        attempt,
        [(a.client_id, a.key) for a in adverts],
        pool.names,
        models_per_round=pool.strategy.models_per_round,
        min_cohort=min_cohort,
    )
    if tamper is not None:
        assignment = tamper(assignment)
    accepted = {i: pool.participants[i].verify(assignment) for i in participants}
    return assignment, accepted


def run_pool(
    run: StrategyRunContext,
) -> tuple[list[dict[str, Any]], dict[str, nn.Module], str | None]:
    """Run (or continue from ``run.checkpoint``) the pool; returns the history, each base
    model's final model (the padded wrapper) and why it stopped early (None)."""
    config, folder, randomness, events = run.config, run.folder, run.randomness, run.events
    pool = build_pool(
        config, folder, randomness, events, fresh=run.checkpoint is None, clock=run.clock
    )
    strategy = pool.strategy
    state = PoolState(errors={n: [] for n in pool.names}, rounds_trained={n: 0 for n in pool.names})

    def announce() -> None:
        events.emit(
            "pool_started",
            models=pool.names,
            parameters=pool.parameters,
            padded_to=pool.padded_to,
            models_per_round=strategy.models_per_round,
        )
        cohort_trust.announce_adversary_and_notices(
            events, pool.adversary, [single_subcohort_notice(config, strategy)]
        )

    def stop_reason(rounds_played: int) -> str | None:
        # before any round: a resumed run whose models had all converged plays no more;
        # after one (stop_when_converged): once every model has converged
        if rounds_played == 0:
            stop = bool(state.history) and all_converged(strategy, state)
        else:
            stop = strategy.stop_when_converged and all_converged(strategy, state)
        return "every base model has converged" if stop else None

    models, stopped = federation_round.run_federation_rounds(
        run,
        pool.models,
        state,
        announce=announce,
        restore=lambda saved: _restore(saved, pool, state),
        play_round=lambda round_index, resumed: _run_pool_round(
            config, round_index, pool, state, randomness, events, resumed
        ),
        checkpoint_of=lambda round_index: _checkpoint(config, round_index, pool, state),
        stop_reason=stop_reason,
    )
    finished = state.history and (
        state.history[-1]["round"] == config.rounds or stopped is not None
    )
    if finished:
        _finish(config, folder, pool, state, randomness, events)
    return state.history, models, stopped


def single_subcohort_notice(config: RunConfig, strategy: PoolStrategy) -> str | None:
    """:func:`~secfl.strategies.cohort_trust.single_subcohort_notice` for the pool's
    cohorts: a full round of n participants dealt to k models gives cohorts of at least
    n // k (None when they are big enough, or without trust under masking)."""
    n = strategy.participants_per_round or config.data.num_clients
    k = min(strategy.models_per_round, len(strategy.models), n // config.aggregation.min_cohort)
    return cohort_trust.single_subcohort_notice(
        config,
        {f"the pool deals a round of {n} participants to {k} models": n // k},
        remedy=(
            "more participants per round or fewer server.strategy.models_per_round give the "
            "vote several sub-cohorts"
        ),
    )


def all_converged(strategy: PoolStrategy, state: PoolState) -> bool:
    return all(converged(strategy, errors) for errors in state.errors.values())


def converged(strategy: PoolStrategy, errors: list[float]) -> bool:
    c = strategy.convergence
    return has_converged(errors, error_bound=c.error_bound, tolerance=c.tolerance, window=c.window)


def _run_pool_round(
    config: RunConfig,
    round_index: int,
    pool: Pool,
    state: PoolState,
    randomness: Randomness,
    events: EventLog,
    resumed: bool,
) -> dict[str, Any]:
    from secfl.runner import NOT_EVALUATED, _attempt_for, evaluation_due, trained_row

    min_cohort = config.aggregation.min_cohort
    attempt = _attempt_for(round_index, pool.models[0].events, randomness) if resumed else 0
    participants = draw_participants(config, pool.strategy, randomness, round_index)
    # suspicion is per client (masking): the excluded never reach the assignment, so
    # every cohort is dealt from admitted participants and keeps >= min_cohort
    participants = cohort_trust.admit(
        pool.models, participants, round_index=round_index, attempt=attempt, events=events
    )
    assignment, _ = assign_round(pool, round_index, attempt, participants, min_cohort)
    events.emit(
        "pool_assignment",
        round=round_index,
        attempt=attempt,
        seed_inputs={str(i): key.hex() for i, key in assignment.adverts},
        drawn=[pool.names[i] for i in assignment.drawn],
        cohorts={
            pool.names[i]: list(c)
            for i, c in zip(assignment.drawn, assignment.cohorts, strict=True)
        },
    )
    if not assignment.drawn:
        events.emit(
            "pool_round_skipped",
            round=round_index,
            participants=len(participants),
            min_cohort=min_cohort,
            reason="too few participants for one cohort",
        )
    rows: dict[str, dict[str, Any]] = {}
    for index, cohort in zip(assignment.drawn, assignment.cohorts, strict=True):
        fed = pool.models[index]
        # never reached: assign() deals k <= n // min_cohort cohorts; kept as a fail-closed check
        if len(cohort) < min_cohort:
            raise ConfigError(f"pool cohort of {len(cohort)} is below min_cohort={min_cohort}")
        outcome = fed.server.run_round(round_index, attempt, participants=cohort)
        # post-aggregation defense on the revealed model (trust.dormant.reset), as run
        cohort_trust.after_round(fed, outcome, round_index=round_index)
        state.rounds_trained[fed.name] += 1
        row = trained_row(outcome)
        if evaluation_due(config, round_index):
            measured = fed.measure()
            row.update(measured)
            state.errors[fed.name].append(1.0 - measured["accuracy"])
        else:
            row.update(NOT_EVALUATED)
        row["cohort"] = len(cohort)
        row["converged"] = converged(pool.strategy, state.errors[fed.name])
        federation_round.complete_round(fed, outcome, row)
        rows[fed.name] = row
    evaluated = [r["accuracy"] for r in rows.values() if math.isfinite(r["accuracy"])]
    return {
        "round": round_index,
        # the headline: the mean over the models trained and evaluated this round
        "accuracy": float(np.mean(evaluated)) if evaluated else float("nan"),
        "loss": float(np.mean([r["loss"] for r in rows.values()])) if rows else float("nan"),
        "participants": len(participants),
        "drawn": [pool.names[i] for i in assignment.drawn],
        "converged": [n for n in pool.names if converged(pool.strategy, state.errors[n])],
        "models": rows,
    }


def final_selection(config: RunConfig, pool: Pool, state: PoolState) -> dict[str, Any]:
    """S401/S405 on the final models, then the acceptable set and the elimination rule."""
    strategy = pool.strategy
    candidates = []
    per_model: dict[str, Any] = {}
    for fed in pool.models:
        load_parameters(fed.model, fed.server.weights)
        correct, loss = evaluate(fed.model, fed.data.test, batch_size=config.evaluation.batch_size)
        size = pool.parameters[fed.name]
        candidates.append(
            Candidate(
                name=fed.name,
                correct=int(correct.sum()),
                trials=int(correct.size),
                architecture=json.dumps(fed.spec.model.model_dump(mode="json"), sort_keys=True),
                weights=np.asarray(fed.server.weights[:size]),
            )
        )
        per_model[fed.name] = {
            "accuracy": float(correct.mean()),
            "loss": float(loss),
            "parameters": size,
            "rounds_trained": state.rounds_trained[fed.name],
            "converged": converged(strategy, state.errors[fed.name]),
        }
    accepted, shared, eliminated, intervals = eliminate(
        candidates, confidence=strategy.confidence, duplicate_cosine=strategy.duplicate_cosine
    )
    for name, (lo, hi) in intervals.items():
        per_model[name]["clopper_pearson"] = [lo, hi]
    return {
        "models": per_model,
        "converged": [n for n in pool.names if per_model[n]["converged"]],
        "acceptable": accepted,
        "shared": shared,
        "eliminated": eliminated,
        "confidence": strategy.confidence,
        "padded_to": pool.padded_to,
    }


def _checkpoint(config: RunConfig, round_index: int, pool: Pool, state: PoolState) -> Checkpoint:
    # per model: its model, optimizer and centered clipping's centre; the per-client trust
    # state, shared by every model, saved once
    return federation_round.federations_checkpoint(
        config,
        round_index,
        pool.models,
        arrays={},
        state={
            "history": state.history,
            "errors": state.errors,
            "rounds_trained": state.rounds_trained,
        },
    )


def _restore(checkpoint: Checkpoint, pool: Pool, state: PoolState) -> None:
    state.history = list(checkpoint.state["history"])
    state.errors = {k: [float(e) for e in v] for k, v in checkpoint.state["errors"].items()}
    state.rounds_trained = {k: int(v) for k, v in checkpoint.state["rounds_trained"].items()}
    federation_round.restore_federations(checkpoint, pool.models)


def _finish(
    config: RunConfig,
    folder: Path,
    pool: Pool,
    state: PoolState,
    randomness: Randomness,
    events: EventLog,
) -> None:
    selection = final_selection(config, pool, state)
    (folder / POOL_NAME).write_text(json.dumps(selection, indent=2, sort_keys=True))
    federation_round.write_final_outputs(
        config,
        folder,
        pool.models,
        state.history,
        randomness,
        # the report draws one accuracy line per entry of ``tasks``: here, per base model
        report_history=[
            {**r, "tasks": {n: r["models"].get(n, {"accuracy": math.nan}) for n in pool.names}}
            for r in state.history
        ],
    )
    events.emit(
        "pool_finished",
        converged=selection["converged"],
        acceptable=selection["acceptable"],
        shared=selection["shared"],
        eliminated=selection["eliminated"],
    )
    federation_round.emit_run_finished(events, state.history)
