"""The privacy side of a federation: each client's DP-SGD and ledger, and the run's ledger.

:class:`ClientPrivacy` is client-side state: its DP-SGD settings, its sample-level
:class:`~secfl.privacy.ledger.PartyLedger` and its budget; a client over budget refuses to
train (:class:`~secfl.errors.BudgetExhausted`, which the client answers as a failure).

:class:`PrivacyRecorder` is the auditor's view the runner keeps in simulation: it checks the
budget before each round (fail closed), charges the user-level events the protection
reports, collects the clients' sample-level events, writes ``ledger.json`` and mirrors every
event into ``events.jsonl``. Its :meth:`~PrivacyRecorder.state` goes into the checkpoint, so
a resumed run restores every accountant and the ledger exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from secfl.audit.events import EventLog, register_event
from secfl.errors import BudgetExhausted, PrivacyError
from secfl.privacy.accountants import calibrate_noise_multiplier
from secfl.privacy.central import UserLevelMechanism
from secfl.privacy.dpsgd import (
    DpSgdSettings,
    PerSampleGradients,
    dp_mean_gradient,
    train_dp_sgd,
    validate_model,
)
from secfl.privacy.events import STATS_ATTEMPT_OFFSET, DpEvent
from secfl.privacy.ledger import PartyLedger, check_delta

if TYPE_CHECKING:
    from secfl.client.trainer import LocalResult
    from secfl.config import ClientConfig, RunConfig
    from secfl.data.datasets import Dataset
    from secfl.randomness import Randomness
    from secfl.server.loop import RoundOutcome

LEDGER_NAME = "ledger.json"
LEDGER_FORMAT = "secfl-ledger/1"

register_event(
    "dp_event",
    (
        "level",
        "party",
        "round",
        "attempt",
        "mechanism",
        "noise_multiplier",
        "sampling_rate",
        "steps",
        "sensitivity",
        "noise_std",
        "amplification",
    ),
)
register_event("privacy_budget_exhausted", ("round", "budget", "message"))
register_event("privacy_notice", ("message",))


def sample_level_settings(config: RunConfig) -> DpSgdSettings:
    """DP-SGD settings; a ``target_epsilon`` is calibrated for the worst case (the client
    takes part in all ``config.rounds`` rounds) with the sample-level accountant."""
    sample = config.privacy.sample_level
    if sample is None:
        raise PrivacyError("privacy.sample_level is not configured")
    steps = DpSgdSettings(1.0, sample.max_grad_norm, sample.sample_rate, config.client.epochs)
    sigma = sample.noise_multiplier
    if sigma is None:
        if sample.target_epsilon is None:
            raise PrivacyError("privacy.sample_level needs noise_multiplier or target_epsilon")
        sigma = calibrate_noise_multiplier(
            config.privacy.accountant.sample_level,
            target_epsilon=sample.target_epsilon,
            delta=sample.delta,
            sampling_rate=sample.sample_rate,
            steps=steps.steps_per_round * config.rounds,
        )
    return DpSgdSettings(sigma, sample.max_grad_norm, sample.sample_rate, config.client.epochs)


class ClientPrivacy:
    """One client's DP-SGD, ledger and budget."""

    def __init__(self, client_id: int, ledger: PartyLedger, settings: DpSgdSettings) -> None:
        self.client_id = client_id
        self.ledger = ledger
        self.settings = settings
        self._engine: PerSampleGradients | None = None
        self._engine_model: nn.Module | None = None

    @property
    def party(self) -> str:
        return f"client:{self.client_id}"

    def planned_event(self, round_index: int, attempt: int = 0) -> DpEvent:
        return self.settings.round_event(round_index=round_index, party=self.party, attempt=attempt)

    def exhausted(self, round_index: int) -> bool:
        return self.ledger.would_exceed([self.planned_event(round_index)])

    def train(
        self,
        model: nn.Module,
        data: Dataset,
        config: ClientConfig,
        randomness: Randomness,
        *,
        round_index: int,
        attempt: int,
        teacher: torch.Tensor | None = None,
    ) -> LocalResult:
        """DP-SGD for one round; refuses (``BudgetExhausted``) if it would exceed the budget.
        Every attempt is charged: the event is added before the update leaves the client.

        With ``config.distill`` every record's loss is the distillation objective against
        ``teacher`` (the frozen global model's logits on ``data``); the engines clip that
        per-record gradient as they clip the cross-entropy's, so the event is the same.
        With ``config.update_kind == "gradients"`` the private gradient at the received
        weights is left in the parameters' ``.grad`` instead (:func:`dp_mean_gradient`)."""
        from secfl.client.distill import record_distillation_loss
        from secfl.client.trainer import LocalResult, make_optimizer

        self.ledger.charge_check([self.planned_event(round_index, attempt)])
        if config.distill is not None and teacher is None:
            raise PrivacyError("client.distill needs the teacher's logits on the records")
        if self._engine is None or self._engine_model is not model:
            loss = None if config.distill is None else record_distillation_loss(config.distill)
            self._engine, self._engine_model = PerSampleGradients(model, loss=loss), model
        sampling_stream = randomness.stream(
            "client.dp_sampling", round_index=round_index, attempt=attempt, party=self.party
        )
        noise_stream = randomness.stream(
            "client.dp_noise", round_index=round_index, attempt=attempt, party=self.party
        )
        x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        if config.update_kind == "gradients":
            result = dp_mean_gradient(
                model,
                x,
                y,
                self.settings,
                sampling_stream=sampling_stream,
                noise_stream=noise_stream,
                round_index=round_index,
                attempt=attempt,
                party=self.party,
                engine=self._engine,
            )
            if config.weight_decay > 0:  # the objective's data-free term, as SGD adds it
                with torch.no_grad():
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.add_(p, alpha=config.weight_decay)
        else:
            result = train_dp_sgd(
                model,
                x,
                y,
                make_optimizer(model, config),
                self.settings,
                sampling_stream=sampling_stream,
                noise_stream=noise_stream,
                round_index=round_index,
                attempt=attempt,
                party=self.party,
                engine=self._engine,
                teacher=teacher if config.distill is not None else None,
            )
        self.ledger.add(result.event)
        return LocalResult(num_samples=len(data), mean_loss=result.mean_loss, steps=result.steps)


class PrivacyRecorder:
    """The run's ledger (simulation): budget checks, events, ``ledger.json``, checkpoint state."""

    def __init__(
        self, config: RunConfig, client_sizes: list[int], folder: Path, events: EventLog
    ) -> None:
        self.config = config
        self.folder = folder
        self.events = events
        privacy = config.privacy
        self.clients: dict[int, ClientPrivacy] = {}
        if privacy.sample_level is not None:
            settings = sample_level_settings(config)
            for client_id, n in enumerate(client_sizes):
                check_delta(
                    privacy.sample_level.delta,
                    n,
                    key="privacy.sample_level.delta",
                    unit=f"records (client {client_id})",
                )
                ledger = PartyLedger(
                    party=f"client:{client_id}",
                    level="sample",
                    delta=privacy.sample_level.delta,
                    accountant_name=privacy.accountant.sample_level,
                    n=n,
                    budget=privacy.budget.client_epsilon,
                    budget_key="privacy.budget.client_epsilon",
                )
                self.clients[client_id] = ClientPrivacy(client_id, ledger, settings)
        #: The user-level mechanism (central or distributed); set by :meth:`attach_mechanism`
        #: once the model size is known (the Skellam sensitivity depends on it).
        self.mechanism: UserLevelMechanism | None = None
        self.global_ledger: PartyLedger | None = None
        if privacy.user_level is not None:
            check_delta(
                privacy.user_level.delta,
                config.data.num_clients,
                key="privacy.user_level.delta",
                unit="clients",
            )
            self.global_ledger = PartyLedger(
                party="server",
                level="user",
                delta=privacy.user_level.delta,
                accountant_name=privacy.accountant.user_level,
                n=config.data.num_clients,
                budget=privacy.budget.global_epsilon,
                budget_key="privacy.budget.global_epsilon",
            )
        self.rounds: list[dict[str, Any]] = []
        self.stopped: str | None = None

    def attach_mechanism(self, mechanism: UserLevelMechanism | None) -> None:
        """The user-level mechanism whose planned events the budget check uses."""
        if (mechanism is None) != (self.config.privacy.user_level is None):
            raise PrivacyError("the user-level mechanism must match privacy.user_level")
        self.mechanism = mechanism

    @property
    def enabled(self) -> bool:
        return bool(self.clients) or self.global_ledger is not None

    def for_client(self, client_id: int) -> ClientPrivacy | None:
        return self.clients.get(client_id)

    def prepare_model(
        self, factory: Callable[[], nn.Module], *, notify: bool = False
    ) -> Callable[[], nn.Module]:
        """``factory`` checked by Opacus' validator under sample-level DP (or fixed, with a
        logged notice when ``notify``)."""
        sample = self.config.privacy.sample_level
        if sample is None:
            return factory
        fix = sample.incompatible_layers == "fix"
        _, notices = validate_model(factory(), fix=fix)
        if notify:
            for notice in notices:
                self.events.emit("privacy_notice", message=notice)

        def checked() -> nn.Module:
            return validate_model(factory(), fix=fix)[0]

        return checked

    def check_round(self, round_index: int) -> str | None:
        """Why round ``round_index`` must not start (a budget would be exceeded), or None."""
        reason: str | None = None
        if self.global_ledger is not None:
            if self.mechanism is None:  # fail closed: no plan, no round
                raise PrivacyError("user-level DP is configured but no mechanism is attached")
            try:
                self.global_ledger.charge_check([self.mechanism.planned_event(round_index)])
            except BudgetExhausted as exc:
                reason, budget = str(exc), "privacy.budget.global_epsilon"
        client_budget = self.config.privacy.budget.client_epsilon
        if (
            reason is None
            and self.clients
            and client_budget is not None
            and all(c.exhausted(round_index) for c in self.clients.values())
        ):
            budget = "privacy.budget.client_epsilon"
            reason = (
                f"privacy budget privacy.budget.client_epsilon={client_budget} is spent for "
                "every client; no client may train"
            )
        if reason is not None:
            self.stopped = reason
            self.events.emit(
                "privacy_budget_exhausted", round=round_index, budget=budget, message=reason
            )
            self.write()
        return reason

    def record_round(self, outcome: RoundOutcome) -> None:
        """Charge the round's events, write ``ledger.json`` and the event log."""
        row: dict[str, Any] = {"round": outcome.round, "attempt": outcome.attempt}
        if self.global_ledger is not None:
            reported = outcome.aggregate.dp_events if outcome.aggregate is not None else ()
            for event in reported:
                self.global_ledger.add(event)
                self._emit(event)
            summary = self.global_ledger.summary()
            row["user_level"] = {
                "events": [e.to_dict() for e in reported],
                "epsilon": summary["epsilon"],
                "epsilon_amplified_model_observers": summary["epsilon_amplified_model_observers"],
            }
        if self.clients:
            clients: dict[str, Any] = {}
            for client_id, client in self.clients.items():
                new = [
                    e
                    for e in client.ledger.events
                    if (e.round, e.attempt % STATS_ATTEMPT_OFFSET)
                    == (outcome.round, outcome.attempt)
                ]
                if not new:
                    continue
                for event in new:
                    self._emit(event)
                clients[str(client_id)] = {
                    "events": [e.to_dict() for e in new],
                    "epsilon": client.ledger.epsilon(),
                }
            row["clients"] = clients
        self.rounds.append(row)
        self.write()

    def _emit(self, event: DpEvent) -> None:
        self.events.emit("dp_event", **event.to_dict())

    def document(self) -> dict[str, Any]:
        privacy = self.config.privacy
        cumulative: dict[str, Any] = {}
        if self.global_ledger is not None:
            cumulative["user_level"] = self.global_ledger.summary()
        if self.clients:
            cumulative["clients"] = {
                str(i): {**c.ledger.summary(), "noise_multiplier": c.settings.noise_multiplier}
                for i, c in self.clients.items()
            }
        return {
            "format": LEDGER_FORMAT,
            "config": privacy.model_dump(mode="json"),
            "randomness": self.config.security.randomness,
            "rounds": self.rounds,
            "cumulative": cumulative,
            "stopped": self.stopped,
            "notes": [
                "sample level: per client, delta checked against the client's record count",
                "user level: epsilon against the server and participants carries no sampling "
                "amplification; the amplified figure is valid only for observers of the "
                "released model",
            ],
            "user_level_mechanism": self._mechanism_description(),
        }

    def _mechanism_description(self) -> dict[str, Any] | None:
        from secfl.privacy.distributed import DistributedNoise

        mechanism = self.mechanism
        if mechanism is None:
            return None
        if isinstance(mechanism, DistributedNoise):
            return {
                "noise": "distributed",
                "kind": mechanism.kind,
                "noise_multiplier": mechanism.noise_multiplier,
                "sensitivity": mechanism.sensitivity,
                "l1_sensitivity": mechanism.l1_sensitivity,
                "scale": mechanism.scale,
                "colluding_clients": mechanism.colluding,
                "denominator": mechanism.denominator,
                "note": "each client adds variance (sigma * sensitivity)^2 / (t - colluding) "
                "for a sum of threshold t; each round's event records the noise of the "
                "(contributors - colluding) honest shares actually in the sum",
            }
        return {"noise": "central", "kind": "gaussian", "added_by": "server (trusted)"}

    def write(self) -> None:
        from secfl.record.rundir import write_json_atomic

        write_json_atomic(self.folder / LEDGER_NAME, self.document())

    def state(self) -> dict[str, Any]:
        return {
            "clients": {str(i): c.ledger.state() for i, c in self.clients.items()},
            "global": self.global_ledger.state() if self.global_ledger is not None else [],
            "rounds": self.rounds,
        }

    def load_state(self, raw: dict[str, Any] | None) -> None:
        if not raw:
            return
        for key, events in raw.get("clients", {}).items():
            self.clients[int(key)].ledger.load_state(events)
        if self.global_ledger is not None:
            self.global_ledger.load_state(raw.get("global", []))
        self.rounds = list(raw.get("rounds", []))
