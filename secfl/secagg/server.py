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
from secfl.secagg.graph import build_neighbours, graph_seed
from secfl.secagg.identity import IdentityRegistry
from secfl.secagg.params import NoiseHeadroom, SecAggParams, derive_params
from secfl.wire import WireMessage, decode_message

register_event("secagg_stage", ("round", "attempt", "stage", "requested", "replied", "remaining"))
register_event("secagg_aborted", ("round", "attempt", "stage", "reason"))
register_event(
    "secagg_unmasked",
    ("round", "attempt", "survivors", "self_masks_recovered", "mask_keys_recovered", "dropped"),
)


@dataclass(frozen=True, eq=False)
class SecAggResult:
    mean_update: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]
    dropped: dict[int, str] = field(default_factory=dict)
    #: The unmasked integer sum (d + 1 words mod 2^b); tests compare it with plaintext.
    raw_sum: np.ndarray | None = None


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
                masking, n=len(self.participants), min_cohort=min_cohort, noise=noise
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
        seed = graph_seed(
            self.round, self.attempt, [(v, c, s) for v, (c, s, _) in self.advertised.items()]
        )
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
        t = self.params.threshold
        e = m.SHARE_ELEMENTS
        u3 = set(self.u3)
        dropped_after_sharing = [v for v in self.u2 if v not in u3]
        # Which dropped clients' keys are needed: those with a surviving neighbour that masked
        # with them (v in U2 and u in N(v) ∩ U3 received v's share).
        need_s = [
            v
            for v in dropped_after_sharing
            if any(v in self._routed.get(u, {}) for u in self.neighbours[v] if u in u3)
        ]
        # owner -> row of a dense (senders, owners, e) table; every reply is scattered into
        # it with one vectorised assignment per kind, then the first t holders of every
        # secret are picked with one stable argsort (no per-share Python loop).
        owners: list[tuple[int, str]] = [(v, "b") for v in self.u3] + [(v, "s") for v in need_s]
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
        counts = present.sum(axis=0)
        short = np.flatnonzero(counts < t)
        if short.size:
            v, kind = owners[int(short[0])]
            raise SecAggAbort(
                f"below threshold at unmask: {int(counts[short[0]])} shares of client {v}'s "
                f"{'self-mask seed' if kind == 'b' else 'mask key'} (t={t}); "
                f"{short.size} secrets cannot be recovered; no sum is revealed"
            )
        if owners:
            first = np.argsort(~present, axis=0, kind="stable")[:t].T  # (owners, t) rows
            sender_ids = np.array(senders, dtype=np.uint64)
            xs = sender_ids[first] + np.uint64(1)
            ys = table[first, np.arange(len(owners))[:, None]]  # (owners, t, e)
            try:
                elements = shamir.reconstruct(xs, ys)
                secrets = shamir.elements_to_secret(elements, SECRET_BYTES)
            except (ProtocolError, SecflError) as exc:
                raise SecAggAbort(f"share reconstruction failed: {exc}") from None
        else:
            secrets = np.zeros((0, SECRET_BYTES), dtype=np.uint8)
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
            add_arrays=[self._masked[u] for u in self.u3],
            sub_seeds=self_seeds + sub_seeds,
            add_seeds=add_seeds,
        )
        reduce_mod(out, self.params.bits)
        mean, total_weight = decode_mean(self.params, out)
        self._emit(
            "secagg_unmasked",
            survivors=list(self.u3),
            self_masks_recovered=len(self_seeds),
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


def _zero_fill(lo: int) -> ChunkFill:
    def fill(c0: int, c1: int, out: np.ndarray, /) -> None:
        out.fill(0)

    return fill
