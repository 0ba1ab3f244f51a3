"""The client role: holds its data and model, answers the server's messages as bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from secfl.audit.messages import ReceiptAck, ServerReceipt
from secfl.client.distill import teacher_logits
from secfl.client.trainer import LocalResult, flatten_gradients, local_gradient, train_locally
from secfl.config import ClientConfig
from secfl.data.datasets import Dataset
from secfl.encode.flatten import flatten_parameters, load_parameters, model_hash
from secfl.errors import MessageError, SecflError
from secfl.messages import ClientFailure, FitIns, FitRes
from secfl.randomness import Randomness
from secfl.wire import WireMessage, decode_message

if TYPE_CHECKING:
    from secfl.audit.receipts import ReceiptBook
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
        receipts: ReceiptBook | None = None,
    ) -> None:
        self.client_id = client_id
        #: The audit receipts (server key and run id given out of band), or None.
        self.receipts = receipts
        #: Sample-level DP-SGD, ledger and budget (``privacy.sample_level``), or None.
        self.privacy = privacy
        self.data = data
        self.config = config
        self.randomness = randomness
        self._model = model_factory()
        #: Client-side refinement: returns the records to train on this round (the client's
        #: own plus synthetic ones inverted from the broadcast model), or None.
        self.augment: Callable[[FitIns], Dataset] | None = None
        self._handlers: dict[type[WireMessage], MessageHandler] = {FitIns: self._on_fit}
        if receipts is not None:
            self.register(ServerReceipt, self._on_receipt)

    @property
    def party(self) -> str:
        return f"client:{self.client_id}"

    def register(self, message_type: type[WireMessage], handler: MessageHandler) -> None:
        self._handlers[message_type] = handler

    def handle(self, payload: bytes) -> bytes | None:
        round_index = 0
        message: WireMessage | None = None
        try:
            message = decode_message(payload)
            round_index = int(getattr(message, "round", 0))
            if self.receipts is not None:
                self.receipts.check_broadcast(message)
            handler = self._handlers.get(type(message))
            if handler is None:
                raise MessageError(
                    f"client {self.client_id} has no handler for {type(message).__name__}"
                )
            reply = handler(message)
        except SecflError as exc:
            reply = ClientFailure(round=round_index, client_id=self.client_id, reason=str(exc))
        out = None if reply is None else reply.to_bytes()
        if self.receipts is not None:  # the client's own transcript, for its receipts
            self.receipts.witness(message, payload, out)
        return out

    def train(self, ins: FitIns) -> tuple[np.ndarray, LocalResult]:
        """Train from the broadcast model; returns (update, local result).

        The update is, by ``client.update_kind``, the trained weights minus the broadcast
        ones, or the mean gradient of the local objective at the broadcast weights (the
        server steps against it). With ``client.distill`` a frozen copy of the broadcast
        model is the teacher of the local training (US20210182661A1, claim 2)."""
        if model_hash(ins.weights) != ins.model_hash:
            raise MessageError(
                f"client {self.client_id}: broadcast weights do not match their model_hash"
            )
        start = np.array(ins.weights, dtype=np.float32)
        data = self.data if self.augment is None else self.augment(ins)
        load_parameters(self._model, start)
        gradients = self.config.update_kind == "gradients"
        teacher = None
        if self.config.distill is not None:
            teacher = teacher_logits(self._model, torch.from_numpy(data.x))
        if self.privacy is not None:
            result = self.privacy.train(
                self._model,
                data,
                self.config,
                self.randomness,
                round_index=ins.round,
                attempt=ins.attempt,
                teacher=teacher,
            )
        elif gradients:
            result = local_gradient(self._model, data, self.config)
        else:
            stream = self.randomness.stream(
                "client.batch_order", round_index=ins.round, attempt=ins.attempt, party=self.party
            )
            result = train_locally(self._model, data, self.config, stream, teacher=teacher)
        if data is not self.data:
            # the weight of an update is the client's own record count, never the synthetic
            result = replace(result, num_samples=len(self.data))
        if gradients:
            return flatten_gradients(self._model), result
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

    def _on_receipt(self, receipt: ServerReceipt) -> ReceiptAck:
        """Check the server's signed receipt against this client's own transcript."""
        if self.receipts is None:
            raise MessageError(f"client {self.client_id} was given no server audit key")
        return self.receipts.on_receipt(receipt)
