"""Secure collection of activation moments through the run's own protection mode.

A statistics round is a second run of the configured protocol (plaintext, SecAgg masking or
CKKS) over the round's participants, whose clients answer with their noised moment sums
(:func:`secfl.refine.moments.noised_moment_sum`) instead of a model update. It runs on
separate client-side protocol state (a *moment facet* of every client: same records, same
identity, its own handlers) and as attempt ``STATS_ATTEMPT_OFFSET + a`` of the round, so its
keys, masks, noise streams and share-release logs never coincide with the training round's.
It has no trust vote and no user-level noise: a configuration with ``privacy.user_level`` is
refused by the guard, because the user-level ledger does not cover this release.

Each client charges one Gaussian event (noise multiplier ``moments.noise_multiplier``,
sensitivity ``moments.clip``, no sampling) to its record-level ledger before it answers; an
exhausted budget makes it refuse, which the protocol treats as a dropout. The client sends
``S / (n * clip) * clip_range / 2`` with weight ``n`` (its record count), so the released
weighted mean is the population sum of the clipped vectors (moments and count coordinate)
over a common scale, plus noise; the server divides the moments by the count coordinate
(:meth:`ActivationMoments.from_release`), where the scale cancels. Protocol vectors are
sized like the model, so the release fills the first entries of a model-sized vector and
the rest are zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from secfl.audit.events import EventLog, register_event
from secfl.client.app import ClientApp
from secfl.client.trainer import LocalResult
from secfl.config import RunConfig
from secfl.encode.flatten import load_parameters, model_hash
from secfl.errors import SecflError
from secfl.messages import FitIns
from secfl.privacy.events import STATS_ATTEMPT_OFFSET, DpEvent
from secfl.randomness import Randomness
from secfl.refine.moments import (
    ActivationMoments,
    moment_dimension,
    noised_moment_sum,
    record_moment_vectors,
)
from secfl.server.protection import RoundContext
from secfl.transport.inprocess import InProcessTransport

if TYPE_CHECKING:
    from secfl.privacy.federation import ClientPrivacy, PrivacyRecorder


register_event("moments_collected", ("round", "attempt", "contributors", "dimension"))
register_event("moments_skipped", ("round", "attempt", "reason"))


def encoding_range(config: RunConfig) -> float:
    protection = config.aggregation.protection
    if protection == "masking":
        return float(config.aggregation.masking.clip_range)
    if protection == "ckks":
        return float(config.aggregation.ckks.clip_range)
    return 1.0


@dataclass(frozen=True, eq=False)
class ReleasedMoments:
    """Released moments, the broadcast weights they were computed under (their hidden
    layers describe that model only), the round they were collected in, and the release
    as aggregated (moments and count coordinate: what a checkpoint keeps)."""

    moments: ActivationMoments
    weights: np.ndarray
    round: int
    vector: np.ndarray


class MomentFacet(ClientApp):
    """A client's statistics side: answers a round with its noised moment sum."""

    def __init__(
        self,
        client: ClientApp,
        *,
        model_factory: Callable[[], nn.Module],
        privacy: ClientPrivacy | None,
        clip: float,
        noise_multiplier: float,
        scale: float,
    ) -> None:
        super().__init__(
            client.client_id,
            client.data,
            model_factory=model_factory,
            config=client.config,
            randomness=client.randomness,
            privacy=privacy,
        )
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.scale = scale

    def train(self, ins: FitIns) -> tuple[np.ndarray, LocalResult]:
        if model_hash(ins.weights) != ins.model_hash:
            raise SecflError(
                f"client {self.client_id}: broadcast weights do not match their model_hash"
            )
        load_parameters(self._model, np.array(ins.weights, dtype=np.float32))
        if self.privacy is not None:
            event = DpEvent(
                mechanism="subsampled_gaussian",
                noise_multiplier=self.noise_multiplier,
                sampling_rate=1.0,
                steps=1,
                sensitivity=self.clip,
                level="sample",
                round=ins.round,
                party=self.party,
                attempt=ins.attempt,
                amplification="none",
            )
            self.privacy.ledger.charge_check([event])
            self.privacy.ledger.add(event)
        total = noised_moment_sum(
            self._model,
            self.data.x,
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            stream=self.randomness.stream(
                "refine.moments_noise",
                round_index=ins.round,
                attempt=ins.attempt,
                party=self.party,
            ),
        )
        n = len(self.data)
        size = np.asarray(ins.weights).size
        if total.size > size:
            raise SecflError(
                f"the moment vector ({total.size} values) is longer than the model "
                f"({size} parameters), which sizes the protocol's vectors"
            )
        # the protocols size every vector like the model: moments first, zeros after
        value = np.zeros(size, dtype=np.float32)
        value[: total.size] = total / (n * self.clip) * self.scale
        return value, LocalResult(num_samples=n, mean_loss=0.0, steps=0)


class MomentCollector:
    """``ServerRefiner``'s moment source: runs a statistics round every ``moments.every``
    rounds and keeps the last released moments in between (and across a checkpoint)."""

    def __init__(
        self,
        config: RunConfig,
        clients: list[ClientApp],
        model_factory: Callable[[], nn.Module],
        input_shape: tuple[int, ...],
        randomness: Randomness,
        events: EventLog,
        privacy: PrivacyRecorder,
    ) -> None:
        from secfl.runner import make_protection

        inversion = None if config.refine is None else config.refine.server_inversion
        moments = None if inversion is None else inversion.moments
        if moments is None:
            raise SecflError("MomentCollector needs refine.server_inversion.moments")
        self.every = moments.every
        self._clip = moments.clip
        self._events = events
        self._randomness = randomness
        template = model_factory()
        self._dimension = moment_dimension(template, input_shape)
        _, self._sizes = record_moment_vectors(template, np.zeros((1, *input_shape), np.float32))
        self._scale = encoding_range(config) / 2.0
        facets: list[ClientApp] = [
            MomentFacet(
                client,
                model_factory=model_factory,
                privacy=privacy.for_client(client.client_id),
                clip=moments.clip,
                noise_multiplier=moments.noise_multiplier,
                scale=self._scale,
            )
            for client in clients
        ]
        self._protection = make_protection(config, facets, randomness, events)
        self._transport = InProcessTransport({f.client_id: f.handle for f in facets})
        #: the last statistics round's release
        self.released: ReleasedMoments | None = None

    def __call__(
        self, round_index: int, attempt: int, before: np.ndarray, participants: list[int]
    ) -> ReleasedMoments | None:
        last = self.released
        if last is None or round_index - last.round >= self.every:
            self._collect(round_index, attempt, before, participants)
        return self.released

    def _collect(
        self, round_index: int, attempt: int, before: np.ndarray, participants: list[int]
    ) -> None:
        weights = np.asarray(before, dtype=np.float32)
        stats_attempt = STATS_ATTEMPT_OFFSET + attempt
        ctx = RoundContext(
            round=round_index,
            attempt=stats_attempt,
            broadcast=FitIns(
                round=round_index,
                attempt=stats_attempt,
                model_hash=model_hash(weights),
                weights=weights,
            ),
            model_size=weights.size,
            randomness=self._randomness,
            events=self._events,
        )

        def skipped(reason: str) -> None:
            self._events.emit(
                "moments_skipped", round=round_index, attempt=stats_attempt, reason=reason
            )

        try:
            result = self._protection.aggregate(self._transport, list(participants), ctx)
        except SecflError as exc:
            return skipped(str(exc))
        if result is None:
            return skipped("no statistics could be revealed (too few contributors)")
        release = np.asarray(result.mean_update[: self._dimension], dtype=np.float64)
        moments = ActivationMoments.from_release(release, self._sizes, clip=self._clip)
        if moments is None:
            return skipped("the released record count is not positive (noise exceeds the records)")
        self.released = ReleasedMoments(moments, weights.copy(), round_index, release)
        self._events.emit(
            "moments_collected",
            round=round_index,
            attempt=stats_attempt,
            contributors=list(result.survivors),
            dimension=self._dimension,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        if self.released is None:
            return {}
        return {
            "refine.moments.vector": self.released.vector,
            "refine.moments.round": np.array([self.released.round]),
            "refine.moments.weights": self.released.weights,
        }

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.released = None
        keys = ("refine.moments.vector", "refine.moments.round", "refine.moments.weights")
        # moments without the model they describe (or of an older layout) cannot be
        # matched: the next refined round collects afresh
        if not all(k in arrays for k in keys) or arrays[keys[0]].size != self._dimension:
            return
        vector = np.array(arrays["refine.moments.vector"], dtype=np.float64)
        moments = ActivationMoments.from_release(vector, self._sizes, clip=self._clip)
        if moments is not None:
            self.released = ReleasedMoments(
                moments,
                np.array(arrays["refine.moments.weights"], dtype=np.float32),
                int(np.asarray(arrays["refine.moments.round"])[0]),
                vector,
            )
