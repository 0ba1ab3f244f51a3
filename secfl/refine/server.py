"""The server's refine stage (DESIGN 2, step 9): shared-set tuning and inversion-based
distillation of each round's aggregate.

Order within a round: the teachers the mode shows (:mod:`secfl.refine.guard`) are inverted
into a synthetic set, which distils them into the aggregate; then the aggregate is fine-tuned
on the public shared set. The synthetic set, the released activation moments and the
previous global models are state that survives a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from secfl.config import RefineConfig, RefineServerInversionConfig, RunConfig
from secfl.data.datasets import Dataset
from secfl.encode.flatten import load_parameters
from secfl.randomness import Randomness
from secfl.refine.guard import TeacherSource, teacher_source
from secfl.refine.inversion import InversionSettings, SyntheticSet, invert
from secfl.refine.moments import ActivationMoments
from secfl.refine.tune import distill, finetune_on_shared

if TYPE_CHECKING:
    from secfl.refine.collect import MomentCollector, ReleasedMoments


@dataclass(frozen=True, eq=False)
class RefineOutcome:
    weights: np.ndarray
    synthetic: SyntheticSet | None
    teacher: TeacherSource | None
    teachers: int
    seconds: float


class ServerRefiner:
    """Refines each round's aggregate; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        *,
        model_factory: Callable[[], nn.Module],
        shared: Dataset,
        input_shape: tuple[int, ...],
        num_classes: int,
        randomness: Randomness,
        moments: MomentCollector | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        refine = config.refine
        if refine is None:
            raise ValueError("ServerRefiner needs a refine block")
        self.config: RefineConfig = refine
        self.source = teacher_source(config)
        self._factory = model_factory
        self._shared = shared
        self._input_shape = input_shape
        self._num_classes = num_classes
        self._randomness = randomness
        self._moments = moments
        self._clock = clock
        self._model = model_factory()
        self.history: list[np.ndarray] = []
        self.synthetic: SyntheticSet | None = None

    def _models(self, weight_list: list[np.ndarray]) -> list[nn.Module]:
        models = []
        for w in weight_list:
            m = self._factory()
            load_parameters(m, w)
            models.append(m)
        return models

    def _teachers(
        self, before: np.ndarray, aggregate: np.ndarray, revealed: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        prefix = {"clients": "client:", "cohorts": "cohort:"}.get(self.source or "")
        if prefix is not None:
            shown = [before + u for key, u in sorted(revealed.items()) if key.startswith(prefix)]
            # the aggregate and earlier globals keep what the round's participants lack
            # (under label skew a class no participant holds would otherwise be distilled
            # from teachers that never saw it)
            return [*shown, aggregate, *self.history]
        return [aggregate, *self.history]

    def refine(
        self,
        round_index: int,
        attempt: int,
        *,
        before: np.ndarray,
        aggregate: np.ndarray,
        revealed: Mapping[str, np.ndarray],
        participants: list[int],
    ) -> RefineOutcome:
        started = self._clock()
        weights = np.array(aggregate, dtype=np.float32)
        synthetic = None
        teachers = 0
        inversion = self.config.server_inversion
        if round_index >= self.config.start_round:
            if inversion is not None:
                teacher_weights = self._teachers(before, weights, revealed)
                teachers = len(teacher_weights)
                moments = None
                if inversion.moments is not None and self._moments is not None:
                    moments = self._moments(round_index, attempt, before, participants)
                synthetic = self._invert(
                    inversion, teacher_weights, round_index, attempt, moments, weights
                )
                weights = distill(
                    self._model,
                    weights,
                    self._models(teacher_weights),
                    synthetic.x,
                    steps=inversion.distill_steps,
                    lr=inversion.distill_lr,
                    batch_size=inversion.batch_size,
                    temperature=inversion.temperature,
                    prox=inversion.prox,
                    optimizer=inversion.distill_optimizer,
                    stream=self._randomness.stream(
                        "refine.distill_order", round_index=round_index, attempt=attempt
                    ),
                )
                self.synthetic = synthetic
            shared = self.config.shared
            if shared is not None and len(self._shared) > 0:
                weights = finetune_on_shared(
                    self._model,
                    weights,
                    self._shared.x,
                    self._shared.y,
                    steps=shared.steps,
                    lr=shared.lr,
                    batch_size=shared.batch_size,
                    prox=shared.prox,
                    stream=self._randomness.stream(
                        "refine.shared_order", round_index=round_index, attempt=attempt
                    ),
                )
        if inversion is not None and inversion.history > 0:
            self.history = [np.array(aggregate, dtype=np.float32), *self.history][
                : inversion.history
            ]
        return RefineOutcome(
            weights=weights,
            synthetic=synthetic,
            teacher=self.source if inversion is not None else None,
            teachers=teachers,
            seconds=self._clock() - started,
        )

    def _invert(
        self,
        inversion: RefineServerInversionConfig,
        teacher_weights: list[np.ndarray],
        round_index: int,
        attempt: int,
        released: ReleasedMoments | None,
        aggregate: np.ndarray,
    ) -> SyntheticSet:
        student = self._factory()
        load_parameters(student, aggregate)
        moments: ActivationMoments | None = None
        moments_model: nn.Module | None = None
        if released is not None:
            # the hidden-layer moments are matched on the model they were computed under
            moments = released.moments
            moments_model = self._factory()
            load_parameters(moments_model, released.weights)
        return invert(
            self._models(teacher_weights),
            input_shape=self._input_shape,
            classes=range(self._num_classes),
            settings=InversionSettings.of(inversion, shared_tuning=self.config.shared is not None),
            stream=self._randomness.stream(
                "refine.inversion_init", round_index=round_index, attempt=attempt
            ),
            moments=moments,
            moments_model=moments_model,
            student=student if inversion.adversarial > 0 else None,
        )

    # ------------------------------------------------------------------ checkpoint

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"refine.history.{i}": w for i, w in enumerate(self.history)}
        if self._moments is not None:
            out.update(self._moments.arrays())
        if self.synthetic is not None:
            out["refine.synthetic.x"] = self.synthetic.x
            out["refine.synthetic.y"] = self.synthetic.y
        return out

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        if self._moments is not None:
            self._moments.load_state(arrays)
        count = sum(1 for k in arrays if k.startswith("refine.history."))
        self.history = [np.array(arrays[f"refine.history.{i}"]) for i in range(count)]
        if "refine.synthetic.x" in arrays:
            self.synthetic = SyntheticSet(
                np.array(arrays["refine.synthetic.x"]), np.array(arrays["refine.synthetic.y"])
            )
