"""The client side of mode ``ckks``: train, clip, encrypt under the public key, sign."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from secfl.client.app import ClientApp
from secfl.crypto import ckks
from secfl.crypto.sign import SigningKey
from secfl.errors import CkksError
from secfl.he.messages import (
    UPDATE_SIGNATURE_CONTEXT,
    CkksFitIns,
    EncryptedUpdate,
    frame_blobs,
)
from secfl.messages import FitIns

if TYPE_CHECKING:
    from secfl.privacy.distributed import DistributedNoise

#: Simulation hooks (``secfl.attacks.simulation``'s ckks adapter). ``UpdateTap`` sees a
#: client's trained plaintext update (the omniscient adversary's view of honest clients);
#: ``UpdateSource`` replaces training (a malicious client's crafted update and sample count).
UpdateTap = Callable[[CkksFitIns, np.ndarray], None]
UpdateSource = Callable[[CkksFitIns], tuple[np.ndarray, int]]

_BY_APP: weakref.WeakKeyDictionary[ClientApp, CkksClient] = weakref.WeakKeyDictionary()


def ckks_client_of(app: ClientApp) -> CkksClient | None:
    """The CKKS side attached to ``app`` (simulation: the adversary adapter's hooks)."""
    return _BY_APP.get(app)


class CkksClient:
    """A client's CKKS state: its identity key and the public context it last received.

    It never holds a secret CKKS key; :class:`~secfl.crypto.ckks.PublicContext` cannot decrypt.
    """

    def __init__(
        self,
        app: ClientApp,
        preset: ckks.CkksPreset,
        *,
        clip_range: float,
        identity: SigningKey,
        noise: DistributedNoise | None = None,
        threshold: int = 1,
    ) -> None:
        self._app = app
        #: User-level DP: a Gaussian share for sums of at least ``threshold`` updates.
        self._noise = noise
        self._threshold = threshold
        self._preset = preset
        self._clip_range = clip_range
        self._identity = identity
        self._context: ckks.PublicContext | None = None
        #: Simulation only, see :data:`UpdateTap` / :data:`UpdateSource`.
        self.tap: UpdateTap | None = None
        self.source: UpdateSource | None = None

    @property
    def public_identity(self) -> bytes:
        return self._identity.public_bytes()

    def attach(self) -> None:
        self._app.register(CkksFitIns, self.on_fit)
        _BY_APP[self._app] = self

    def _public_context(self, data: bytes) -> ckks.PublicContext:
        if self._context is None or self._context.data != data:
            self._context = ckks.PublicContext(self._preset, data)
        if self._context.has_evaluation_keys:
            raise CkksError("a client must receive the public-key-only context")
        return self._context

    def on_fit(self, ins: CkksFitIns) -> EncryptedUpdate:
        context = self._public_context(ins.context)
        if self.source is not None:
            delta, num_samples = self.source(ins)
        else:
            delta, result = self._app.train(
                FitIns(
                    round=ins.round,
                    attempt=ins.attempt,
                    model_hash=ins.model_hash,
                    weights=ins.weights,
                )
            )
            num_samples = result.num_samples
            if self.tap is not None:
                self.tap(ins, delta)
        if self._noise is not None:
            # user-level DP: L2 clip with the weight folded in, plus this client's share
            share = self._noise.client_noise(
                self._app.randomness.stream(
                    "ckks.dp_noise",
                    round_index=ins.round,
                    attempt=ins.attempt,
                    party=self._app.party,
                ),
                self._threshold,
            )
            delta = self._noise.client_value(delta, num_samples) + share
            num_samples = 1
            if np.abs(delta).max() > self._clip_range:
                # clipping a noised share would change the sum's distribution: refuse
                raise CkksError(
                    f"a noised coordinate exceeds aggregation.ckks.clip_range="
                    f"{self._clip_range}; the update is not sent"
                )
        # Encoding bounds are enforced, never wrapped: the update is clipped to [-C, C].
        clipped = np.clip(delta.astype(np.float64), -self._clip_range, self._clip_range)
        seed = None
        if not self._app.randomness.secure:  # seeded simulation: reproducible ciphertexts
            seed = self._app.randomness.stream(
                "ckks.encrypt", round_index=ins.round, attempt=ins.attempt, party=self._app.party
            ).bytes(64)
        return encrypt_update(
            context,
            self._identity,
            clipped,
            round_index=ins.round,
            attempt=ins.attempt,
            client_id=self._app.client_id,
            epoch=ins.epoch,
            model_hash=ins.model_hash,
            num_samples=num_samples,
            seed=seed,
        )


def encrypt_update(
    context: ckks.PublicContext,
    identity: SigningKey,
    values: np.ndarray,
    *,
    round_index: int,
    attempt: int,
    client_id: int,
    epoch: int,
    model_hash: bytes,
    num_samples: int,
    seed: bytes | None = None,
) -> EncryptedUpdate:
    """Pack, encrypt (both cores) and sign one update; ``values`` must already be clipped."""
    unsigned = EncryptedUpdate(
        round=round_index,
        attempt=attempt,
        client_id=client_id,
        epoch=epoch,
        model_hash=model_hash,
        context_digest=context.digest,
        num_samples=num_samples,
        model_size=int(values.size),
        ciphertexts=frame_blobs(ckks.encrypt_vector(context, values, seed=seed)),
        signature=b"",
    )
    # The signature covers every field but itself (EncryptedUpdate.signed_payload).
    signature = identity.sign(UPDATE_SIGNATURE_CONTEXT, unsigned.signed_payload())
    return dataclasses.replace(unsigned, signature=signature)
