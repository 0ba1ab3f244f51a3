"""What the server observes: the real protection modes, driven with chosen client data.

A :class:`ProbeFederation` builds the configuration's clients (with the client's real
training path: plain SGD or DP-SGD with the configuration's calibrated noise), its real
protection mode (``secfl.runner.make_protection``: plaintext, SecAgg masking with Skellam
shares, or CKKS with the decryptor's policy) and an in-process transport, and gives the
clients the records an experiment chooses (one record each for FedSGD with batch 1, eight
for batch 8, ...). Each round it records what the server really receives: every reply's bytes
through a :class:`RecordingTransport`, every plaintext update in mode ``none`` (decoded from
the :class:`~secfl.messages.FitRes` bytes, exactly what the server decodes), and the values
the protection releases (the aggregate, and the sub-cohort means where the mode reveals them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from secfl.audit.events import EventLog
from secfl.client.app import ClientApp
from secfl.config import ClientConfig, RunConfig
from secfl.data.datasets import Dataset
from secfl.data.federated import FederatedData
from secfl.encode.flatten import flatten_parameters, load_parameters, model_hash
from secfl.errors import MessageError
from secfl.messages import FitIns, FitRes
from secfl.models import build_model
from secfl.privacy.distributed import user_level_mechanism
from secfl.privacy.federation import PrivacyRecorder
from secfl.randomness import Randomness
from secfl.server.protection import Protection, RoundContext
from secfl.transport.base import Transport
from secfl.transport.inprocess import InProcessTransport
from secfl.wire import decode_message


class RecordingTransport:
    """Passes requests on unchanged and keeps every reply the server receives."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.replies: list[dict[int, bytes | None]] = []

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies = self.inner.exchange(requests)
        self.replies.append(dict(replies))
        return replies

    @property
    def received_bytes(self) -> int:
        return sum(len(r) for stage in self.replies for r in stage.values() if r is not None)

    def plaintext_updates(self) -> dict[int, FitRes]:
        """Every :class:`FitRes` among the replies (mode ``none``: the updates in clear)."""
        found: dict[int, FitRes] = {}
        for stage in self.replies:
            for client_id, payload in stage.items():
                if payload is None:
                    continue
                try:
                    message = decode_message(payload)
                except MessageError:
                    continue
                if isinstance(message, FitRes):
                    found[client_id] = message
        return found


@dataclass(frozen=True, eq=False)
class ServerView:
    """What the server holds after one round of a probe."""

    round: int
    broadcast: np.ndarray
    #: Mode ``none``: every participant's update, decoded from the bytes it sent.
    individual: dict[int, np.ndarray]
    #: The weighted mean update the protection released (None: the round revealed nothing).
    released: np.ndarray | None
    total_weight: float
    survivors: tuple[int, ...]
    #: Further released means (``cohort:<j>`` sub-cohort means under masking with trust).
    cohorts: dict[str, np.ndarray] = field(default_factory=dict)
    #: Bytes of every reply the server received in the round.
    received_bytes: int = 0


class ProbeFederation:
    """The configuration's clients and protection mode, over records the caller chooses.

    ``client_data[i]`` is client ``i``'s dataset; ``client_config`` replaces the
    configuration's local-training settings for plain clients (DP-SGD clients keep the
    configuration's calibrated settings: the noise multiplier is what the run would use).
    """

    def __init__(
        self,
        config: RunConfig,
        client_data: Sequence[Dataset],
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        folder: Path,
        client_config: ClientConfig | None = None,
        randomness: Randomness | None = None,
    ) -> None:
        self.config = config
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.randomness = randomness or Randomness(config.security.randomness, config.seed)
        self.events = EventLog(folder / "events.jsonl")
        self.privacy = PrivacyRecorder(config, [len(d) for d in client_data], folder, self.events)

        def factory() -> nn.Module:
            return build_model(config.model, input_shape, num_classes)

        self.model_factory = self.privacy.prepare_model(factory)
        template = self.model_factory()
        self.model_size = int(flatten_parameters(template).size)
        user_level = user_level_mechanism(config, self.model_size)
        self.privacy.attach_mechanism(user_level)
        self.clients = [
            ClientApp(
                i,
                data,
                model_factory=self.model_factory,
                config=client_config or config.client,
                randomness=self.randomness,
                privacy=self.privacy.for_client(i),
            )
            for i, data in enumerate(client_data)
        ]
        from secfl.runner import make_protection

        self.protection: Protection = make_protection(
            config, self.clients, self.randomness, self.events, user_level=user_level
        )
        self.transport = InProcessTransport({c.client_id: c.handle for c in self.clients})

    def round(
        self,
        weights: np.ndarray,
        round_index: int,
        *,
        participants: Sequence[int] | None = None,
        transport: Transport | None = None,
    ) -> ServerView:
        """One round of the real protocol from global ``weights``; what the server saw."""
        weights = np.asarray(weights, dtype=np.float32)
        ids = (
            list(participants) if participants is not None else [c.client_id for c in self.clients]
        )
        recorder = RecordingTransport(transport or self.transport)
        ctx = RoundContext(
            round=round_index,
            attempt=0,
            broadcast=FitIns(
                round=round_index, attempt=0, model_hash=model_hash(weights), weights=weights
            ),
            model_size=self.model_size,
            randomness=self.randomness,
            events=self.events,
        )
        result = self.protection.aggregate(recorder, ids, ctx)
        individual = {cid: res.update for cid, res in recorder.plaintext_updates().items()}
        if result is None:
            return ServerView(round_index, weights, individual, None, 0.0, (), {},
                              recorder.received_bytes)  # fmt: skip
        revealed = getattr(result, "revealed", {}) or {}
        cohorts = {k: np.asarray(v) for k, v in revealed.items() if k.startswith("cohort:")}
        return ServerView(
            round=round_index,
            broadcast=weights,
            individual=individual,
            released=np.asarray(result.mean_update, dtype=np.float32),
            total_weight=float(result.total_weight),
            survivors=tuple(result.survivors),
            cohorts=cohorts,
            received_bytes=recorder.received_bytes,
        )

    def close(self) -> None:
        self.events.close()


def model_with(factory_model: nn.Module, weights: np.ndarray) -> nn.Module:
    """``factory_model`` loaded with ``weights`` (flat), in eval mode."""
    load_parameters(factory_model, np.asarray(weights, dtype=np.float32))
    factory_model.eval()
    return factory_model


def fedsgd_client_config(config: RunConfig, batch: int) -> ClientConfig:
    """One local step on ``batch`` records: the FedSGD probe's local training."""
    return config.client.model_copy(update={"epochs": 1, "batch_size": batch})


def initial_weights(config: RunConfig, data: FederatedData) -> np.ndarray:
    """The round-1 broadcast of the configuration (the runner's own initialisation)."""
    from secfl.runner import initial_model

    randomness = Randomness(config.security.randomness, config.seed)
    return flatten_parameters(initial_model(config, data, randomness))
