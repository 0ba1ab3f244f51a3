"""Trust and adversary per cohort, shared by the strategies that run several federations
over one client population (``pool``, ``scheduler``, ``tiers``).

Each federation (a base model, a task, a tier: a :class:`TaskFederation` built with
``build_task(trust=True, adversary=...)``) has its own trust module, which runs inside that
federation's round over exactly the cohort the strategy handed it, as ``secfl.run`` runs
it over a round; this module holds what the strategies share around it:

* :func:`share_trust_state`: reputation and suspicion are per *client*, one table shared by
  every federation's module (a client's history is evidence about the client, whichever
  model it trained); the reference update and centered clipping's centre stay per
  federation (they live in that federation's model space);
* :func:`admit`: under ``masking`` the clients whose suspicion reached the bound are left
  out before the strategy deals its cohorts (``trust_excluded`` in the run's log), so every
  cohort is dealt from admitted clients and keeps ``aggregation.min_cohort``;
* :func:`after_round`: the post-aggregation step (``trust.dormant.reset``) on a
  federation's revealed model right after its round;
* :func:`draw_adversary`: one adversary (one set of malicious clients) for the whole run,
  wrapped around each federation's transport where ``secfl.run`` puts it;
* :func:`trust_arrays`, :func:`trust_state`, :func:`restore_trust`: the checkpoint (the
  shared per-client state once, each federation's centre under ``NAME.trust.*``);
* :func:`announce_adversary_and_notices`: a new run's adversary selection and trust
  warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from secfl.attacks.adversary import Adversary
from secfl.attacks.simulation import adversarial_transport, build_adversary
from secfl.audit.events import EventLog, read_events
from secfl.client.app import ClientApp
from secfl.config import RunConfig
from secfl.errors import ConfigError
from secfl.randomness import Randomness
from secfl.record.checkpoint import Checkpoint
from secfl.server.loop import RoundOutcome
from secfl.transport.base import Transport
from secfl.trust.defense import TrustModule

if TYPE_CHECKING:  # avoids an import cycle with multitask
    from secfl.strategies.multitask import TaskFederation

#: Wraps a federation's clients' transport in the adversary (``build_task(adversary=...)``).
AdversaryWrapper = Callable[[Transport, list[ClientApp], EventLog], Transport]


@dataclass(frozen=True, eq=False)
class RunAdversary:
    """The run's one adversary, and whether its selection is new (not yet in the log)."""

    adversary: Adversary
    new: bool

    def announce(self, events: EventLog) -> None:
        """``adversary_selected`` (the ground truth) in the run's log, once per run."""
        if self.new:
            events.emit(
                "adversary_selected",
                attack=self.adversary.attack.name,
                clients=sorted(self.adversary.malicious),
                setting=self.adversary.describe(),
            )

    def wrapper(self, config: RunConfig, randomness: Randomness) -> AdversaryWrapper:
        return adversary_transport(config, self.adversary, randomness)


def draw_adversary(
    config: RunConfig, clients: int, randomness: Randomness, events: EventLog
) -> RunAdversary | None:
    """One draw of the malicious clients among ``clients`` for the whole run (a fresh draw
    per federation would, in ``os`` mode, make a client malicious for one model and honest
    for another); a resumed run reuses the selection in the run's log. None without
    ``adversary:``."""
    if config.adversary is None:
        return None
    adversary, new = build_adversary(config.adversary, list(range(clients)), randomness, events)
    return RunAdversary(adversary, new)


def adversary_transport(
    config: RunConfig, adversary: Adversary, randomness: Randomness
) -> AdversaryWrapper:
    """Wraps a federation's clients' transport in the adversary of its protection mode, as
    ``secfl.run`` does (:func:`secfl.attacks.simulation.with_adversary`), with the run's
    one adversary. The federation's event log gets ``adversary_selected`` (its ground
    truth) at its first round unless it already has it (a resumed run)."""
    protection = config.aggregation.protection

    def wrap(inner: Transport, clients: list[ClientApp], events: EventLog) -> Transport:
        logged = events.path.exists() and any(
            e.get("event") == "adversary_selected" for e in read_events(events.path)
        )
        return adversarial_transport(
            inner,
            adversary,
            protection,
            clients,
            randomness=randomness,
            events=events,
            announce=not logged,
        )

    return wrap


def share_trust_state(feds: Sequence[TaskFederation]) -> TrustModule | None:
    """Make every federation's trust module use the first one's per-client reputation and
    suspicion; returns that module (None without trust). What stays per federation: the
    reference update (trained on the federation's own model) and centered clipping's
    centre (a vector of the federation's space)."""
    modules = [f.trust for f in feds]
    first = modules[0] if modules else None
    if first is None:
        return None
    for module in modules[1:]:
        if module is None:  # pragma: no cover - one config builds every federation's module
            raise ConfigError("every federation needs a trust module when one has one")
        module.reputation = first.reputation
        module.suspicion = first.suspicion
    return first


def admit(
    feds: Sequence[TaskFederation],
    clients: Sequence[int],
    *,
    round_index: int,
    attempt: int,
    events: EventLog,
) -> list[int]:
    """The clients whose shared suspicion is below the bound (all of them without trust;
    suspicion only grows under ``masking``); each one left out is logged in ``events``
    (``trust_excluded``)."""
    shared = feds[0].trust if feds else None
    if shared is None:
        return list(clients)
    return shared.admit(list(clients), round_index=round_index, attempt=attempt, events=events)


def admitted_mask(
    feds: Sequence[TaskFederation],
    available: np.ndarray,
    *,
    round_index: int,
    attempt: int,
    events: EventLog,
) -> np.ndarray:
    """:func:`admit` over the clients marked in ``available`` (a boolean mask over the
    population), as a mask of the same shape: True for each available client admitted."""
    admitted = np.zeros_like(available)
    admitted[
        admit(
            feds,
            [int(c) for c in np.flatnonzero(available)],
            round_index=round_index,
            attempt=attempt,
            events=events,
        )
    ] = True
    return admitted


def after_round(fed: TaskFederation, outcome: RoundOutcome, *, round_index: int) -> None:
    """The trust module's post-aggregation step (``trust.dormant.reset``) on the
    federation's revealed model, right after a round that released a sum, as
    ``secfl.run`` does."""
    if fed.trust is not None and outcome.aggregate is not None:
        fed.trust.after_round(
            fed.server.weights, round_index=round_index, attempt=outcome.attempt, events=fed.events
        )


def trust_arrays(feds: Sequence[TaskFederation]) -> dict[str, np.ndarray]:
    """Each federation's vector trust state under ``NAME.trust.*`` (centered clipping's
    centre)."""
    arrays: dict[str, np.ndarray] = {}
    for fed in feds:
        if fed.trust is not None:
            for key, value in fed.trust.arrays().items():
                arrays[f"{fed.name}.{key}"] = value
    return arrays


def trust_state(feds: Sequence[TaskFederation]) -> dict[str, Any] | None:
    """The per-client reputation and suspicion, shared by every federation: saved once
    (None without trust)."""
    shared = feds[0].trust if feds else None
    return None if shared is None else shared.state()


def restore_trust(checkpoint: Checkpoint, feds: Sequence[TaskFederation]) -> None:
    """Load :func:`trust_state` (into the shared tables; the same values for every
    federation) and each federation's :func:`trust_arrays`."""
    for fed in feds:
        if fed.trust is None:
            continue
        own = f"{fed.name}."
        fed.trust.load_state(
            checkpoint.state.get("trust"),
            {
                k[len(own) :]: v
                for k, v in checkpoint.arrays.items()
                if k.startswith(f"{own}trust.")
            },
        )


def announce_adversary_and_notices(
    events: EventLog, adversary: RunAdversary | None, notices: Sequence[str | None]
) -> None:
    """A new run's trust and adversary events: the adversary's selection
    (:meth:`RunAdversary.announce`), then each notice that applies as a ``warning``."""
    if adversary is not None:
        adversary.announce(events)
    for message in notices:
        if message is not None:
            events.emit("warning", message=message)


def single_subcohort_notice(
    config: RunConfig, smallest: Mapping[str, int], *, remedy: str
) -> str | None:
    """Trust under ``masking`` splits each cohort into floor(size / min_cohort)
    sub-cohorts, as ``secfl.run`` splits a round; a cohort smaller than 2 * min_cohort is
    one sub-cohort, whose vote has a single candidate (flagged only against the reference:
    cosine <= 0, or its dormant share). ``smallest`` maps each federation (or a
    description) to its planned cohort size; says which are that small (None otherwise,
    or without trust under masking)."""
    if config.trust is None or config.trust.defense == "none":
        return None
    if config.aggregation.protection != "masking":
        return None
    bound = 2 * config.aggregation.min_cohort
    small = {name: n for name, n in smallest.items() if n < bound}
    if not small:
        return None
    listed = "; ".join(f"{name}: cohorts of at least {n}" for name, n in small.items())
    return (
        f"trust under masking: {listed}, below 2 * aggregation.min_cohort={bound}, so such "
        "a cohort is one sub-cohort and its vote has a single candidate (flagged only by "
        f"the reference: cosine <= 0 or its dormant share); {remedy}"
    )


def dp_dormant_notice(feds: Sequence[TaskFederation]) -> str | None:
    """``trust.dormant.flag_share`` with DP-SGD (``privacy.sample_level``): the noise spreads
    an honest update's norm over the dormant-fed weights as over the others, so the flag
    can fire on honest clients, and their reputation and suspicion are shared with every
    other federation. Says which federations have both (None if none)."""
    names = []
    for fed in feds:
        trust = fed.config.trust
        if fed.trust is None or trust is None or trust.defense != "vote":
            continue
        if trust.dormant.flag_share is not None and fed.config.privacy.sample_level is not None:
            names.append(fed.name)
    if not names:
        return None
    return (
        f"trust.dormant.flag_share with privacy.sample_level in {names}: DP-SGD's noise spreads "
        "an honest update's norm over the weights fed by dormant units too (a digits MLP "
        "task with noise_multiplier 1 measured a share of about 0.44 for every participant, "
        "above the default bound 0.15), so the flag can fire on honest clients, whose "
        "per-client reputation and suspicion every other federation shares; "
        "trust.dormant.flag_share: null turns the flag off"
    )
