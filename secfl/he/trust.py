"""The trust module under mode ``ckks`` (server side): encrypted scalars, flooded releases.

Per round and accepted client i the server computes on ciphertexts (``trust`` preset)

* s1 = <x_i, r> with its plaintext reference update r (``ReferenceTrainer`` on data.shared),
* s2 = ||x_i||^2 (ciphertext x conjugated ciphertext, relinearise, rotate-and-sum),
* s4 = sum_j m_j x_ij^2 with the public 0/1 mask m of the weights fed by units dormant on
  the shared set at the broadcast model (``trust.dormant.flag_share``; the pruner's mask):
  z conj(z) and z z times plaintext masks, relinearise, rotate-and-sum,

asks the decryptor for each (``ScalarRequest`` with the digest of its encrypted result; the
decryptor recomputes, compares, releases the flooded value), flags every client whose
dormant share sqrt(s4 / s2) exceeds ``flag_share``, votes a trusted party T among the others
from s1, s2 and the reputations, then computes s3 = <x_i, x_T> for every i != T and asks for it.
Cosine with T = s3 / sqrt(s2_i s2_T), distance^2 = s2_i + s2_T - 2 s3, norm ratio
sqrt(s2_i / s2_T); flagged clients never enter the encrypted sum. The decryptor's policy
(``protocols/ckks_aggregation.md`` section 5(b)) caps this at four scalars per client per
round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from secfl.crypto import ckks
from secfl.errors import CkksError, DecryptorRefusal
from secfl.he.decryptor import dormant_plaintexts, mask_bytes
from secfl.he.messages import (
    EncryptedUpdate,
    Refusal,
    ScalarRelease,
    ScalarRequest,
    unframe_blobs,
)
from secfl.randomness import Randomness
from secfl.wire import decode_message

if TYPE_CHECKING:
    from secfl.server.protection import RoundContext
    from secfl.trust.defense import TrustDecision, TrustModule

_EMPTY = np.zeros(0, dtype=np.float32)


@dataclass
class ScalarTimings:
    """Seconds the server spent on encrypted scalar evaluations this round."""

    seconds: float = 0.0
    scalars: int = 0


class EncryptedTrust:
    """Runs :meth:`TrustModule.defend_scalars` on one round's accepted ciphertexts."""

    def __init__(
        self,
        trust: TrustModule,
        decryptor: Callable[[bytes], bytes],
        *,
        clip_range: float = 1.0,
    ) -> None:
        self.trust = trust
        self._decryptor = decryptor
        #: aggregation.ckks.clip_range (the dormant mask's scale is derived from it, as the
        #: decryptor derives it).
        self.clip_range = float(clip_range)
        self.timings = ScalarTimings()

    def _release(
        self, ctx: RoundContext, kind: str, raw: bytes, result: bytes, **extra: Any
    ) -> float:
        request = ScalarRequest(
            round=ctx.round,
            attempt=ctx.attempt,
            kind=kind,
            update=raw,
            reference=extra.get("reference", _EMPTY),
            other=extra.get("other", b""),
            mask=extra.get("mask", b""),
            result_digest=ckks.scalar_digest(result),
        )
        reply = decode_message(self._decryptor(request.to_bytes()))
        if isinstance(reply, Refusal):
            raise DecryptorRefusal(f"decryptor refused the {kind!r} scalar: {reply.reason}")
        if not isinstance(reply, ScalarRelease) or reply.kind != kind:
            raise CkksError(f"unexpected decryptor reply {type(reply).__name__}")
        return float(reply.value)

    def _timed(self, compute: Callable[..., bytes], *args: Any) -> bytes:
        started = time.perf_counter()
        out = compute(*args)
        self.timings.seconds += time.perf_counter() - started
        self.timings.scalars += 1
        return out

    def _dormant_norms(
        self,
        public: ckks.PublicContext,
        accepted: Mapping[int, tuple[bytes, EncryptedUpdate]],
        blobs: Mapping[int, list[bytes]],
        ctx: RoundContext,
    ) -> dict[int, float] | None:
        """s4 = sum_i m_i x_i^2 per client, m the weights fed by units dormant on the public
        shared set at the broadcast model (``trust.dormant.flag_share``; ``None`` when the
        rule is off, the mask is empty or the decryptor refuses it: logged)."""
        pruner = self.trust.pruner
        if pruner is None or self.trust.config.dormant.flag_share is None:
            return None
        mask = pruner.mask(ctx.broadcast.weights)
        if not mask.any():
            return {c: 0.0 for c in accepted}
        raw = mask_bytes(mask)
        out: dict[int, float] = {}
        try:
            _bits, plains = dormant_plaintexts(public, mask, self.clip_range)
            for c in sorted(accepted):
                result = self._timed(public.masked_squared_norm, blobs[c], plains)
                out[c] = self._release(ctx, "dormant", accepted[c][0], result, mask=raw)
        except DecryptorRefusal as exc:
            ctx.events.emit(
                "warning",
                message=(
                    f"trust under ckks, round {ctx.round}: the dormant-share flag did not run "
                    f"({int(mask.sum())} dormant-fed weights): {exc}"
                ),
            )
            return None
        return out

    def decide(
        self,
        public: ckks.PublicContext,
        accepted: Mapping[int, tuple[bytes, EncryptedUpdate]],
        ctx: RoundContext,
    ) -> TrustDecision:
        """Scalars, vote, compare and flag for the accepted clients (sorted ids)."""
        ids = sorted(accepted)
        blobs = {
            c: unframe_blobs(accepted[c][1].ciphertexts, "EncryptedUpdate.ciphertexts") for c in ids
        }
        reference = None
        reference_inner: dict[int, float] | None = None
        reference_norm: float | None = None
        if self.trust.reference is not None:
            reference = np.asarray(
                self.trust.reference(
                    ctx.broadcast.weights, round_index=ctx.round, attempt=ctx.attempt
                ),
                dtype=np.float32,
            )
            reference_norm = float(np.linalg.norm(reference.astype(np.float64)))
            reference_inner = {}
            plain = reference.astype(np.float64)
            for c in ids:
                result = self._timed(public.inner_product_plain, blobs[c], plain)
                reference_inner[c] = self._release(
                    ctx, "reference", accepted[c][0], result, reference=reference
                )
        squared_norms = {}
        for c in ids:
            result = self._timed(public.squared_norm, blobs[c])
            squared_norms[c] = self._release(ctx, "norm", accepted[c][0], result)

        dormant_norms = self._dormant_norms(public, accepted, blobs, ctx)

        def trusted_inner(trusted: int, among: Sequence[int]) -> dict[int, float]:
            conjugates = public.conjugates(blobs[trusted])  # once per round, reused
            out = {}
            for c in among:
                if c == trusted:
                    continue
                result = self._timed(public.inner_product, blobs[c], conjugates)
                out[c] = self._release(
                    ctx, "trusted", accepted[c][0], result, other=accepted[trusted][0]
                )
            return out

        return self.trust.defend_scalars(
            {c: float(accepted[c][1].num_samples) for c in ids},
            reference_inner=reference_inner,
            reference_norm=reference_norm,
            squared_norms=squared_norms,
            trusted_inner=trusted_inner,
            dormant_norms=dormant_norms,
            round_index=ctx.round,
            attempt=ctx.attempt,
            events=ctx.events,
        )


def measure_trust_scalars(d: int, *, clients: int = 2, clip_range: float = 1.0) -> dict[str, Any]:
    """Time the server's encrypted scalar evaluations (s1, s2, s3, s4) for ``clients`` random
    updates of ``d`` parameters under the ``trust`` preset (OS randomness; nothing secret is
    kept). Returns seconds per client per 1e6 parameters (the benchmark's
    ``ckks_trust_s_per_client_per_1e6``) and the per-kind split. The trusted party's
    conjugation is done once and counted once, as in a round."""
    if d < 1 or clients < 2:
        raise CkksError(f"measure_trust_scalars needs d >= 1 and clients >= 2, got {d}, {clients}")
    secret = ckks.SecretContext(ckks.TRUST)
    public = ckks.PublicContext(ckks.TRUST, secret.server_context_bytes())
    # timing data only, never secret; drawn like every other value in secfl (DESIGN 3b)
    stream = Randomness("seeded", 0).stream("bench.trust_scalars")
    vectors = [(stream.uniform(d) * 2.0 - 1.0) * clip_range * 0.01 for _ in range(clients)]
    reference = stream.normal(d) * 0.01
    blobs = [ckks.encrypt_vector(public, v) for v in vectors]
    # dormant: a mask touching every ciphertext with unpaired coordinates (both the |z|^2
    # and the z^2 product in each), the costliest layout; timing only, no range check
    mask = np.zeros(d, dtype=bool)
    mask[1::256] = True
    plains = public.mask_plaintexts(mask, 16)
    split = {
        "reference": 0.0,
        "norm": 0.0,
        "trusted": 0.0,
        "dormant": 0.0,
        "conjugate_trusted": 0.0,
    }
    started = time.perf_counter()
    conjugates = public.conjugates(blobs[0])
    split["conjugate_trusted"] = time.perf_counter() - started
    for column in blobs[1:]:
        for kind, compute in (
            ("reference", lambda col=column: public.inner_product_plain(col, reference)),
            ("norm", lambda col=column: public.squared_norm(col)),
            ("trusted", lambda col=column: public.inner_product(col, conjugates)),
            ("dormant", lambda col=column: public.masked_squared_norm(col, plains)),
        ):
            started = time.perf_counter()
            compute()
            split[kind] += time.perf_counter() - started
    per_client = (sum(split.values()) - split["conjugate_trusted"]) / (clients - 1)
    per_client += split["conjugate_trusted"] / clients
    scale = 1e6 / d
    return {
        "ckks_trust_s_per_client_per_1e6": per_client * scale,
        "d": d,
        "clients": clients,
        "ciphertexts_per_client": public.ciphertext_count(d),
        "seconds_per_1e6_by_kind": {
            k: (v / (clients - 1) if k != "conjugate_trusted" else v) * scale
            for k, v in split.items()
        },
        "preset": ckks.TRUST.name,
        "note": "server-side SEAL evaluations only (the decryptor recomputes the same)",
        "scalar_capacity": public.scalar_capacity(),
    }
