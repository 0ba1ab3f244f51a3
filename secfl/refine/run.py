"""Assembling refinement into a run, and recording what it did.

:func:`build_refiner` equips the clients for client-side inversion, sets up the moment
collection (:mod:`secfl.refine.collect`) and returns the server's refiner, or None when the
run has no ``refine`` block. :func:`record_refinement` writes the round's refinement to the
event log and the metrics row, including the memorisation check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch import nn

from secfl.audit.events import EventLog, register_event
from secfl.config import RunConfig
from secfl.data.federated import FederatedData
from secfl.randomness import Randomness
from secfl.refine.client import ClientAugmenter
from secfl.refine.memorisation import MemorisationReport
from secfl.refine.server import RefineOutcome, ServerRefiner

if TYPE_CHECKING:
    from secfl.client.app import ClientApp
    from secfl.privacy.federation import PrivacyRecorder
    from secfl.server.loop import RoundOutcome

register_event("refined", ("round", "attempt", "teacher", "teachers", "synthetic", "seconds"))
register_event("memorisation_check", ("round", "attempt", "ratio", "regression"))


class _Measures(Protocol):
    def memorisation(self, synthetic: np.ndarray) -> MemorisationReport: ...


def build_refiner(
    config: RunConfig,
    clients: list[ClientApp],
    data: FederatedData,
    model_factory: Callable[[], nn.Module],
    randomness: Randomness,
    events: EventLog,
    privacy: PrivacyRecorder,
) -> ServerRefiner | None:
    refine = config.refine
    if refine is None:
        return None
    if refine.client_inversion is not None:
        for client in clients:
            client.augment = ClientAugmenter(
                client.data,
                refine.client_inversion,
                model_factory=model_factory,
                input_shape=data.input_shape,
                randomness=randomness,
                party=client.party,
                shared_tuning=refine.shared is not None,
            )
    moments = None
    inversion = refine.server_inversion
    if inversion is not None and inversion.moments is not None:
        from secfl.refine.collect import MomentCollector

        moments = MomentCollector(
            config, clients, model_factory, data.input_shape, randomness, events, privacy
        )
    return ServerRefiner(
        config,
        model_factory=model_factory,
        shared=data.shared,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        randomness=randomness,
        moments=moments,
    )


def record_refinement(
    refined: RefineOutcome, experimenter: _Measures, outcome: RoundOutcome, events: EventLog
) -> dict[str, Any]:
    """The metrics row's ``refine`` entry; emits ``refined`` and ``memorisation_check``."""
    where = {"round": outcome.round, "attempt": outcome.attempt}
    row: dict[str, Any] = {"seconds": refined.seconds}
    synthetic = 0 if refined.synthetic is None else len(refined.synthetic)
    events.emit(
        "refined",
        **where,
        teacher=refined.teacher,
        teachers=refined.teachers,
        synthetic=synthetic,
        seconds=refined.seconds,
    )
    if refined.synthetic is not None:
        report = experimenter.memorisation(refined.synthetic.x)
        row["memorisation"] = report.to_dict()
        events.emit("memorisation_check", **where, **report.to_dict())
        if report.regression:
            events.emit(
                "warning",
                message=(
                    f"round {outcome.round}: synthetic samples are closer to training records "
                    f"than test records are (ratio {report.ratio:.3f} < 1): a privacy "
                    "regression of the inversion"
                ),
            )
    return row
