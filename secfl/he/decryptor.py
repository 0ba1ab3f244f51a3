"""The decryptor role: holds the CKKS secret key and releases only what its policy allows.

Policy (DESIGN §3, issue 4). The decryptor never decrypts a ciphertext it is handed. It
receives the client-signed updates, verifies every signature, recomputes what it is asked
for, and releases

(a) the weighted mean of one round attempt's updates, once per round, if at least
    ``min_cohort`` distinct clients contribute, no signed weight exceeds
    ``max_weight_share`` of the total, and the server's aggregate ciphertext equals the
    decryptor's recomputation (a rotated, derived or substituted aggregate is refused);
(b) at most four trust scalars per client per round, one of each kind (``reference``,
    ``norm``, ``trusted``, ``dormant``); the reference vector, the trusted party and the
    dormant mask are fixed by the first request of the round. The ``dormant`` mask must be
    a 0/1 vector selecting at least ``min_mask`` coordinates and leaving at least
    ``min_mask`` out (so neither the scalar nor its difference with the squared norm
    isolates fewer than ``min_mask`` coordinates of one client's update). The decryptor
    recomputes the server's encrypted scalar from the signed update(s) (``trust`` preset
    evaluation keys, deterministic), refuses a digest mismatch, and decrypts only slot 0 of
    its own recomputation.

Every release is noise-flooded (LMSS 2022, see :func:`secfl.crypto.ckks.flooding_plan`) with
noise from the run's randomness stream ``ckks.flooding``, counted against the key epoch's
query budget, and logged (``ckks_release``); every refusal is logged with its reason
(``ckks_refusal``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from secfl.audit.events import EventLog, register_event
from secfl.crypto import ckks
from secfl.crypto.sign import verify_signature
from secfl.errors import CkksError, DecryptorRefusal, MessageError, SecflError, SignatureError
from secfl.he.messages import (
    SCALAR_KINDS,
    UPDATE_SIGNATURE_CONTEXT,
    ContextReply,
    ContextRequest,
    DecryptRequest,
    EncryptedUpdate,
    Refusal,
    ScalarRelease,
    ScalarRequest,
    SumRelease,
    SumRequest,
    unframe_blobs,
)
from secfl.randomness import Randomness
from secfl.wire import WireMessage, decode_message

register_event(
    "ckks_release",
    ("round", "attempt", "epoch", "kind", "clients", "total_weight", "noise_sigma"),
)
register_event("ckks_refusal", ("round", "attempt", "request", "reason"))
register_event("ckks_key_epoch", ("epoch", "preset", "statistical_bits", "query_budget"))


@dataclass(frozen=True)
class DecryptorPolicy:
    min_cohort: int
    max_weight_share: float
    clip_range: float
    statistical_bits: int
    query_budget: int
    #: Fewest coordinates a ``dormant`` mask may select, and fewest it may leave out.
    min_mask: int = 64


#: Scale exponents tried for the ``dormant`` mask plaintext, largest (most precise) first;
#: the first whose worst-case slot sum fits the modulus is used (server and decryptor
#: derive the same one from the public mask and clip range).
MASK_SCALE_BITS = tuple(range(20, 11, -1))


def dormant_plaintexts(
    public: ckks.PublicContext, mask: np.ndarray, clip_range: float
) -> tuple[int, list[ckks.MaskPlain]]:
    """The mask's plaintexts at the largest scale 2^k (k in :data:`MASK_SCALE_BITS`) at
    which ``2 C^2 sum |alpha'| + |beta'|`` (the most the masked slot sum can reach) is within
    :meth:`~secfl.crypto.ckks.PublicContext.masked_capacity`; raises
    :class:`DecryptorRefusal` if none is."""
    for bits in MASK_SCALE_BITS:
        plains = public.mask_plaintexts(mask, bits)
        bound = 2.0 * clip_range**2 * sum(p.weight for p in plains)
        if bound <= public.masked_capacity(bits):
            return bits, plains
    raise DecryptorRefusal(
        f"a dormant mask of {int(np.count_nonzero(mask))} coordinates at clip_range "
        f"{clip_range} may reach {bound:.4g}, above the {public.masked_capacity(bits):.4g} "
        f"the preset holds at mask scale 2^{bits}; lower aggregation.ckks.clip_range"
    )


def mask_bytes(mask: np.ndarray) -> bytes:
    """The wire form of a coordinate mask: one byte per coordinate, 0 or 1."""
    return np.asarray(mask, dtype=bool).astype(np.uint8).tobytes()


def rounds_per_epoch(query_budget: int, num_clients: int, ciphertexts_per_sum: int) -> int:
    """Rounds one key serves: a round releases at most one sum (one query per ciphertext)
    and four scalars per client (:data:`SCALAR_KINDS`)."""
    return max(1, query_budget // (ciphertexts_per_sum + len(SCALAR_KINDS) * num_clients))


def epoch_of_round(round_index: int, per_epoch: int) -> int:
    return (max(round_index, 1) - 1) // per_epoch


@dataclass
class _RoundState:
    sum_released: bool = False
    scalars: dict[int, set[str]] = field(default_factory=dict)
    reference_digest: bytes | None = None
    trusted_party: int | None = None
    mask_digest: bytes | None = None
    mask_plains: tuple[int, list[ckks.MaskPlain]] | None = None


class Decryptor:
    """The key holder. Reach it only through :meth:`handle` (request bytes -> reply bytes)."""

    def __init__(
        self,
        preset: ckks.CkksPreset,
        policy: DecryptorPolicy,
        *,
        client_keys: Mapping[int, bytes],
        randomness: Randomness,
        events: EventLog,
    ) -> None:
        self._preset = preset
        self._policy = policy
        self._plan = ckks.flooding_plan(
            preset,
            statistical_bits=policy.statistical_bits,
            query_budget=policy.query_budget,
            clip_range=policy.clip_range,
        )
        self._client_keys = dict(client_keys)
        self._randomness = randomness
        self._events = events
        self._keys: dict[int, ckks.SecretContext] = {}
        self._queries: dict[int, int] = {}
        self._rounds: dict[int, _RoundState] = {}
        self._seen_ciphertexts: set[bytes] = set()

    @property
    def plan(self) -> ckks.FloodingPlan:
        return self._plan

    # -- keys ---------------------------------------------------------------------------

    def _secret(self, epoch: int) -> ckks.SecretContext:
        key = self._keys.get(epoch)
        if key is None:
            seed = None
            if not self._randomness.secure:  # seeded simulation: reproducible keys
                seed = self._randomness.stream(
                    "ckks.keygen", round_index=epoch, party="decryptor"
                ).bytes(64)
            key = ckks.SecretContext(self._preset, seed=seed)
            self._keys = {e: k for e, k in self._keys.items() if e >= epoch - 1}
            self._keys[epoch] = key
            self._queries.setdefault(epoch, 0)
            self._events.emit(
                "ckks_key_epoch",
                epoch=epoch,
                preset=self._preset.name,
                statistical_bits=self._plan.statistical_bits,
                query_budget=self._plan.query_budget,
            )
        return key

    # -- entry point --------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes:
        round_index, attempt, name = 0, 0, "unknown"
        try:
            request = decode_message(payload)
            round_index = int(getattr(request, "round", 0))
            attempt = int(getattr(request, "attempt", 0))
            name = type(request).__name__
            reply = self._dispatch(request)
        except (DecryptorRefusal, SignatureError, MessageError, CkksError) as exc:
            reason = "a signature did not verify" if isinstance(exc, SignatureError) else str(exc)
            self._events.emit(
                "ckks_refusal", round=round_index, attempt=attempt, request=name, reason=reason
            )
            reply = Refusal(round=round_index, attempt=attempt, request=name, reason=reason)
        return reply.to_bytes()

    def _dispatch(self, request: WireMessage) -> WireMessage:
        if isinstance(request, ContextRequest):
            return self._context(request)
        if isinstance(request, SumRequest):
            return self._release_sum(request)
        if isinstance(request, ScalarRequest):
            return self._release_scalar(request)
        if isinstance(request, DecryptRequest):
            raise DecryptorRefusal(self._trace(request.ciphertext))
        raise DecryptorRefusal(f"the decryptor does not serve {type(request).__name__} messages")

    def _context(self, request: ContextRequest) -> ContextReply:
        key = self._secret(request.epoch)
        if request.audience == "client":
            data = key.client_context_bytes()
        elif request.audience == "server":
            data = key.server_context_bytes()
        else:
            raise DecryptorRefusal(
                f"context audience {request.audience!r} is unknown; allowed: client, server"
            )
        return ContextReply(
            epoch=request.epoch, preset=self._preset.name, audience=request.audience, context=data
        )

    def _trace(self, ciphertext: bytes) -> str:
        digest = hashlib.sha256(ciphertext).digest()
        if digest in self._seen_ciphertexts:
            return (
                "refused: that is a single client's ciphertext; only weighted sums over "
                f">= {self._policy.min_cohort} clients and trust scalars are released"
            )
        return (
            "refused: the ciphertext cannot be traced to client-signed updates (rotated, "
            "derived or unknown); the decryptor only decrypts what it recomputed itself"
        )

    # -- checks shared by both release kinds ---------------------------------------------

    def _verified(self, raw: bytes, round_index: int, attempt: int) -> EncryptedUpdate:
        update = EncryptedUpdate.from_bytes(raw)
        public_key = self._client_keys.get(update.client_id)
        if public_key is None:
            raise DecryptorRefusal(f"client {update.client_id} has no registered identity key")
        verify_signature(
            public_key, update.signature, UPDATE_SIGNATURE_CONTEXT, update.signed_payload()
        )
        if (update.round, update.attempt) != (round_index, attempt):
            raise DecryptorRefusal(
                f"update of client {update.client_id} is for round {update.round} attempt "
                f"{update.attempt}, the request for round {round_index} attempt {attempt}"
            )
        key = self._secret(update.epoch)
        # clients encrypt under the client context (no evaluation keys): its digest
        if update.context_digest != hashlib.sha256(key.client_context_bytes()).digest():
            raise DecryptorRefusal(
                f"update of client {update.client_id} was encrypted under another context"
            )
        for blob in unframe_blobs(update.ciphertexts, "EncryptedUpdate.ciphertexts"):
            self._seen_ciphertexts.add(hashlib.sha256(blob).digest())
        return update

    def _charge(self, epoch: int, queries: int) -> None:
        used = self._queries.get(epoch, 0)
        if used + queries > self._plan.query_budget:
            raise DecryptorRefusal(
                f"key epoch {epoch} has used {used} of its {self._plan.query_budget} "
                "decryption queries; flooding is stated for that budget, keys must rotate"
            )
        self._queries[epoch] = used + queries

    def _noise(self, round_index: int, attempt: int, purpose: str, size: int) -> np.ndarray:
        stream = self._randomness.stream(
            f"ckks.flooding.{purpose}", round_index=round_index, attempt=attempt, party="decryptor"
        )
        return stream.normal(size)

    # -- (a) weighted sums --------------------------------------------------------------

    def _release_sum(self, request: SumRequest) -> SumRelease:
        policy = self._policy
        state = self._rounds.setdefault(request.round, _RoundState())
        if state.sum_released:
            raise DecryptorRefusal(
                f"a weighted sum of round {request.round} was already released (in any "
                "attempt); a second, differencing sum is refused"
            )
        raws = unframe_blobs(request.updates, "SumRequest.updates")
        updates = [self._verified(raw, request.round, request.attempt) for raw in raws]
        ids = [u.client_id for u in updates]
        if len(set(ids)) != len(ids):
            raise DecryptorRefusal(f"a client appears twice in the sum: {sorted(ids)}")
        if len(updates) < policy.min_cohort:
            raise DecryptorRefusal(
                f"a sum over {len(updates)} client(s) is refused: aggregation.min_cohort is "
                f"{policy.min_cohort}"
            )
        first = updates[0]
        for u in updates:
            if (u.epoch, u.model_hash, u.model_size) != (
                first.epoch,
                first.model_hash,
                first.model_size,
            ):
                raise DecryptorRefusal(
                    "updates disagree on key epoch, model or model size; they cannot be summed"
                )
        if first.epoch != request.epoch:
            raise DecryptorRefusal(f"updates are for key epoch {first.epoch}, not {request.epoch}")
        weights = [int(u.num_samples) for u in updates]
        total = sum(weights)
        top = max(weights)
        if top > policy.max_weight_share * total:
            raise DecryptorRefusal(
                f"weight vector dominated: client {ids[weights.index(top)]} holds "
                f"{top / total:.3f} of the total weight, max_weight_share is "
                f"{policy.max_weight_share}"
            )
        key = self._secret(first.epoch)
        limit = key.public.max_total_weight(policy.clip_range)
        if total > limit:
            raise DecryptorRefusal(
                f"total weight {total} exceeds {limit}, the most the preset's modulus holds "
                f"at clip_range {policy.clip_range}"
            )
        expected = key.public.ciphertext_count(first.model_size)
        for u in updates:
            count = key.public.count_framed(u.ciphertexts, f"update of client {u.client_id}")
            if count != expected:
                raise DecryptorRefusal(
                    f"client {u.client_id} sent {count} ciphertexts, a model of "
                    f"{first.model_size} parameters needs {expected}"
                )
        # the same exact residue arithmetic as the server, on the signed bytes themselves
        recomputed = key.public.weighted_sum_framed([u.ciphertexts for u in updates], weights)
        digest = ckks.aggregate_digest(recomputed)
        if digest != request.aggregate_digest:
            raise DecryptorRefusal(
                "the server's aggregate does not equal the decryptor's recomputation from the "
                "signed updates (rotated, derived or substituted ciphertext)"
            )
        self._charge(first.epoch, len(recomputed))
        n = self._preset.params_per_ciphertext
        decrypted = np.concatenate([key.decrypt(ct, n) for ct in recomputed])
        decrypted = decrypted[: first.model_size]
        sigma = self._plan.sum_sigma(total)
        noise = self._noise(request.round, request.attempt, "sum", decrypted.size) * sigma
        mean = ((decrypted + noise) / total).astype(np.float32)
        state.sum_released = True
        self._events.emit(
            "ckks_release",
            round=request.round,
            attempt=request.attempt,
            epoch=first.epoch,
            kind="weighted_mean",
            clients=sorted(ids),
            total_weight=total,
            noise_sigma=self._plan.mean_sigma,
        )
        order = np.argsort(ids)
        return SumRelease(
            round=request.round,
            attempt=request.attempt,
            contributors=tuple(int(ids[i]) for i in order),
            total_weight=total,
            noise_sigma=self._plan.mean_sigma,
            error_bound=self._plan.mean_bound,
            mean=mean,
        )

    # -- (b) trust scalars --------------------------------------------------------------

    def _mask(
        self,
        state: _RoundState,
        public: ckks.PublicContext,
        raw: bytes,
        size: int,
        round_index: int,
    ) -> tuple[int, list[ckks.MaskPlain]]:
        """Check a ``dormant`` mask against the policy, bind it to the round, encode it."""
        mask = np.frombuffer(raw, dtype=np.uint8)
        if mask.size != size:
            raise DecryptorRefusal(f"the dormant mask must have {size} entries, got {mask.size}")
        if np.any(mask > 1):
            raise DecryptorRefusal("the dormant mask is not a 0/1 vector")
        selected = int(np.count_nonzero(mask))
        least = self._policy.min_mask
        if selected < least or size - selected < least:
            raise DecryptorRefusal(
                f"the dormant mask selects {selected} of {size} coordinates; the policy needs "
                f"at least {least} selected and at least {least} left out, so that no "
                "released scalar (or its difference with the squared norm) isolates fewer "
                f"than {least} coordinates of a client's update"
            )
        digest = hashlib.sha256(raw).digest()
        if state.mask_digest not in (None, digest):
            raise DecryptorRefusal(
                f"round {round_index} already uses another dormant mask; one per round"
            )
        if state.mask_plains is None:  # plaintexts depend on the parameters only
            state.mask_plains = dormant_plaintexts(
                public, mask.astype(bool), self._policy.clip_range
            )
        state.mask_digest = digest
        return state.mask_plains

    def _release_scalar(self, request: ScalarRequest) -> ScalarRelease:
        if request.kind not in SCALAR_KINDS:
            raise DecryptorRefusal(
                f"scalar kind {request.kind!r} is not released; allowed: {SCALAR_KINDS}"
            )
        if not self._preset.galois_keys:
            raise DecryptorRefusal(
                f"trust scalars need aggregation.ckks.preset 'trust' (evaluation keys); this "
                f"decryptor serves preset {self._preset.name!r}"
            )
        state = self._rounds.setdefault(request.round, _RoundState())
        update = self._verified(request.update, request.round, request.attempt)
        released = state.scalars.setdefault(update.client_id, set())
        if len(released) >= len(SCALAR_KINDS):
            raise DecryptorRefusal(
                f"client {update.client_id} already has {len(released)} trust scalars in "
                f"round {request.round}; at most {len(SCALAR_KINDS)} per client per round "
                "are released"
            )
        if request.kind in released:
            raise DecryptorRefusal(
                f"the {request.kind!r} scalar of client {update.client_id} was already "
                f"released in round {request.round}"
            )
        key = self._secret(update.epoch)
        public = key.public
        size = int(update.model_size)
        clip = self._policy.clip_range
        blobs = unframe_blobs(update.ciphertexts, "EncryptedUpdate.ciphertexts")
        if len(blobs) != public.ciphertext_count(size):
            raise DecryptorRefusal(
                f"client {update.client_id} sent {len(blobs)} ciphertexts for {size} parameters"
            )
        # Error of the released scalar in message units (t = fresh error bound per value,
        # Gaussian-like, so t is a 12-sigma bound of each and t ||v||_2 of <e, v>):
        # <e_x, r> -> t ||r||; <x, x> and <x, y> -> 2 t sqrt(d) C + d t^2 (t << 1: + d t);
        # the unrescaled evaluation (plaintext rounding, relinearisation, 13 rotations)
        # adds below 2^-100 at scale 2^148: + 1 x t.
        pair = 2.0 * math.sqrt(size) * clip + size * ckks.fresh_error_bound(self._preset)
        if request.kind != "dormant" and request.mask:
            raise DecryptorRefusal(f"a {request.kind!r} scalar carries no mask")
        if request.kind == "reference":
            reference = np.asarray(request.reference, dtype=np.float64)
            if reference.size != size or not np.all(np.isfinite(reference)):
                raise DecryptorRefusal(
                    f"reference must be {size} finite values, got {reference.size}"
                )
            digest = hashlib.sha256(reference.tobytes()).digest()
            if state.reference_digest not in (None, digest):
                raise DecryptorRefusal(
                    f"round {request.round} already uses another reference vector; one per round"
                )
            norm = float(np.linalg.norm(reference))
            public.check_scalar_range(size=size, clip_range=clip, other_norm=norm)
            state.reference_digest = digest
            recomputed = public.inner_product_plain(blobs, reference)
            sensitivity = norm + 1.0
        elif request.kind == "norm":
            public.check_scalar_range(size=size, clip_range=clip, other_norm=math.sqrt(size) * clip)
            recomputed = public.squared_norm(blobs)
            sensitivity = pair + 1.0
        elif request.kind == "trusted":
            other = self._verified(request.other, request.round, request.attempt)
            if other.client_id == update.client_id:
                raise DecryptorRefusal("the trusted party must be another client")
            if state.trusted_party not in (None, other.client_id):
                raise DecryptorRefusal(
                    f"round {request.round} elected client {state.trusted_party} as trusted "
                    f"party; a scalar against client {other.client_id} is refused"
                )
            if other.model_size != update.model_size or other.epoch != update.epoch:
                raise DecryptorRefusal("the trusted party's update does not match in size/epoch")
            public.check_scalar_range(size=size, clip_range=clip, other_norm=math.sqrt(size) * clip)
            state.trusted_party = other.client_id
            conjugates = public.conjugates(
                unframe_blobs(other.ciphertexts, "EncryptedUpdate.ciphertexts")
            )
            recomputed = public.inner_product(blobs, conjugates)
            sensitivity = pair + 1.0
        else:
            _bits, plains = self._mask(state, public, request.mask, size, request.round)
            recomputed = public.masked_squared_norm(blobs, plains)
            # the CKKS errors enter as for the norm, each weighted by the mask's plaintext
            # slot weight (|alpha'| + |beta'| <= 1 + encoding error)
            sensitivity = max(p.peak for p in plains) * pair + 1.0
        if ckks.scalar_digest(recomputed) != request.result_digest:
            raise DecryptorRefusal(
                f"the server's encrypted {request.kind!r} scalar of client {update.client_id} "
                "does not equal the decryptor's recomputation from the signed updates"
            )
        self._charge(update.epoch, 1)
        value = key.decrypt_scalar(recomputed)
        sigma = ckks.scalar_flooding_sigma(
            self._preset,
            statistical_bits=self._policy.statistical_bits,
            query_budget=self._policy.query_budget,
            sensitivity=sensitivity,
        )
        noise = self._noise(
            request.round, request.attempt, f"scalar.{update.client_id}.{request.kind}", 1
        )
        released.add(request.kind)
        self._events.emit(
            "ckks_release",
            round=request.round,
            attempt=request.attempt,
            epoch=update.epoch,
            kind=f"scalar:{request.kind}",
            clients=[update.client_id],
            total_weight=int(update.num_samples),
            noise_sigma=sigma,
        )
        if not math.isfinite(value):
            raise SecflError("trust scalar is not finite")
        return ScalarRelease(
            round=request.round,
            attempt=request.attempt,
            client_id=update.client_id,
            kind=request.kind,
            value=value + float(noise[0]) * sigma,
            noise_sigma=sigma,
        )
