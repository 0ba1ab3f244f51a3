"""The client role: holds its data and model, answers the server's messages as bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from secfl.client.trainer import LocalResult, train_locally
from secfl.config import ClientConfig
from secfl.data.datasets import Dataset
from secfl.encode.flatten import flatten_parameters, load_parameters, model_hash
from secfl.errors import MessageError, SecflError
from secfl.messages import ClientFailure, FitIns, FitRes
from secfl.randomness import Randomness
from secfl.wire import WireMessage, decode_message

if TYPE_CHECKING:
    from secfl.privacy.federation import ClientPrivacy

MessageHandler = Callable[[Any], WireMessage | None]


class ClientApp:
    """One client. ``handle`` takes request bytes and returns reply bytes; protection
    protocols register handlers for their own message types with :meth:`register`."""

    def __init__(
        self,
        client_id: int,
        data: Dataset,
        *,
        model_factory: Callable[[], nn.Module],
        config: ClientConfig,
        randomness: Randomness,
        privacy: ClientPrivacy | None = None,
    ) -> None:
        self.client_id = client_id
        #: Sample-level DP-SGD, ledger and budget (``privacy.sample_level``), or None.
        self.privacy = privacy
        self.data = data
        self.config = config
        self.randomness = randomness
        self._model = model_factory()
        self._handlers: dict[type[WireMessage], MessageHandler] = {FitIns: self._on_fit}

    @property
    def party(self) -> str:
        return f"client:{self.client_id}"

    def register(self, message_type: type[WireMessage], handler: MessageHandler) -> None:
        self._handlers[message_type] = handler

    def handle(self, payload: bytes) -> bytes | None:
        round_index = 0
        try:
            message = decode_message(payload)
            round_index = int(getattr(message, "round", 0))
            handler = self._handlers.get(type(message))
            if handler is None:
                raise MessageError(
                    f"client {self.client_id} has no handler for {type(message).__name__}"
                )
            reply = handler(message)
        except SecflError as exc:
            reply = ClientFailure(round=round_index, client_id=self.client_id, reason=str(exc))
        return None if reply is None else reply.to_bytes()

    def train(self, ins: FitIns) -> tuple[np.ndarray, LocalResult]:
        """Train from the broadcast model; returns (weights delta, local result)."""
        if model_hash(ins.weights) != ins.model_hash:
            raise MessageError(
                f"client {self.client_id}: broadcast weights do not match their model_hash"
            )
        start = np.array(ins.weights, dtype=np.float32)
        load_parameters(self._model, start)
        if self.privacy is not None:
            result = self.privacy.train(
                self._model,
                self.data,
                self.config,
                self.randomness,
                round_index=ins.round,
                attempt=ins.attempt,
            )
            return flatten_parameters(self._model) - start, result
        stream = self.randomness.stream(
            "client.batch_order", round_index=ins.round, attempt=ins.attempt, party=self.party
        )
        result = train_locally(self._model, self.data, self.config, stream)
        return flatten_parameters(self._model) - start, result

    def _on_fit(self, ins: FitIns) -> FitRes:
        delta, result = self.train(ins)
        return FitRes(
            round=ins.round,
            attempt=ins.attempt,
            client_id=self.client_id,
            model_hash=ins.model_hash,
            num_samples=result.num_samples,
            train_loss=result.mean_loss,
            update=delta,
        )
