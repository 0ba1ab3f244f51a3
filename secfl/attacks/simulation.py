"""The adversary in simulation, mode ``none``: a transport wrapper around the clients.

:class:`AdversarialTransport` sits between the server's protocol and the in-process clients
(inside the dropout simulator, so it sees only the clients a round actually reached). For a
round's :class:`~secfl.messages.FitIns` it

1. points each malicious participant's training data at its poisoned copy (data attacks, in
   the active rounds; the clean data otherwise),
2. forwards the broadcast and lets every client train,
3. in the active rounds decodes the malicious participants' replies (their own updates) and,
   when the adversary is omniscient, the honest ones, has :meth:`Adversary.craft_round`
   craft the malicious updates, and replaces each malicious reply by a :class:`FitRes` with
   the same round, attempt, client, model hash, sample count and loss and the crafted update,
4. logs every replaced update as an ``adversary_update`` event.

The server's protocol is untouched: it receives bytes, as it would from real clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from secfl.attacks.adversary import (
    ADAPTED_MODES,
    Adversary,
    malicious_count,
    select_malicious,
)
from secfl.attacks.base import get_attack, load_plugin
from secfl.audit.events import EventLog, read_events, register_event
from secfl.data.datasets import Dataset
from secfl.errors import ConfigError, MessageError
from secfl.messages import FitIns, FitRes
from secfl.randomness import Randomness
from secfl.transport.base import Transport
from secfl.wire import decode_message

if TYPE_CHECKING:
    from secfl.client.app import ClientApp
    from secfl.config import AdversaryConfig, RunConfig

register_event("adversary_selected", ("attack", "clients", "setting"))
register_event("adversary_update", ("round", "attempt", "client", "attack"))


def build_adversary(
    config: AdversaryConfig,
    client_ids: Sequence[int],
    randomness: Randomness,
    events: EventLog,
) -> tuple[Adversary, bool]:
    """The run's adversary, and whether its selection is new (not yet in the event log).

    The malicious ids come from the ``adversary.select`` stream; a resumed run reuses the
    ids its event log recorded (in ``os`` mode a fresh draw would change who is malicious
    halfway through the run)."""
    if config.plugin is not None:
        load_plugin(config.plugin, config.attack)
    attack = get_attack(config.attack, config.params)
    count = malicious_count(len(client_ids), fraction=config.fraction, count=config.count)
    rounds = (config.rounds[0], config.rounds[1]) if config.rounds else None
    previous = _recorded_selection(events, config.attack)
    if previous is not None:
        if len(previous) != count or not set(previous) <= set(client_ids):
            raise ConfigError(
                f"the event log records malicious clients {previous}, which do not fit "
                f"{count} malicious clients among {len(client_ids)}"
            )
        malicious = tuple(previous)
    else:
        malicious = select_malicious(client_ids, count, randomness.stream("adversary.select"))
    adversary = Adversary(
        attack=attack,
        malicious=frozenset(malicious),
        collusion=config.collusion,
        omniscient=config.omniscient,
        rounds=rounds,
    )
    return adversary, previous is None


def _recorded_selection(events: EventLog, attack: str) -> list[int] | None:
    if not events.path.exists():
        return None
    chosen: list[int] | None = None
    for event in read_events(events.path):
        if event.get("event") == "adversary_selected" and event.get("attack") == attack:
            chosen = [int(c) for c in event["clients"]]
    return chosen


class AdversarialTransport:
    """Wraps ``inner`` (the clients' transport); see the module docstring."""

    def __init__(
        self,
        inner: Transport,
        adversary: Adversary,
        *,
        randomness: Randomness,
        events: EventLog,
        clients: Mapping[int, ClientApp] | None = None,
        announce: bool = True,
    ) -> None:
        self.inner = inner
        self.adversary = adversary
        self.randomness = randomness
        self.events = events
        #: Log ``adversary_selected`` (the ground truth for evaluations) at the first round.
        self._announce = announce
        #: (clean, poisoned) training data of each malicious client (data attacks only).
        self._data: dict[int, tuple[Dataset, Dataset]] = {}
        self._clients: dict[int, ClientApp] = {}
        #: Every simulated client (the ckks adapter reaches their CKKS sides' hooks).
        self._apps: dict[int, ClientApp] = dict(clients or {})
        if adversary.poisons_data:
            for client_id in sorted(adversary.malicious):
                if clients is None or client_id not in clients:
                    raise ConfigError(
                        f"attack {adversary.attack.name!r} poisons data: malicious client "
                        f"{client_id} must be a simulated ClientApp"
                    )
                client = clients[client_id]
                self._clients[client_id] = client
                self._data[client_id] = (client.data, adversary.poison_dataset(client.data))

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        if not requests:
            return {}
        try:
            broadcast = decode_message(next(iter(requests.values())))
        except MessageError:
            return self.inner.exchange(requests)
        if not isinstance(broadcast, FitIns):
            return self.inner.exchange(requests)
        self._announce_once()
        active = self._prepare_round(broadcast.round, requests)
        replies = self.inner.exchange(requests)
        if not active:
            return replies
        return self._replace_malicious(broadcast, requests, replies)

    def _announce_once(self) -> None:
        """Log ``adversary_selected`` (the evaluations' ground truth) at the first round."""
        if self._announce:
            self._announce = False
            self.events.emit(
                "adversary_selected",
                attack=self.adversary.attack.name,
                clients=sorted(self.adversary.malicious),
                setting=self.adversary.describe(),
            )

    def _prepare_round(self, round_index: int, requests: Mapping[int, bytes]) -> bool:
        """Point each malicious participant at its poisoned data in an active round (its
        clean data otherwise); whether the attack is active this round."""
        active = self.adversary.is_active(round_index)
        for client_id, (clean, poisoned) in self._data.items():
            if client_id in requests:
                self._clients[client_id].data = poisoned if active else clean
        return active

    def _side_lookup(
        self, side_of_app: Callable[[ClientApp], Any], label: str
    ) -> Callable[[int], Any]:
        """Each participant's protocol side (its SecAgg or CKKS state machine)."""

        def side_of(client_id: int) -> Any:
            app = self._apps.get(client_id)
            side = None if app is None else side_of_app(app)
            if side is None:
                raise ConfigError(f"client {client_id} has no simulated {label} side to attack")
            return side

        return side_of

    def _craft_before_protection(
        self,
        broadcast: FitIns,
        requests: Mapping[int, bytes],
        *,
        side_of: Callable[[int], Any],
        install_tap: Callable[[Any, Callable[[int, int, np.ndarray], None]], None],
        install_source: Callable[[Any, np.ndarray, int], None],
    ) -> dict[int, bytes | None]:
        """Modes where the server never sees an update (``masking``, ``ckks``): the crafted
        update must go into the malicious client's own protocol side before it masks or
        encrypts. Honest participants are reached first (a tap on their protocol side
        records each trained plaintext update when the adversary is omniscient: the
        simulation's stand-in for an omniscient adversary's view); then the adversary trains
        its own participants, crafts, installs each crafted update as that client's update
        source and reaches them; they mask or encrypt it like any update. Client-id order
        throughout, so ``seeded`` runs are deterministic."""
        malicious = sorted(c for c in requests if self.adversary.is_malicious(c))
        honest_ids = sorted(c for c in requests if c not in self.adversary.malicious)
        sides = {client_id: side_of(client_id) for client_id in sorted(requests)}
        seen: dict[int, np.ndarray] = {}

        def tap_for(client_id: int) -> Callable[[int, int, np.ndarray], None]:
            def tap(round_index: int, attempt: int, delta: np.ndarray) -> None:
                if (round_index, attempt) == (broadcast.round, broadcast.attempt):
                    seen[client_id] = np.array(delta, dtype=np.float32)

            return tap

        try:
            if self.adversary.omniscient:
                for client_id in honest_ids:
                    install_tap(sides[client_id], tap_for(client_id))
            replies = self.inner.exchange({c: requests[c] for c in honest_ids})
        finally:
            for client_id in honest_ids:
                sides[client_id].tap = None
        if not malicious:
            return {c: replies.get(c) for c in requests}
        benign: dict[int, np.ndarray] = {}
        samples: dict[int, int] = {}
        for client_id in malicious:
            delta, result = self._apps[client_id].train(broadcast)  # the adversary's own
            benign[client_id] = delta
            samples[client_id] = int(result.num_samples)
        crafted = self.adversary.craft_round(
            broadcast.round,
            broadcast.attempt,
            num_participants=len(requests),
            benign=benign,
            honest=seen,
            stream=self.randomness.stream(
                "adversary.craft",
                round_index=broadcast.round,
                attempt=broadcast.attempt,
                party="adversary",
            ),
        )
        try:
            for client_id in malicious:
                install_source(sides[client_id], crafted.updates[client_id], samples[client_id])
            replies.update(self.inner.exchange({c: requests[c] for c in malicious}))
        finally:
            for client_id in malicious:
                sides[client_id].source = None
        for client_id in malicious:
            update = crafted.updates[client_id]
            self.events.emit(
                "adversary_update",
                round=broadcast.round,
                attempt=broadcast.attempt,
                client=client_id,
                attack=self.adversary.attack.name,
                benign_norm=float(np.linalg.norm(benign[client_id])),
                crafted_norm=float(np.linalg.norm(update)),
                **crafted.notes[client_id],
            )
        return {c: replies.get(c) for c in requests}

    def _replace_malicious(
        self,
        broadcast: FitIns,
        requests: Mapping[int, bytes],
        replies: dict[int, bytes | None],
    ) -> dict[int, bytes | None]:
        own: dict[int, FitRes] = {}
        honest: dict[int, np.ndarray] = {}
        for client_id, reply in replies.items():
            res = _fit_result(reply, client_id, broadcast)
            if res is None:
                continue  # a dropped or failed client contributes nothing either way
            if self.adversary.is_malicious(client_id):
                own[client_id] = res
            elif self.adversary.omniscient:
                honest[client_id] = res.update
        if not own:
            return replies
        crafted = self.adversary.craft_round(
            broadcast.round,
            broadcast.attempt,
            num_participants=len(requests),
            benign={c: r.update for c, r in own.items()},
            honest=honest,
            stream=self.randomness.stream(
                "adversary.craft",
                round_index=broadcast.round,
                attempt=broadcast.attempt,
                party="adversary",
            ),
        )
        out = dict(replies)
        for client_id in sorted(own):
            update = crafted.updates[client_id]
            out[client_id] = dataclasses.replace(own[client_id], update=update).to_bytes()
            details: dict[str, Any] = {
                "benign_norm": float(np.linalg.norm(own[client_id].update)),
                "crafted_norm": float(np.linalg.norm(update)),
                **crafted.notes[client_id],
            }
            self.events.emit(
                "adversary_update",
                round=broadcast.round,
                attempt=broadcast.attempt,
                client=client_id,
                attack=self.adversary.attack.name,
                **details,
            )
        return out


def _fit_result(reply: bytes | None, client_id: int, broadcast: FitIns) -> FitRes | None:
    """The client's :class:`FitRes` for this broadcast, or None (no reply, a failure, a
    reply for another round or model)."""
    if reply is None:
        return None
    try:
        message = decode_message(reply)
    except MessageError:
        return None
    if not isinstance(message, FitRes):
        return None
    if (message.round, message.attempt, message.client_id) != (
        broadcast.round,
        broadcast.attempt,
        client_id,
    ) or message.model_hash != broadcast.model_hash:
        return None
    return message


class CkksAdversarialTransport(AdversarialTransport):
    """The adversary in mode ``ckks``: malicious clients craft *before* encrypting.

    For a round's :class:`~secfl.he.messages.CkksFitIns` in an active round:

    1. the honest participants are reached first; when the adversary is omniscient a tap on
       each honest client's CKKS side records its trained plaintext update (simulation
       only: the omniscient adversary's view, as mode ``none`` decodes replies);
    2. the adversary trains its own participants (their poisoned data under a data attack),
       has :meth:`Adversary.craft_round` craft their updates from those and the tapped
       honest ones, and installs each crafted update as the malicious client's update
       source;
    3. the malicious participants are reached: each encrypts and signs its crafted update
       with its own identity, exactly as an honest client encrypts its trained one.

    Honest clients first, then the adversary's, both in client-id order: ``seeded`` runs
    are deterministic. Every crafted update is logged as ``adversary_update``.
    """

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        from secfl.he.client import ckks_client_of
        from secfl.he.messages import CkksFitIns

        if not requests:
            return {}
        try:
            broadcast = decode_message(next(iter(requests.values())))
        except MessageError:
            return self.inner.exchange(requests)
        if not isinstance(broadcast, CkksFitIns):
            return self.inner.exchange(requests)
        self._announce_once()
        if not self._prepare_round(broadcast.round, requests):
            return self.inner.exchange(requests)

        def install_tap(side: Any, tap: Callable[[int, int, np.ndarray], None]) -> None:
            side.tap = lambda ins, delta: tap(ins.round, ins.attempt, delta)

        def install_source(side: Any, update: np.ndarray, samples: int) -> None:
            side.source = lambda ins: (update, samples)

        fit = FitIns(
            round=broadcast.round,
            attempt=broadcast.attempt,
            model_hash=broadcast.model_hash,
            weights=broadcast.weights,
        )
        return self._craft_before_protection(
            fit,
            requests,
            side_of=self._side_lookup(ckks_client_of, "CKKS"),
            install_tap=install_tap,
            install_source=install_source,
        )


class MaskingAdversarialTransport(AdversarialTransport):
    """The adversary in mode ``masking``: malicious clients craft *before* masking.

    The server sees only masked vectors, so the crafted update must go into the malicious
    client's own :class:`~secfl.secagg.client.SecAggClient` (its ``source`` hook), which
    encodes and masks it like any update. It remembers the round's broadcast from
    :class:`~secfl.secagg.messages.AdvertiseKeysIns`; for a round's
    :class:`~secfl.secagg.messages.MaskedInputIns` (where clients train) in an active round:

    1. the malicious participants' training data is pointed at its poisoned copy (data
       attacks; the clean data outside the active rounds);
    2. the honest recipients are reached first; when the adversary is omniscient, a tap on
       each honest client's SecAgg side records its trained plaintext update (simulation
       only: the omniscient adversary's view);
    3. the adversary trains its own recipients from the broadcast, has
       :meth:`Adversary.craft_round` craft their updates from those and the tapped honest
       ones, and installs each as the malicious client's update source;
    4. the malicious recipients are reached: each masks its crafted update.

    Honest clients first, then the adversary's, each in client-id order, so ``seeded`` runs
    are deterministic. Every crafted update is logged as ``adversary_update``.
    """

    #: The round's model, remembered from its AdvertiseKeysIns (clients train later).
    _broadcast: FitIns | None = None

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        from secfl.secagg import messages as sm
        from secfl.secagg.simulation import secagg_client_of

        if not requests:
            return {}
        try:
            first = decode_message(next(iter(requests.values())))
        except MessageError:
            return self.inner.exchange(requests)
        if isinstance(first, sm.AdvertiseKeysIns):
            self._broadcast = FitIns(
                round=first.round,
                attempt=first.attempt,
                model_hash=first.model_hash,
                weights=first.weights,
            )
            self._announce_once()
            return self.inner.exchange(requests)
        if not isinstance(first, sm.MaskedInputIns):
            return self.inner.exchange(requests)
        broadcast = self._broadcast
        if broadcast is None or (broadcast.round, broadcast.attempt) != (
            first.round,
            first.attempt,
        ):
            raise ConfigError(
                f"masking adversary: no broadcast seen for round {first.round} attempt "
                f"{first.attempt}"
            )
        if not self._prepare_round(broadcast.round, requests):
            return self.inner.exchange(requests)

        def install_tap(side: Any, tap: Callable[[int, int, np.ndarray], None]) -> None:
            side.tap = tap

        def install_source(side: Any, update: np.ndarray, samples: int) -> None:
            side.source = lambda round_index, attempt: (update, samples)

        return self._craft_before_protection(
            broadcast,
            requests,
            side_of=self._side_lookup(secagg_client_of, "SecAgg"),
            install_tap=install_tap,
            install_source=install_source,
        )


def with_adversary(
    inner: Transport,
    config: RunConfig,
    clients: Sequence[ClientApp],
    *,
    randomness: Randomness,
    events: EventLog,
) -> Transport:
    """``inner`` itself without ``adversary:``, else an :class:`AdversarialTransport` over
    the run's clients. Refuses protection modes that have no adapter yet."""
    if config.adversary is None:
        return inner
    protection = config.aggregation.protection
    if protection not in ADAPTED_MODES:
        raise ConfigError(
            f"adversary is not implemented yet for aggregation.protection={protection!r}; "
            f"allowed: {sorted(ADAPTED_MODES)}"
        )
    adversary, new = build_adversary(
        config.adversary, [c.client_id for c in clients], randomness, events
    )
    return adversarial_transport(
        inner, adversary, protection, clients, randomness=randomness, events=events, announce=new
    )


def adversarial_transport(
    inner: Transport,
    adversary: Adversary,
    protection: str,
    clients: Sequence[ClientApp],
    *,
    randomness: Randomness,
    events: EventLog,
    announce: bool,
) -> AdversarialTransport:
    """``inner`` wrapped in ``adversary`` by the :class:`AdversarialTransport` of the
    protection mode (one of ``ADAPTED_MODES``) over ``clients``; ``announce``: log
    ``adversary_selected`` at the first round (a new selection, not yet in the log)."""
    kind: type[AdversarialTransport] = AdversarialTransport
    if protection == "ckks":
        kind = CkksAdversarialTransport
    elif protection == "masking":
        kind = MaskingAdversarialTransport
    return kind(
        inner,
        adversary,
        randomness=randomness,
        events=events,
        clients={c.client_id: c for c in clients},
        announce=announce,
    )
