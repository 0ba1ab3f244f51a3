"""The SecAgg client: a sans-I/O state machine with named stages.

Stages (Bonawitz et al. CCS 2017 §4 Fig. 4, with the SecAgg+ graph of Bell et al. CCS 2020
§3): ``advertise_keys`` -> ``share_keys`` -> ``masked_input`` -> ``consistency_check`` ->
``unmask``. Each handler takes the decoded request and returns the reply message; anything
wrong (a message for the wrong stage, round or sender, a replay, a wrong length, a bad
signature, too few peers) raises :class:`~secfl.errors.SecAggAbort` naming the cause, after
the client has wiped every secret of the round.

The rule that keeps a client private (Bonawitz et al. §4, Thm 6.3): for each peer it releases
either the share of the peer's self-mask seed ``b`` (peer survived) or of its mask key ``s``
(peer dropped), never both. :class:`ShareReleaseLog` records every release per (round,
attempt, peer) before the reply leaves, optionally on disk, and refuses the other kind.

With ``cohorts=True`` (the trust module under masking) the client derives the round's split
into sub-cohorts from the advertised keys itself (:func:`secfl.secagg.graph.split_cohorts`)
and masks and shares only inside its own sub-cohort, with that sub-cohort's threshold; a
server that routes shares, or lists senders or signers, outside it is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from secfl.config import MaskingConfig
from secfl.crypto import aead, shamir
from secfl.crypto.hkdf import derive_key
from secfl.crypto.kex import KeyPair
from secfl.crypto.prg import MaskEngine, reduce_mod
from secfl.crypto.sign import SigningKey
from secfl.errors import AuthenticationError, PrivacyError, SecAggAbort, SecflError
from secfl.randomness import Randomness
from secfl.secagg import messages as m
from secfl.secagg.encoding import client_weight, encoding_fill
from secfl.secagg.graph import build_neighbours, cohort_seed, graph_seed, split_cohorts
from secfl.secagg.identity import IdentityRegistry
from secfl.secagg.params import SecAggParams, derive_params

if TYPE_CHECKING:
    from secfl.privacy.distributed import DistributedNoise

#: compute_update(round, attempt, model_hash, weights) -> (float32 delta, num_samples)
ComputeUpdate = Callable[[int, int, bytes, np.ndarray], tuple[np.ndarray, int]]

SECRET_BYTES = 32


def pair_key(
    shared: bytes, label: str, round_index: int, attempt: int, u: int, v: int, length: int = 32
) -> bytes:
    """HKDF of an X25519 secret, bound to the round, attempt and unordered pair {u, v}."""
    low, high = (u, v) if u < v else (v, u)
    return derive_key(shared, label, round_index, attempt, low, high, length=length)


class ShareReleaseLog:
    """Which share kind ("b" or "s") a client released for each (round, attempt, peer).

    With ``path`` every record is appended and fsync'd before the share is sent, so a
    restarted client still refuses to release the other kind.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._released: dict[tuple[int, int, int], str] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self._released[(rec["round"], rec["attempt"], rec["peer"])] = rec["kind"]

    def released(self, round_index: int, attempt: int, peer: int) -> str | None:
        return self._released.get((round_index, attempt, peer))

    def used(self, round_index: int, attempt: int) -> bool:
        return any(k[0] == round_index and k[1] == attempt for k in self._released)

    def record(self, round_index: int, attempt: int, releases: dict[int, str]) -> None:
        """Record all releases of one reply; refuses if any peer already got the other kind."""
        for peer, kind in releases.items():
            earlier = self._released.get((round_index, attempt, peer))
            if earlier is not None and earlier != kind:
                raise SecAggAbort(
                    f"refusing to release the {kind}-share of client {peer} for round "
                    f"{round_index} attempt {attempt}: its {earlier}-share was already released"
                )
        lines = []
        for peer, kind in releases.items():
            self._released[(round_index, attempt, peer)] = kind
            lines.append(
                json.dumps({"round": round_index, "attempt": attempt, "peer": peer, "kind": kind})
            )
        if self.path is not None and lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())


def _wipe(buffer: bytearray | None) -> None:
    if buffer is not None:
        buffer[:] = bytes(len(buffer))


def _prefaulted(size: int, dtype: np.dtype[Any]) -> np.ndarray:
    """A fresh array with every page already touched: writing it later takes no page fault
    (4 MB faulted on first touch inside the masking loop cost ~1-6 ms under memory load)."""
    out = np.empty(size, dtype=dtype)
    out.fill(0)
    return out


class SecAggClient:
    """One client's side of SecAgg/SecAgg+; state lives here and nowhere else."""

    def __init__(
        self,
        client_id: int,
        *,
        masking: MaskingConfig,
        min_cohort: int,
        signing_key: SigningKey,
        registry: IdentityRegistry,
        randomness: Randomness,
        compute_update: ComputeUpdate,
        release_log: ShareReleaseLog | None = None,
        engine: MaskEngine | None = None,
        noise: DistributedNoise | None = None,
        cohorts: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.client_id = client_id
        self.masking = masking
        #: Trust sub-cohorts: mask and share only inside this client's own sub-cohort.
        self.cohorts = cohorts
        #: User-level DP: this client's Skellam share is added before masking.
        self.noise = noise
        self.min_cohort = min_cohort
        self._signing_key = signing_key
        self.registry = registry
        self.randomness = randomness
        self.compute_update = compute_update
        self.release_log = release_log if release_log is not None else ShareReleaseLog()
        self.engine = engine if engine is not None else MaskEngine(threads=masking.threads)
        self.clock = clock
        #: Simulation hooks for the adversary adapter (:mod:`secfl.attacks.simulation`):
        #: ``source(round, attempt)`` replaces training (a malicious client's crafted update,
        #: masked like any other); ``tap(round, attempt, delta)`` sees the trained update (the
        #: omniscient adversary's view). Both None outside simulated attacks.
        self.source: Callable[[int, int], tuple[np.ndarray, int]] | None = None
        self.tap: Callable[[int, int, np.ndarray], None] | None = None
        self.timings: dict[str, float] = {}
        self.stage = "idle"
        self.round = -1
        self.attempt = -1
        self._reset_round_state()

    # ------------------------------------------------------------------ state

    def _reset_round_state(self) -> None:
        self.params: SecAggParams | None = None
        self.participants: tuple[int, ...] = ()
        self._c: KeyPair | None = None
        self._s: KeyPair | None = None
        self._b: bytearray | None = None
        self._model_hash = b""
        self._weights: np.ndarray | None = None
        self.neighbours: tuple[int, ...] = ()
        #: This round's threshold: params.threshold, or the own sub-cohort's t_g.
        self.threshold = 0
        #: Sub-cohorts: the own block (sorted ids) and its index in the split.
        self.cohort: tuple[int, ...] = ()
        self.cohort_index = -1
        self._advertised: dict[int, tuple[bytes, bytes]] = {}
        self._share_keys: dict[int, bytearray] = {}
        self._mask_seeds: dict[int, bytearray] = {}
        self._own_shares: tuple[np.ndarray, np.ndarray] | None = None
        self._ciphertexts: dict[int, bytes] = {}
        # The masked-input output buffer, allocated and pre-faulted at share_keys (off the
        # critical path that follows training). Ownership: it passes to the MaskedInputRes
        # that mask_update's result goes into, and this client never touches it again; the
        # next round allocates a new one. So no message ever aliases a buffer that is later
        # overwritten. It holds no secret before masking (all zeros).
        self._out: np.ndarray | None = None
        self.senders: tuple[int, ...] = ()
        self.survivors: tuple[int, ...] = ()

    def wipe(self) -> None:
        """Zero and drop every secret of the current round (keys, seeds, shares)."""
        for pair in (self._c, self._s):
            if pair is not None:
                pair.wipe()
        _wipe(self._b)
        for buf in (*self._share_keys.values(), *self._mask_seeds.values()):
            _wipe(buf)
        if self._own_shares is not None:
            for array in self._own_shares:
                array.fill(0)
        self._reset_round_state()

    @property
    def holds_secrets(self) -> bool:
        return bool(
            self._c is not None
            or self._s is not None
            or self._b is not None
            or self._share_keys
            or self._mask_seeds
            or self._own_shares is not None
        )

    def _abort(self, cause: str) -> SecAggAbort:
        self.wipe()
        self.stage = "aborted"
        return SecAggAbort(f"client {self.client_id} aborted: {cause}")

    def _run(self, stage: str, step: Callable[[], m.WireMessage]) -> m.WireMessage:
        started = self.clock()
        try:
            reply = step()
        except SecAggAbort as exc:
            raise self._abort(str(exc)) from None
        except SecflError as exc:
            raise self._abort(f"{type(exc).__name__} at {stage}: {exc}") from None
        self.timings[stage] = self.clock() - started
        return reply

    def _expect(self, message: m.WireMessage, stage: str, previous: str) -> None:
        r, a = int(getattr(message, "round")), int(getattr(message, "attempt"))  # noqa: B009
        if (r, a) != (self.round, self.attempt):
            raise SecAggAbort(
                f"wrong round: {stage} request for round {r} attempt {a}, this client is in "
                f"round {self.round} attempt {self.attempt}"
            )
        order = m.STAGES
        if self.stage == stage or (
            self.stage in order and order.index(self.stage) > order.index(stage)
        ):
            raise SecAggAbort(f"replay: a second {stage} request for round {r} attempt {a}")
        if self.stage != previous:
            raise SecAggAbort(
                f"wrong stage: got a {stage} request, expected the request after {self.stage!r}"
            )

    # ------------------------------------------------------------------ stages

    def on_advertise_keys(self, msg: m.AdvertiseKeysIns) -> m.AdvertiseKeysRes:
        return self._run("advertise_keys", lambda: self._advertise(msg))  # type: ignore[return-value]

    def _advertise(self, msg: m.AdvertiseKeysIns) -> m.AdvertiseKeysRes:
        key = (msg.round, msg.attempt)
        if key <= (self.round, self.attempt):
            kind = "replay" if key == (self.round, self.attempt) else "stale round"
            raise SecAggAbort(
                f"{kind}: advertise_keys for round {msg.round} attempt {msg.attempt}, already "
                f"at round {self.round} attempt {self.attempt}"
            )
        if self.release_log.used(msg.round, msg.attempt):
            raise SecAggAbort(
                f"replay: shares were already released for round {msg.round} attempt "
                f"{msg.attempt}; a retried round must use a fresh attempt"
            )
        self.wipe()
        self.round, self.attempt = key
        self.stage = "starting"
        ids = tuple(msg.participants)
        if list(ids) != sorted(set(ids)):
            raise SecAggAbort("wrong participants: the list must be strictly ascending ids")
        if self.client_id not in ids:
            raise SecAggAbort("wrong recipient: this client is not among the participants")
        self.params = derive_params(
            self.masking,
            n=len(ids),
            min_cohort=self.min_cohort,
            noise=self.noise,
            cohorts=self.cohorts,
        )
        self.participants = ids
        self._model_hash = bytes(msg.model_hash)
        self._weights = msg.weights
        stream = self.randomness.stream(
            "secagg.keys", round_index=msg.round, attempt=msg.attempt, party=self._party
        )
        source = None if stream.secure else stream.bytes
        self._c = KeyPair.generate(source)
        self._s = KeyPair.generate(source)
        self._b = bytearray(stream.bytes(self.params.seed_bytes))
        signed = m.advertise_signed_bytes(
            msg.round,
            msg.attempt,
            self.client_id,
            self._c.public,
            self._s.public,
            self.params.digest(),
        )
        self.stage = "advertise_keys"
        return m.AdvertiseKeysRes(
            round=msg.round,
            attempt=msg.attempt,
            sender=self.client_id,
            c_pk=self._c.public,
            s_pk=self._s.public,
            signature=self._signing_key.sign(m.ADVERTISE_CONTEXT, signed),
        )

    @property
    def _party(self) -> str:
        return f"client:{self.client_id}"

    def on_share_keys(self, msg: m.ShareKeysIns) -> m.ShareKeysRes:
        return self._run("share_keys", lambda: self._share(msg))  # type: ignore[return-value]

    def _share(self, msg: m.ShareKeysIns) -> m.ShareKeysRes:
        self._expect(msg, "share_keys", "advertise_keys")
        params, c, s, b = self.params, self._c, self._s, self._b
        if params is None or c is None or s is None or b is None:
            raise SecAggAbort("wrong stage: no keys were advertised")
        ids = tuple(msg.ids)
        count = len(ids)
        if list(ids) != sorted(set(ids)) or not set(ids) <= set(self.participants):
            raise SecAggAbort("wrong sender: the key list names ids outside the participants")
        if len(msg.c_pks) != 32 * count or len(msg.s_pks) != 32 * count:
            raise SecAggAbort(f"wrong length: {count} ids need {32 * count} bytes of keys each")
        if len(msg.signatures) != 64 * count:
            raise SecAggAbort(f"wrong length: {count} ids need {64 * count} signature bytes")
        if self.client_id not in ids:
            raise SecAggAbort("wrong recipient: this client's keys are not in the key list")
        if count < params.threshold:
            raise SecAggAbort(
                f"below threshold: {count} clients advertised keys, threshold t={params.threshold}"
            )
        advertised: dict[int, tuple[bytes, bytes]] = {}
        digest = params.digest()
        for i, v in enumerate(ids):
            c_pk = msg.c_pks[32 * i : 32 * i + 32]
            s_pk = msg.s_pks[32 * i : 32 * i + 32]
            sig = msg.signatures[64 * i : 64 * i + 64]
            self.registry.verify(
                v,
                sig,
                m.ADVERTISE_CONTEXT,
                m.advertise_signed_bytes(msg.round, msg.attempt, v, c_pk, s_pk, digest),
                what="advertised keys",
            )
            advertised[v] = (c_pk, s_pk)
        if advertised[self.client_id] != (c.public, s.public):
            raise SecAggAbort(
                "substituted key: the server altered this client's own advertised keys"
            )
        all_keys = [k for pair in advertised.values() for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggAbort("duplicate keys: two advertised public keys are equal")
        keys = [(v, cp, sp) for v, (cp, sp) in advertised.items()]
        if params.cohorts:
            # Derived here from the signed keys, never taken from the server.
            split = split_cohorts(ids, params.min_cohort, cohort_seed(msg.round, msg.attempt, keys))
            self.cohort_index = next(j for j, b in enumerate(split) if self.client_id in b)
            self.cohort = split[self.cohort_index]
            neighbours = tuple(v for v in self.cohort if v != self.client_id)
            self.threshold = params.cohort_threshold(len(self.cohort))
        else:
            seed = graph_seed(msg.round, msg.attempt, keys)
            neighbours = build_neighbours(ids, params.k, seed)[self.client_id]
            self.threshold = params.threshold
        if len(neighbours) + 1 < self.threshold:
            raise SecAggAbort(
                f"below threshold: {len(neighbours)} neighbours + self < t={self.threshold}"
            )
        self._advertised = advertised
        self.neighbours = neighbours
        holders = (*neighbours, self.client_id)
        secrets = np.zeros((2, SECRET_BYTES), dtype=np.uint8)
        secrets[0, : len(b)] = np.frombuffer(bytes(b), dtype=np.uint8)
        secrets[1] = np.frombuffer(s.private_bytes, dtype=np.uint8)
        stream = self.randomness.stream(
            "secagg.shamir", round_index=msg.round, attempt=msg.attempt, party=self._party
        )
        shares = shamir.split(
            shamir.secret_to_elements(secrets),
            [h + 1 for h in holders],
            self.threshold,
            lambda high, size: stream.integers(high, size),
        )  # (holders, 2, m)
        secrets.fill(0)
        blobs = []
        for j, v in enumerate(neighbours):
            c_pk_v, s_pk_v = advertised[v]
            key = bytearray(
                pair_key(
                    c.agree(c_pk_v), "secagg/share-key", msg.round, msg.attempt, self.client_id, v
                )
            )
            self._share_keys[v] = key
            self._mask_seeds[v] = bytearray(
                pair_key(
                    s.agree(s_pk_v),
                    "secagg/pair-mask",
                    msg.round,
                    msg.attempt,
                    self.client_id,
                    v,
                    length=params.seed_bytes,
                )
            )
            plaintext = m.SHARE_PLAINTEXT.pack(
                self.client_id, v, *shares[j, 0].tolist(), *shares[j, 1].tolist()
            )
            blobs.append(
                aead.seal(
                    bytes(key),
                    aead.direction_nonce(self.client_id, v),
                    plaintext,
                    m.share_associated_data(msg.round, msg.attempt, self.client_id, v),
                )
            )
        self._own_shares = (shares[-1, 0].copy(), shares[-1, 1].copy())
        shares.fill(0)
        if self._weights is not None:
            self._out = _prefaulted(self._weights.size + 1, params.word_dtype)
        self.stage = "share_keys"
        return m.ShareKeysRes(
            round=msg.round,
            attempt=msg.attempt,
            sender=self.client_id,
            recipients=neighbours,
            ciphertexts=b"".join(blobs),
        )

    def on_masked_input(self, msg: m.MaskedInputIns) -> m.MaskedInputRes:
        return self._run("masked_input", lambda: self._mask(msg))  # type: ignore[return-value]

    def _mask(self, msg: m.MaskedInputIns) -> m.MaskedInputRes:
        self._expect(msg, "masked_input", "share_keys")
        params, b, weights = self.params, self._b, self._weights
        if params is None or b is None or weights is None:
            raise SecAggAbort("wrong stage: no shares were sent")
        senders = tuple(msg.senders)
        if list(senders) != sorted(set(senders)):
            raise SecAggAbort("wrong sender list: ids must be strictly ascending")
        stray = set(senders) - set(self.neighbours)
        if stray:
            where = (
                f"outside this client's sub-cohort {self.cohort_index} {list(self.cohort)}"
                if self.cohorts
                else "from non-neighbours"
            )
            raise SecAggAbort(f"wrong sender: shares {where}: {sorted(stray)}")
        if len(msg.ciphertexts) != len(senders) * m.SHARE_CIPHERTEXT_BYTES:
            raise SecAggAbort(
                f"wrong length: {len(senders)} shares need "
                f"{len(senders) * m.SHARE_CIPHERTEXT_BYTES} bytes, got {len(msg.ciphertexts)}"
            )
        if len(senders) + 1 < self.threshold:
            raise SecAggAbort(
                f"below threshold: shares from {len(senders)} neighbours + self < "
                f"t={self.threshold}"
            )
        size = m.SHARE_CIPHERTEXT_BYTES
        self._ciphertexts = {
            v: msg.ciphertexts[i * size : (i + 1) * size] for i, v in enumerate(senders)
        }
        self.senders = senders
        started = self.clock()
        if self.source is not None:
            delta, num_samples = self.source(msg.round, msg.attempt)
        else:
            delta, num_samples = self.compute_update(
                msg.round, msg.attempt, self._model_hash, weights
            )
        if self.tap is not None:
            self.tap(msg.round, msg.attempt, delta)
        self.timings["train"] = self.clock() - started
        self.timings["masked_input_mask"] = 0.0
        started = self.clock()
        masked = self.mask_update(delta, num_samples)
        self.timings["masked_input_mask"] = self.clock() - started
        self._weights = None
        # From here on only the share keys and own shares are needed (Bonawitz et al. §4):
        # the key pairs and the self-mask seed go.
        for pair in (self._c, self._s):
            if pair is not None:
                pair.wipe()
        _wipe(self._b)
        self._c = self._s = None
        self._b = None
        self.stage = "masked_input"
        empty32 = np.zeros(0, dtype=np.uint32)
        empty64 = np.zeros(0, dtype=np.uint64)
        return m.MaskedInputRes(
            round=msg.round,
            attempt=msg.attempt,
            sender=self.client_id,
            masked32=masked if masked.dtype == np.uint32 else empty32,
            masked64=masked if masked.dtype == np.uint64 else empty64,
        )

    def mask_update(self, delta: np.ndarray, num_samples: int) -> np.ndarray:
        """Encode ``delta`` and add the self mask and the pairwise masks with U2 neighbours.

        y = encode(x) + PRG(b) + sum_{v in U2 ∩ N(u), u < v} PRG(s_uv)
                                 - sum_{v in U2 ∩ N(u), u > v} PRG(s_uv)     (mod 2^b)
        """
        params, b = self.params, self._b
        if params is None or b is None or self._weights is None:
            raise SecAggAbort("wrong stage: nothing to mask")
        if delta.ndim != 1 or delta.size != self._weights.size:
            raise SecAggAbort(
                f"wrong length: update has shape {delta.shape}, model has {self._weights.size}"
            )
        noise_share: np.ndarray | None = None
        if self.noise is not None:
            # user-level DP: clip to C with the weight folded in, then encode with weight 1
            if params.weighting != "uniform":
                raise SecAggAbort("user-level DP needs uniform SecAgg weights (weight folded in)")
            try:
                delta = self.noise.client_value(delta, num_samples)
            except PrivacyError as exc:
                raise SecAggAbort(f"cannot privatise the update: {exc}") from None
            num_samples = 1
            noise_share = self.noise.client_noise(
                self.randomness.stream(
                    "secagg.dp_noise",
                    round_index=self.round,
                    attempt=self.attempt,
                    party=self._party,
                ),
                self.threshold,
            )
        weight = client_weight(params, num_samples)
        rounding = self.randomness.stream(
            "secagg.rounding", round_index=self.round, attempt=self.attempt, party=self._party
        ).bytes(32)
        out, self._out = self._out, None  # handed over to the caller (see _reset_round_state)
        if out is None or out.size != delta.size + 1 or out.dtype != params.word_dtype:
            out = np.empty(delta.size + 1, dtype=params.word_dtype)
        plus = [bytes(b)] + [bytes(self._mask_seeds[v]) for v in self.senders if self.client_id < v]
        minus = [bytes(self._mask_seeds[v]) for v in self.senders if self.client_id > v]
        self.engine.accumulate(
            out,
            add_seeds=plus,
            sub_seeds=minus,
            fill=encoding_fill(params, delta, weight, rounding, self.engine.chunk_words),
        )
        if noise_share is not None:
            # Skellam share in Z_{2^b}: int64 -> word wraps modulo 2^64 or 2^32, then mod 2^b
            view = out[: noise_share.size]
            np.add(view, noise_share.astype(out.dtype), out=view)
            noise_share.fill(0)  # whoever learns a share can subtract it from the sum
        reduce_mod(out, params.bits)
        # The pairwise seeds are not needed again: the server recovers a dropped peer's masks
        # from that peer's key s, never from ours.
        for buf in self._mask_seeds.values():
            _wipe(buf)
        self._mask_seeds = {}
        return out

    def on_consistency_check(self, msg: m.ConsistencyCheckIns) -> m.ConsistencyCheckRes:
        return self._run("consistency_check", lambda: self._check(msg))  # type: ignore[return-value]

    def _check(self, msg: m.ConsistencyCheckIns) -> m.ConsistencyCheckRes:
        self._expect(msg, "consistency_check", "masked_input")
        params = self.params
        if params is None:
            raise SecAggAbort("wrong stage")
        survivors = tuple(msg.survivors)
        if list(survivors) != sorted(set(survivors)):
            raise SecAggAbort("wrong survivor list: ids must be strictly ascending")
        if self.client_id not in survivors:
            raise SecAggAbort("excluded: this client is not among the survivors")
        if not set(survivors) <= set(self._advertised):
            raise SecAggAbort("wrong sender: survivors include ids that never advertised keys")
        if len(survivors) < params.min_cohort:
            raise SecAggAbort(
                f"below min_cohort: {len(survivors)} survivors, aggregation.min_cohort="
                f"{params.min_cohort}"
            )
        mine = set(survivors) & {*self.senders, self.client_id}
        if len(mine) < self.threshold:
            raise SecAggAbort(
                f"below threshold: {len(mine)} surviving share holders < t={self.threshold}"
            )
        self.survivors = survivors
        signed = m.consistency_signed_bytes(
            msg.round, msg.attempt, self.client_id, self._model_hash, survivors
        )
        self.stage = "consistency_check"
        return m.ConsistencyCheckRes(
            round=msg.round,
            attempt=msg.attempt,
            sender=self.client_id,
            signature=self._signing_key.sign(m.CONSISTENCY_CONTEXT, signed),
        )

    def on_unmask(self, msg: m.UnmaskIns) -> m.UnmaskRes:
        return self._run("unmask", lambda: self._unmask(msg))  # type: ignore[return-value]

    def _unmask(self, msg: m.UnmaskIns) -> m.UnmaskRes:
        self._expect(msg, "unmask", "consistency_check")
        params, own = self.params, self._own_shares
        if params is None or own is None:
            raise SecAggAbort("wrong stage")
        signers = tuple(msg.signers)
        if list(signers) != sorted(set(signers)) or not set(signers) <= set(self.survivors):
            raise SecAggAbort("wrong sender: consistency signatures from non-survivors")
        if len(msg.signatures) != 64 * len(signers):
            raise SecAggAbort(
                f"wrong length: {len(signers)} signers need {64 * len(signers)} bytes"
            )
        # Sub-cohorts: only signers of the own sub-cohort vouch for the survivor set this
        # client's shares unmask (the other sub-cohorts' sums do not involve its secrets).
        counted = [v for v in signers if v in self.cohort] if self.cohorts else list(signers)
        if len(counted) < self.threshold:
            raise SecAggAbort(
                f"below threshold: {len(counted)} consistency signatures < t={self.threshold}"
            )
        for i, v in enumerate(signers):
            self.registry.verify(
                v,
                msg.signatures[64 * i : 64 * i + 64],
                m.CONSISTENCY_CONTEXT,
                m.consistency_signed_bytes(
                    msg.round, msg.attempt, v, self._model_hash, self.survivors
                ),
                what="consistency signature",
            )
        survivors = set(self.survivors)
        releases = {v: ("b" if v in survivors else "s") for v in (*self.senders, self.client_id)}
        b_owners: list[int] = []
        s_owners: list[int] = []
        b_shares: list[np.ndarray] = []
        s_shares: list[np.ndarray] = []
        for v in (*self.senders, self.client_id):
            pair = own if v == self.client_id else self._open_share(v)
            if releases[v] == "b":
                b_owners.append(v)
                b_shares.append(pair[0])
            else:
                s_owners.append(v)
                s_shares.append(pair[1])
        self.release_log.record(msg.round, msg.attempt, releases)
        reply = m.UnmaskRes(
            round=msg.round,
            attempt=msg.attempt,
            sender=self.client_id,
            b_owners=tuple(b_owners),
            b_shares=np.concatenate(b_shares).astype(np.uint32)
            if b_shares
            else np.zeros(0, np.uint32),
            s_owners=tuple(s_owners),
            s_shares=np.concatenate(s_shares).astype(np.uint32)
            if s_shares
            else np.zeros(0, np.uint32),
        )
        self.wipe()
        self.stage = "unmask"
        return reply

    def _open_share(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        key = self._share_keys.get(v)
        blob = self._ciphertexts.get(v)
        if key is None or blob is None:
            raise SecAggAbort(f"wrong sender: no share from client {v}")
        try:
            plaintext = aead.open_sealed(
                bytes(key),
                aead.direction_nonce(v, self.client_id),
                blob,
                m.share_associated_data(self.round, self.attempt, v, self.client_id),
            )
        except AuthenticationError:
            raise SecAggAbort(
                f"bad ciphertext: the share from client {v} does not authenticate"
            ) from None
        fields = m.SHARE_PLAINTEXT.unpack(plaintext)
        if fields[0] != v or fields[1] != self.client_id:
            raise SecAggAbort(f"wrong sender: share from client {v} names {fields[0]}->{fields[1]}")
        e = m.SHARE_ELEMENTS
        values = np.array(fields[2:], dtype=np.uint64)
        return values[:e], values[e:]
