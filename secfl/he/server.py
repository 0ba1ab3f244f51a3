"""The server side of mode ``ckks``: collect signed ciphertexts, sum them with plaintext
integer weights (exact residue arithmetic on the signed bytes, no SEAL), and ask the
decryptor for the release.

The server holds only public contexts; it reaches the decryptor through a byte channel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from secfl.crypto import ckks
from secfl.crypto.sign import verify_signature
from secfl.errors import CkksError, DecryptorRefusal, MessageError, SignatureError
from secfl.he.decryptor import epoch_of_round, rounds_per_epoch
from secfl.he.messages import (
    UPDATE_SIGNATURE_CONTEXT,
    CkksFitIns,
    ContextReply,
    ContextRequest,
    EncryptedUpdate,
    Refusal,
    SumRelease,
    SumRequest,
    frame_blobs,
)
from secfl.he.trust import EncryptedTrust
from secfl.messages import ClientFailure
from secfl.privacy.events import DpEvent
from secfl.server.protection import AggregateResult, RoundContext, record_dropout
from secfl.transport.base import Transport
from secfl.wire import decode_message

if TYPE_CHECKING:
    from secfl.privacy.distributed import DistributedNoise
    from secfl.trust.defense import TrustModule

#: The server's channel to the decryptor: request bytes in, reply bytes out.
DecryptorChannel = Callable[[bytes], bytes]


class CkksProtection:
    """Mode ``ckks`` (server role)."""

    name = "ckks"

    def __init__(
        self,
        preset: ckks.CkksPreset,
        *,
        decryptor: DecryptorChannel,
        client_keys: Mapping[int, bytes],
        min_cohort: int,
        num_clients: int,
        query_budget: int,
        user_level: DistributedNoise | None = None,
        trust: TrustModule | None = None,
        clip_range: float = 1.0,
    ) -> None:
        self._preset = preset
        #: The trust module (``trust`` preset): flooded per-client scalars decide who is summed.
        self.trust = (
            None if trust is None else EncryptedTrust(trust, decryptor, clip_range=clip_range)
        )
        #: User-level DP: clients add Gaussian shares and send weight 1; fixed denominator.
        self._user_level = user_level
        self._decryptor = decryptor
        self._client_keys = dict(client_keys)
        self._min_cohort = min_cohort
        self._num_clients = num_clients
        self._query_budget = query_budget
        self._epoch: int | None = None
        self._client_context = b""
        self._public: ckks.PublicContext | None = None

    def _contexts(self, epoch: int) -> ckks.PublicContext:
        if self._epoch != epoch or self._public is None:
            client = self._ask_context(epoch, "client")
            server = self._ask_context(epoch, "server")
            self._public = ckks.PublicContext(self._preset, server)
            self._client_context = client
            self._epoch = epoch
        return self._public

    def _ask_context(self, epoch: int, audience: str) -> bytes:
        reply = decode_message(self._decryptor(ContextRequest(epoch, audience).to_bytes()))
        if not isinstance(reply, ContextReply) or reply.preset != self._preset.name:
            raise CkksError(f"decryptor did not return a {self._preset.name!r} context: {reply}")
        return reply.context

    def _check(
        self,
        raw: bytes | None,
        client_id: int,
        ctx: RoundContext,
        epoch: int,
        digest: bytes,
        public: ckks.PublicContext,
    ) -> EncryptedUpdate | str:
        if raw is None:
            return "no reply at stage encrypted_input"
        try:
            message = decode_message(raw)
        except MessageError as exc:
            return f"malformed reply: {exc}"
        if isinstance(message, ClientFailure):
            return f"client failed: {message.reason}"
        if not isinstance(message, EncryptedUpdate):
            return f"expected EncryptedUpdate, got {type(message).__name__}"
        if (message.round, message.attempt, message.client_id) != (
            ctx.round,
            ctx.attempt,
            client_id,
        ):
            return "reply for another round, attempt or client"
        if message.model_hash != ctx.broadcast.model_hash or message.model_size != ctx.model_size:
            return "reply trained from a different model"
        if message.epoch != epoch or message.context_digest != digest:
            return "reply encrypted under another key epoch or context"
        if message.num_samples < 1:
            return f"num_samples must be >= 1, got {message.num_samples}"
        if self._user_level is not None and message.num_samples != 1:
            return (
                f"under user-level DP every update has weight 1 (its weight is folded into "
                f"the clipped value), got num_samples={message.num_samples}"
            )
        public_key = self._client_keys.get(client_id)
        try:
            if public_key is None:
                raise SignatureError("unknown client")
            verify_signature(
                public_key, message.signature, UPDATE_SIGNATURE_CONTEXT, message.signed_payload()
            )
            # lengths and headers only; residues are range-checked while they are summed
            count = public.count_framed(message.ciphertexts, "EncryptedUpdate.ciphertexts")
        except SignatureError:
            return "update signature did not verify"
        except CkksError as exc:
            return str(exc)
        expected = -(-ctx.model_size // self._preset.params_per_ciphertext)
        if count != max(1, expected):
            return f"{count} ciphertexts for a model of {ctx.model_size} parameters"
        return message

    def aggregate(
        self, transport: Transport, participants: list[int], ctx: RoundContext
    ) -> AggregateResult | None:
        per_sum = max(1, -(-ctx.model_size // self._preset.params_per_ciphertext))
        per_epoch = rounds_per_epoch(self._query_budget, self._num_clients, per_sum)
        epoch = epoch_of_round(ctx.round, per_epoch)
        public = self._contexts(epoch)
        client_context = self._client_context
        ins = CkksFitIns(
            round=ctx.round,
            attempt=ctx.attempt,
            model_hash=ctx.broadcast.model_hash,
            weights=ctx.broadcast.weights,
            epoch=epoch,
            context=client_context,
        ).to_bytes()
        replies = transport.exchange(dict.fromkeys(participants, ins))
        digest = hashlib.sha256(client_context).digest()
        accepted: dict[int, tuple[bytes, EncryptedUpdate]] = {}
        dropped: dict[int, str] = {}
        for client_id in participants:
            raw = replies.get(client_id)
            checked = self._check(raw, client_id, ctx, epoch, digest, public)
            if isinstance(checked, str):
                record_dropout(ctx, dropped, client_id, stage="encrypted_input", reason=checked)
            elif raw is not None:
                accepted[client_id] = (raw, checked)
        if len(accepted) < self._min_cohort:
            return None
        if self.trust is not None:
            try:
                decision = self.trust.decide(public, accepted, ctx)
            except (DecryptorRefusal, CkksError) as exc:
                ctx.events.emit("warning", message=f"ckks trust scalars failed: {exc}")
                return None
            for client_id, reason in decision.flagged.items():
                # flagged clients never reach the sum: dropped exactly like a dropout
                record_dropout(ctx, dropped, client_id, stage="trust", reason=reason)
                del accepted[client_id]
            if len(accepted) < self._min_cohort:
                ctx.events.emit(
                    "warning",
                    message=f"{len(accepted)} client(s) kept by the trust module, below "
                    f"aggregation.min_cohort={self._min_cohort}: the round is skipped",
                )
                return None
        ids = sorted(accepted)
        weights = [int(accepted[i][1].num_samples) for i in ids]
        try:
            summed = ckks.weighted_sum_framed(
                public, [accepted[i][1].ciphertexts for i in ids], weights
            )
        except CkksError as exc:
            ctx.events.emit("warning", message=f"ckks aggregation failed: {exc}")
            return None
        request = SumRequest(
            round=ctx.round,
            attempt=ctx.attempt,
            epoch=epoch,
            updates=frame_blobs([accepted[i][0] for i in ids]),
            aggregate_digest=ckks.aggregate_digest(summed),
        )
        reply = decode_message(self._decryptor(request.to_bytes()))
        if isinstance(reply, Refusal):
            ctx.events.emit("warning", message=f"decryptor refused the sum: {reply.reason}")
            return None
        if not isinstance(reply, SumRelease) or reply.contributors != tuple(ids):
            raise CkksError(f"unexpected decryptor reply {type(reply).__name__}")
        mean = reply.mean.copy()
        dp_events: tuple[DpEvent, ...] = ()
        if self._user_level is not None:
            # weights are all 1: total_weight = contributors; use the fixed denominator
            mean = (mean * (float(reply.total_weight) / self._user_level.denominator)).astype(
                np.float32
            )
            dp_events = (
                self._user_level.released_event(
                    len(ids), self._min_cohort, round_index=ctx.round, attempt=ctx.attempt
                ),
            )
        return AggregateResult(
            mean_update=mean,
            total_weight=float(reply.total_weight),
            survivors=tuple(ids),
            dropped=dropped,
            train_loss=None,
            dp_events=dp_events,
        )
