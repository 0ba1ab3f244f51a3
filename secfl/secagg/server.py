"""The SecAgg server: a sans-I/O state machine that learns only the survivors' sum.

Drive it with ``requests()`` (bytes per client for the current stage) and
``receive(replies)`` (bytes or ``None`` per client) until ``done``; then ``result`` holds the
weighted mean of the survivors U3. A client whose reply is missing, malformed, for the wrong
round, stage or sender, or badly signed is dropped with the reason; the round aborts with
:class:`~secfl.errors.SecAggAbort` (and no partial sum) once fewer than t clients remain, or
when some secret that the sum needs cannot be recovered from t shares.

Unmasking (Bonawitz et al. CCS 2017 §4, round 4; Bell et al. CCS 2020 §3):
    sum_{u in U3} x_u = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u)
                        + sum_{v in U2 \\ U3} sum_{u in N(v) ∩ U3} sign(u, v) PRG(s_uv)
with sign(u, v) = -1 if u < v else +1 (undoing what u applied), s_uv recomputed from the
recovered key s_v and u's advertised public key. All of it is one pass of
:class:`~secfl.crypto.prg.MaskEngine` over a preallocated vector.

Sub-cohorts (``cohorts=True``, the trust module under masking; protocols/secagg.md §9): U1
is split into blocks by a permutation keyed by a hash of every advertised key (the clients
derive and check the same split), masks and shares stay inside a block, and each block is
unmasked on its own with its own threshold t_g. A block that falls below t_g at any stage
fails alone: its sum is never revealed and its members count as dropped. The result then
holds one :class:`CohortSum` per revealed block besides their total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secfl.audit.events import EventLog, register_event
from secfl.config import MaskingConfig
from secfl.crypto import shamir
from secfl.crypto.kex import public_of, x25519_agree, x25519_private
from secfl.crypto.prg import ChunkFill, MaskEngine, reduce_mod
from secfl.errors import MessageError, ProtocolError, SecAggAbort, SecflError
from secfl.messages import ClientFailure
from secfl.secagg import messages as m
from secfl.secagg.client import SECRET_BYTES, pair_key
from secfl.secagg.encoding import decode_mean
from secfl.secagg.graph import (
    build_neighbours,
    cohort_neighbours,
    cohort_seed,
    graph_seed,
    split_cohorts,
)
from secfl.secagg.identity import IdentityRegistry
from secfl.secagg.params import NoiseHeadroom, SecAggParams, derive_params
from secfl.wire import WireMessage, decode_message

register_event("secagg_stage", ("round", "attempt", "stage", "requested", "replied", "remaining"))
register_event("secagg_aborted", ("round", "attempt", "stage", "reason"))
register_event(
    "secagg_unmasked",
    ("round", "attempt", "survivors", "self_masks_recovered", "mask_keys_recovered", "dropped"),
)
register_event("secagg_cohorts", ("round", "attempt", "cohorts", "thresholds"))
register_event("secagg_cohort_failed", ("round", "attempt", "cohort", "stage", "reason"))


@dataclass(frozen=True, eq=False)
class CohortSum:
    """One sub-cohort's revealed sum: its members (its block of U1), the survivors whose
    inputs are in the sum, the unmasked integer sum and its decoded weighted mean."""

    index: int
    members: tuple[int, ...]
    survivors: tuple[int, ...]
    threshold: int
    raw_sum: np.ndarray
    mean_update: np.ndarray
    total_weight: int


@dataclass(frozen=True, eq=False)
class SecAggResult:
    mean_update: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]
    dropped: dict[int, str] = field(default_factory=dict)
    #: The unmasked integer sum (d + 1 words mod 2^b); tests compare it with plaintext.
    raw_sum: np.ndarray | None = None
    #: Sub-cohort rounds: every revealed sub-cohort's sum (the totals above add them up).
    cohorts: tuple[CohortSum, ...] = ()


class SecAggServer:
    """Server side of one round (one attempt) of SecAgg / SecAgg+."""

    def __init__(
        self,
        *,
        masking: MaskingConfig,
        min_cohort: int,
        participants: list[int] | tuple[int, ...],
        round_index: int,
        attempt: int,
        model_hash: bytes,
        weights: np.ndarray,
        registry: IdentityRegistry | None = None,
        engine: MaskEngine | None = None,
        events: EventLog | None = None,
        noise: NoiseHeadroom | None = None,
        cohorts: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.participants = tuple(sorted(set(participants)))
        if len(self.participants) != len(participants):
            raise SecAggAbort("participants must be distinct client ids")
        self.round = round_index
        self.attempt = attempt
        self.model_hash = model_hash
        self.weights = weights
        self.registry = registry
        self.events = events
        self.clock = clock
        self.engine = engine if engine is not None else MaskEngine(threads=masking.threads)
        try:
            self.params: SecAggParams = derive_params(
                masking,
                n=len(self.participants),
                min_cohort=min_cohort,
                noise=noise,
                cohorts=cohorts,
            )
        except SecflError as exc:
            raise SecAggAbort(f"cannot start round {round_index}: {exc}") from None
        self.stage = "advertise_keys"
        self.done = False
        self.result: SecAggResult | None = None
        self.dropped: dict[int, str] = {}
        self.timings: dict[str, float] = {}
        self.active: tuple[int, ...] = self.participants
        self.advertised: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.neighbours: dict[int, tuple[int, ...]] = {}
        self.u2: tuple[int, ...] = ()
        self.u3: tuple[int, ...] = ()
        self._routed: dict[int, dict[int, bytes]] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._signatures: dict[int, bytes] = {}
        self._unmask: dict[int, m.UnmaskRes] = {}
        self._excluded: set[int] = set()
        self._holds: dict[int, frozenset[int]] = {}
        #: Sub-cohorts of U1 (empty without them), each one's t_g, and why some failed.
        self.cohorts: tuple[tuple[int, ...], ...] = ()
        self.cohort_thresholds: tuple[int, ...] = ()
        self.failed_cohorts: dict[int, str] = {}
        # Clients always verify every signature against their pinned registry; the server
        # also does in the active variant, to drop a client with a bad signature before it
        # makes every honest client abort (robustness against malicious clients). In the
        # semi-honest model that cannot happen, and the 2n verifications are skipped.
        self._verify = registry is not None and masking.variant == "active"

    # ------------------------------------------------------------------ driving

    def requests(self) -> dict[int, bytes]:
        """The current stage's request bytes per client still in the round."""
        started = self.clock()
        if self.done:
            raise ProtocolError("the round is finished; there is nothing to send")
        builder: dict[str, Callable[[], dict[int, bytes]]] = {
            "advertise_keys": self._advertise_requests,
            "share_keys": self._share_requests,
            "masked_input": self._masked_requests,
            "consistency_check": self._consistency_requests,
            "unmask": self._unmask_requests,
        }
        out = builder[self.stage]()
        self._tick(self.stage, started)
        return out

    def receive(self, replies: Mapping[int, bytes | None]) -> None:
        """Take the stage's replies; advance or raise :class:`SecAggAbort`."""
        started = self.clock()
        stage = self.stage
        requested = self.active
        accepted: dict[int, WireMessage] = {}
        expected = m.REPLY_FOR_STAGE[stage]
        for client_id in requested:
            reason, message = self._check_reply(client_id, replies.get(client_id), expected)
            if reason is not None:
                self._drop(client_id, stage, reason)
            elif message is not None:
                accepted[client_id] = message
        handler: dict[str, Callable[[dict[int, Any]], None]] = {
            "advertise_keys": self._collect_advertise,
            "share_keys": self._collect_shares,
            "masked_input": self._collect_masked,
            "consistency_check": self._collect_consistency,
            "unmask": self._collect_unmask,
        }
        try:
            handler[stage](accepted)
        except SecAggAbort as exc:
            self._emit("secagg_aborted", stage=stage, reason=str(exc))
            self._wipe()
            raise
        finally:
            self._tick(stage, started)
        self._emit(
            "secagg_stage",
            stage=stage,
            requested=len(requested),
            replied=len(accepted),
            remaining=len(self.active),
        )

    def exclude(self, client_ids: set[int] | list[int], reason: str) -> None:
        """Treat survivors as dropped (the trust module's verdict) before consistency_check;
        their masked inputs leave the sum and their mask keys are recovered (safe thanks to
        the self mask, Bonawitz et al. §4)."""
        if self.stage != "consistency_check":
            raise ProtocolError(
                f"exclusion is possible after masked_input only, the round is at {self.stage}"
            )
        for client_id in client_ids:
            if client_id in self._masked:
                del self._masked[client_id]
                self._excluded.add(client_id)
                self._drop(client_id, "masked_input", f"excluded: {reason}")
        self._prune_cohorts(set(self._masked), "survivors after exclusion")
        self.u3 = tuple(sorted(self._masked))
        self._require(len(self.u3), "survivors after exclusion", min_cohort=True)

    # ------------------------------------------------------------------ checks

    def _check_reply(
        self, client_id: int, reply: bytes | None, expected: type[WireMessage]
    ) -> tuple[str | None, WireMessage | None]:
        if reply is None:
            return f"no reply at stage {self.stage}", None
        try:
            message = decode_message(reply)
        except MessageError as exc:
            return f"malformed reply: {exc}", None
        if isinstance(message, ClientFailure):
            return f"client failed: {message.reason}", None
        try:
            self.check_reply_message(client_id, message, expected)
        except SecAggAbort as exc:
            return str(exc), None
        return None, message

    def check_reply_message(
        self, client_id: int, message: WireMessage, expected: type[WireMessage]
    ) -> None:
        """Raise :class:`SecAggAbort` naming why one client's reply is unacceptable."""
        if not isinstance(message, expected):
            raise SecAggAbort(
                f"wrong stage: expected {expected.__name__} at {self.stage}, got "
                f"{type(message).__name__}"
            )
        r, a = int(getattr(message, "round")), int(getattr(message, "attempt"))  # noqa: B009
        if (r, a) != (self.round, self.attempt):
            raise SecAggAbort(
                f"wrong round: reply for round {r} attempt {a}, expected round {self.round} "
                f"attempt {self.attempt}"
            )
        sender = int(getattr(message, "sender"))  # noqa: B009
        if sender != client_id:
            raise SecAggAbort(f"wrong sender: reply from client {client_id} claims {sender}")

    def _require(self, count: int, what: str, *, min_cohort: bool = False) -> None:
        t = self.params.threshold
        floor = max(t, self.params.min_cohort) if min_cohort else t
        if count < floor:
            raise SecAggAbort(
                f"below threshold at {self.stage}: {count} {what}, need at least {floor} "
                f"(t={t}, min_cohort={self.params.min_cohort}); no sum is revealed"
            )

    def _prune_cohorts(self, alive: set[int], what: str) -> None:
        """Sub-cohorts: fail every sub-cohort with fewer than t_g of ``alive``; its members
        are dropped and its secrets never asked for (no sum of it is revealed)."""
        for j, block in enumerate(self.cohorts):
            if j in self.failed_cohorts:
                continue
            left = [c for c in block if c in alive]
            t = self.cohort_thresholds[j]
            if len(left) >= t:
                continue
            reason = (
                f"sub-cohort {j} below threshold at {self.stage}: {len(left)} {what}, need "
                f"t_g={t}; its sum is not revealed"
            )
            self._fail_cohort(j, reason)

    def _fail_cohort(self, index: int, reason: str) -> None:
        self.failed_cohorts[index] = reason
        self._emit("secagg_cohort_failed", cohort=index, stage=self.stage, reason=reason)
        for c in self.cohorts[index]:
            self._masked.pop(c, None)
            self._signatures.pop(c, None)
            if c not in self.dropped:
                self._drop(c, self.stage, reason)

    def _drop(self, client_id: int, stage: str, reason: str) -> None:
        self.dropped.setdefault(client_id, f"{stage}: {reason}")
        self.active = tuple(c for c in self.active if c != client_id)
        if self.events is not None:
            self.events.emit(
                "client_dropped",
                round=self.round,
                attempt=self.attempt,
                client=client_id,
                stage=stage,
                reason=reason,
            )

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(event, round=self.round, attempt=self.attempt, **fields)

    def _tick(self, stage: str, started: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + (self.clock() - started)

    def _wipe(self) -> None:
        self._masked.clear()
        self._unmask.clear()
        self._routed.clear()

    # ------------------------------------------------------------------ stages

    def _advertise_requests(self) -> dict[int, bytes]:
        payload = m.AdvertiseKeysIns(
            round=self.round,
            attempt=self.attempt,
            participants=self.participants,
            model_hash=self.model_hash,
            weights=self.weights,
        ).to_bytes()
        return dict.fromkeys(self.active, payload)

    def _collect_advertise(self, accepted: dict[int, m.AdvertiseKeysRes]) -> None:
        digest = self.params.digest()
        for client_id, res in accepted.items():
            if len(res.c_pk) != 32 or len(res.s_pk) != 32 or len(res.signature) != 64:
                self._drop(client_id, self.stage, "wrong length: keys 32 bytes, signature 64")
                continue
            if self._verify and self.registry is not None:
                try:
                    self.registry.verify(
                        client_id,
                        res.signature,
                        m.ADVERTISE_CONTEXT,
                        m.advertise_signed_bytes(
                            self.round, self.attempt, client_id, res.c_pk, res.s_pk, digest
                        ),
                        what="advertised keys",
                    )
                except SecAggAbort as exc:
                    self._drop(client_id, self.stage, str(exc))
                    continue
            self.advertised[client_id] = (res.c_pk, res.s_pk, res.signature)
        keys = [k for c, s, _ in self.advertised.values() for k in (c, s)]
        if len(set(keys)) != len(keys):
            raise SecAggAbort("duplicate keys: two clients advertised the same public key")
        self.active = tuple(sorted(self.advertised))
        self._require(len(self.active), "clients advertised keys")
        signed_keys = [(v, c, s) for v, (c, s, _) in self.advertised.items()]
        if self.params.cohorts:
            seed = cohort_seed(self.round, self.attempt, signed_keys)
            self.cohorts = split_cohorts(self.active, self.params.min_cohort, seed)
            self.cohort_thresholds = tuple(
                self.params.cohort_threshold(len(block)) for block in self.cohorts
            )
            self.neighbours = cohort_neighbours(self.cohorts)
            self._emit(
                "secagg_cohorts",
                cohorts=[list(block) for block in self.cohorts],
                thresholds=list(self.cohort_thresholds),
            )
        else:
            seed = graph_seed(self.round, self.attempt, signed_keys)
            self.neighbours = build_neighbours(self.active, self.params.k, seed)
        # a client holds shares of its neighbours' secrets and of its own
        self._holds = {v: frozenset((*near, v)) for v, near in self.neighbours.items()}
        self.stage = "share_keys"

    def _share_requests(self) -> dict[int, bytes]:
        ids = self.active
        payload = m.ShareKeysIns(
            round=self.round,
            attempt=self.attempt,
            ids=ids,
            c_pks=b"".join(self.advertised[v][0] for v in ids),
            s_pks=b"".join(self.advertised[v][1] for v in ids),
            signatures=b"".join(self.advertised[v][2] for v in ids),
        ).to_bytes()
        return dict.fromkeys(ids, payload)

    def _collect_shares(self, accepted: dict[int, m.ShareKeysRes]) -> None:
        size = m.SHARE_CIPHERTEXT_BYTES
        routed: dict[int, dict[int, bytes]] = {}
        senders: set[int] = set()
        for client_id, res in accepted.items():
            recipients = tuple(res.recipients)
            if recipients != self.neighbours[client_id]:
                self._drop(client_id, self.stage, "wrong recipients: not its graph neighbours")
                continue
            blob = res.ciphertexts
            if len(blob) != size * len(recipients):
                self._drop(client_id, self.stage, "wrong length of the share ciphertexts")
                continue
            senders.add(client_id)
            for i, v in enumerate(recipients):
                inbox = routed.get(v)
                if inbox is None:
                    inbox = routed[v] = {}
                inbox[client_id] = blob[i * size : (i + 1) * size]
        if self.cohorts:
            self._prune_cohorts(
                {c for c in accepted if c not in self.dropped}, "clients sent shares"
            )
        self.u2 = tuple(c for c in sorted(accepted) if c not in self.dropped)
        self.active = self.u2
        u2 = set(self.u2)
        if senders <= u2:  # the usual case: nothing to filter out
            self._routed = {v: routed.get(v, {}) for v in u2}
        else:
            self._routed = {
                v: {u: ct for u, ct in routed.get(v, {}).items() if u in u2} for v in u2
            }
        self._require(len(self.u2), "clients sent shares")
        self.stage = "masked_input"

    def _masked_requests(self) -> dict[int, bytes]:
        out = {}
        for v in self.active:
            incoming = self._routed.get(v, {})
            senders = tuple(sorted(incoming))
            out[v] = m.MaskedInputIns(
                round=self.round,
                attempt=self.attempt,
                senders=senders,
                ciphertexts=b"".join(incoming[u] for u in senders),
            ).to_bytes()
        return out

    def _collect_masked(self, accepted: dict[int, m.MaskedInputRes]) -> None:
        words = self.weights.size + 1
        dtype = self.params.word_dtype
        for client_id, res in accepted.items():
            vector = res.masked32 if dtype == np.uint32 else res.masked64
            other = res.masked64 if dtype == np.uint32 else res.masked32
            if res.pad != m.MASKED_PAD:
                self._drop(client_id, self.stage, "wrong padding in the masked input")
                continue
            if vector.size != words or other.size != 0:
                self._drop(
                    client_id,
                    self.stage,
                    f"wrong length: masked input has {vector.size} words of {dtype}, expected "
                    f"{words}",
                )
                continue
            if self.params.bits < 8 * dtype.itemsize and np.any(
                vector >> dtype.type(self.params.bits)
            ):
                self._drop(
                    client_id, self.stage, f"masked input is not reduced mod 2^{self.params.bits}"
                )
                continue
            self._masked[client_id] = vector
        if self.cohorts:
            self._prune_cohorts(set(self._masked), "masked inputs")
        self.u3 = tuple(sorted(self._masked))
        self.active = self.u3
        self._require(len(self.u3), "masked inputs", min_cohort=True)
        self.stage = "consistency_check"

    def _consistency_requests(self) -> dict[int, bytes]:
        payload = m.ConsistencyCheckIns(
            round=self.round, attempt=self.attempt, survivors=self.u3
        ).to_bytes()
        return dict.fromkeys(self.u3, payload)

    def _collect_consistency(self, accepted: dict[int, m.ConsistencyCheckRes]) -> None:
        for client_id, res in accepted.items():
            if self._verify and self.registry is not None:
                try:
                    self.registry.verify(
                        client_id,
                        res.signature,
                        m.CONSISTENCY_CONTEXT,
                        m.consistency_signed_bytes(
                            self.round, self.attempt, client_id, self.model_hash, self.u3
                        ),
                        what="consistency signature",
                    )
                except SecAggAbort as exc:
                    self._drop_signer(client_id, str(exc))
                    continue
            self._signatures[client_id] = res.signature
        if self.cohorts:
            self._prune_cohorts(set(self._signatures), "consistency signatures")
        signers = tuple(sorted(self._signatures))
        self.active = signers
        self._require(len(signers), "consistency signatures")
        self.stage = "unmask"

    def _drop_signer(self, client_id: int, reason: str) -> None:
        # Its input stays in the sum (it is in U3); it just takes no further part.
        self.dropped.setdefault(client_id, f"consistency_check: {reason}")
        self.active = tuple(c for c in self.active if c != client_id)

    def _unmask_requests(self) -> dict[int, bytes]:
        signers = self.active
        payload = m.UnmaskIns(
            round=self.round,
            attempt=self.attempt,
            signers=signers,
            signatures=b"".join(self._signatures[v] for v in signers),
        ).to_bytes()
        return dict.fromkeys(signers, payload)

    def _collect_unmask(self, accepted: dict[int, m.UnmaskRes]) -> None:
        self._unmask = dict(accepted)
        self.result = self._unmask_sum()
        self.done = True
        self.stage = "done"

    # ------------------------------------------------------------------ unmasking

    def _unmask_sum(self) -> SecAggResult:
        if self.cohorts:
            return self._unmask_cohorts()
        t = self.params.threshold
        u3 = set(self.u3)
        need_s = self._needed_mask_keys(self.u2, u3)
        owners: list[tuple[int, str]] = [(v, "b") for v in self.u3] + [(v, "s") for v in need_s]
        senders, table, present = self._share_table(owners)
        counts = present.sum(axis=0)
        short = np.flatnonzero(counts < t)
        if short.size:
            v, kind = owners[int(short[0])]
            raise SecAggAbort(
                f"below threshold at unmask: {int(counts[short[0]])} shares of client {v}'s "
                f"{'self-mask seed' if kind == 'b' else 'mask key'} (t={t}); "
                f"{short.size} secrets cannot be recovered; no sum is revealed"
            )
        secrets = self._reconstruct(owners, senders, table, present, t)
        out, self_masks = self._unmasked_vector(self.u3, owners, secrets, u3)
        mean, total_weight = decode_mean(self.params, out)
        self._emit(
            "secagg_unmasked",
            survivors=list(self.u3),
            self_masks_recovered=self_masks,
            mask_keys_recovered=len(need_s),
            dropped=sorted(self.dropped),
        )
        self._wipe()
        return SecAggResult(
            mean_update=mean,
            total_weight=total_weight,
            survivors=self.u3,
            dropped={c: r for c, r in self.dropped.items() if c not in u3},
            raw_sum=out,
        )

    def _unmask_cohorts(self) -> SecAggResult:
        """One sum per live sub-cohort, each from its own shares with its own t_g; a
        sub-cohort whose secrets cannot be recovered fails alone (its sum is not revealed)."""
        u3 = set(self.u3)
        live = [j for j in range(len(self.cohorts)) if j not in self.failed_cohorts]
        plan: dict[int, tuple[list[int], list[tuple[int, str]]]] = {}
        owners: list[tuple[int, str]] = []
        for j in live:
            block = set(self.cohorts[j])
            survivors = [v for v in self.u3 if v in block]
            need_s = self._needed_mask_keys([v for v in self.u2 if v in block], u3)
            mine = [(v, "b") for v in survivors] + [(v, "s") for v in need_s]
            plan[j] = (survivors, mine)
            owners.extend(mine)
        senders, table, present = self._share_table(owners)
        column = {key: i for i, key in enumerate(owners)}
        sums: list[CohortSum] = []
        recovered = {"b": 0, "s": 0}
        for j in live:
            survivors, mine = plan[j]
            t = self.cohort_thresholds[j]
            cols = np.array([column[key] for key in mine], dtype=np.intp)
            counts = present[:, cols].sum(axis=0)
            short = np.flatnonzero(counts < t)
            if short.size:
                v, kind = mine[int(short[0])]
                self._fail_cohort(
                    j,
                    f"sub-cohort {j} below threshold at unmask: {int(counts[short[0]])} shares "
                    f"of client {v}'s {'self-mask seed' if kind == 'b' else 'mask key'} "
                    f"(t_g={t}); its sum is not revealed",
                )
                continue
            try:
                secrets = self._reconstruct(mine, senders, table[:, cols], present[:, cols], t)
                out, _ = self._unmasked_vector(tuple(survivors), mine, secrets, u3)
                mean, total_weight = decode_mean(self.params, out)
            except (SecAggAbort, SecflError) as exc:
                self._fail_cohort(j, f"sub-cohort {j} failed at unmask: {exc}")
                continue
            for _, kind in mine:
                recovered[kind] += 1
            sums.append(
                CohortSum(
                    index=j,
                    members=self.cohorts[j],
                    survivors=tuple(survivors),
                    threshold=t,
                    raw_sum=out,
                    mean_update=mean,
                    total_weight=total_weight,
                )
            )
        if not sums:
            raise SecAggAbort(
                "below threshold at unmask: no sub-cohort's secrets could be recovered; no sum "
                "is revealed"
            )
        total = np.zeros(self.weights.size + 1, dtype=self.params.word_dtype)
        for part in sums:
            np.add(total, part.raw_sum, out=total)  # wraps modulo the word size
        reduce_mod(total, self.params.bits)
        mean, total_weight = decode_mean(self.params, total)
        revealed = tuple(sorted(c for part in sums for c in part.survivors))
        self._emit(
            "secagg_unmasked",
            survivors=list(revealed),
            self_masks_recovered=recovered["b"],
            mask_keys_recovered=recovered["s"],
            dropped=sorted(c for c in self.dropped if c not in revealed),
            cohorts={part.index: list(part.survivors) for part in sums},
            failed_cohorts=dict(self.failed_cohorts),
        )
        self._wipe()
        kept = set(revealed)
        return SecAggResult(
            mean_update=mean,
            total_weight=total_weight,
            survivors=revealed,
            dropped={c: r for c, r in self.dropped.items() if c not in kept},
            raw_sum=total,
            cohorts=tuple(sums),
        )

    def _needed_mask_keys(self, shared: list[int] | tuple[int, ...], u3: set[int]) -> list[int]:
        """Dropped clients whose mask keys the sum needs: those in U2 \\ U3 with a surviving
        neighbour that masked with them (u in N(v) ∩ U3 received v's share)."""
        return [
            v
            for v in shared
            if v not in u3
            and any(v in self._routed.get(u, {}) for u in self.neighbours[v] if u in u3)
        ]

    def _share_table(
        self, owners: list[tuple[int, str]]
    ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Scatter every unmask reply into a dense (senders, owners, e) table with one
        vectorised assignment per kind (no per-share Python loop); ``present`` marks the
        shares received. A reply with wrong lengths or shares its sender cannot hold is
        dropped."""
        e = m.SHARE_ELEMENTS
        column = {key: i for i, key in enumerate(owners)}
        senders = sorted(self._unmask)
        table = np.zeros((len(senders), len(owners), e), dtype=np.uint64)
        present = np.zeros((len(senders), len(owners)), dtype=bool)
        for row, sender in enumerate(senders):
            res = self._unmask[sender]
            if len(res.b_shares) != e * len(res.b_owners) or len(res.s_shares) != e * len(
                res.s_owners
            ):
                self._drop_signer(sender, "wrong length of unmask shares")
                continue
            mine = self._holds.get(sender, frozenset())
            if set(res.b_owners) & set(res.s_owners) or not mine.issuperset(
                (*res.b_owners, *res.s_owners)
            ):
                self._drop_signer(sender, "wrong sender: shares it cannot hold")
                continue
            for kind, who, values in (
                ("b", res.b_owners, res.b_shares),
                ("s", res.s_owners, res.s_shares),
            ):
                cols = [column.get((o, kind), -1) for o in who]
                keep = [i for i, c in enumerate(cols) if c >= 0]
                if keep:
                    idx = np.array([cols[i] for i in keep])
                    table[row, idx] = values.reshape(-1, e)[keep]
                    present[row, idx] = True
        return senders, table, present

    def _reconstruct(
        self,
        owners: list[tuple[int, str]],
        senders: list[int],
        table: np.ndarray,
        present: np.ndarray,
        t: int,
    ) -> np.ndarray:
        """All secrets in one batch from the first t holders of each (one stable argsort;
        Lagrange coefficients shared per distinct holder set)."""
        if not owners:
            return np.zeros((0, SECRET_BYTES), dtype=np.uint8)
        first = np.argsort(~present, axis=0, kind="stable")[:t].T  # (owners, t) rows
        sender_ids = np.array(senders, dtype=np.uint64)
        xs = sender_ids[first] + np.uint64(1)
        ys = table[first, np.arange(len(owners))[:, None]]  # (owners, t, e)
        try:
            elements = shamir.reconstruct(xs, ys)
            return shamir.elements_to_secret(elements, SECRET_BYTES)
        except (ProtocolError, SecflError) as exc:
            raise SecAggAbort(f"share reconstruction failed: {exc}") from None

    def _unmasked_vector(
        self,
        survivors: tuple[int, ...],
        owners: list[tuple[int, str]],
        secrets: np.ndarray,
        u3: set[int],
    ) -> tuple[np.ndarray, int]:
        """Σ y_u − Σ PRG(b_u) ± the dropped peers' pair masks (mod 2^b), and how many self
        masks were removed."""
        seed_bytes = self.params.seed_bytes
        self_seeds: list[bytes] = []
        add_seeds: list[bytes] = []
        sub_seeds: list[bytes] = []
        for (v, kind), secret in zip(owners, secrets):
            if kind == "b":
                self_seeds.append(secret[:seed_bytes].tobytes())
                continue
            private = secret.tobytes()
            key = x25519_private(private)
            if public_of(key) != self.advertised[v][1]:
                raise SecAggAbort(
                    f"recovered mask key of client {v} does not match its advertised key "
                    "(corrupted shares); no sum is revealed"
                )
            for u in self.neighbours[v]:
                if u in u3 and v in self._routed.get(u, {}):
                    seed = pair_key(
                        x25519_agree(key, self.advertised[u][1]),
                        "secagg/pair-mask",
                        self.round,
                        self.attempt,
                        u,
                        v,
                        length=seed_bytes,
                    )
                    # u added +PRG(s_uv) when u < v, -PRG(s_uv) when u > v; undo it.
                    (sub_seeds if u < v else add_seeds).append(seed)
        out = np.empty(self.weights.size + 1, dtype=self.params.word_dtype)
        self.engine.accumulate(
            out,
            fill=_zero_fill,
            add_arrays=[self._masked[u] for u in survivors],
            sub_seeds=self_seeds + sub_seeds,
            add_seeds=add_seeds,
        )
        reduce_mod(out, self.params.bits)
        return out, len(self_seeds)


def _zero_fill(lo: int) -> ChunkFill:
    def fill(c0: int, c1: int, out: np.ndarray, /) -> None:
        out.fill(0)

    return fill
