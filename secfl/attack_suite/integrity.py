"""Secure-aggregation integrity against a malicious server (mode ``masking``).

Each probe runs one round of the real SecAgg protocol (:mod:`secfl.secagg`, through
:class:`~secfl.attack_suite.observe.ProbeFederation`) behind a transport that deviates the way
a malicious server can (``protocols/secagg.md``), after a control round without deviation
that must reveal a sum:

* **model inconsistency** — one victim receives a different global model (with its matching
  hash) in ``AdvertiseKeysIns``. Every client signs ``model_hash`` with the survivor set in
  the consistency check and verifies every other signer's signature over its own hash, so the
  round must reveal nothing.
* **dropping honest clients below the threshold** — the server discards masked inputs until
  fewer than ``t`` survivors remain; it must not obtain a sum (a client refuses to unmask
  below ``t`` and the server aborts). A second round dropping to exactly ``t`` still reveals a
  sum, showing the refusal comes from the threshold.
* **key substitution** — the server replaces one peer's advertised public key in the
  ``ShareKeysIns`` a victim receives; the Ed25519 signature over the advertised keys does not
  verify against the peer's pinned identity key, so the victim aborts (``SecAggAbort``)
  instead of encrypting shares under the server's key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from secfl.attack_suite.observe import ProbeFederation, fedsgd_client_config, initial_weights
from secfl.config import RunConfig
from secfl.data.federated import FederatedData
from secfl.encode.flatten import model_hash
from secfl.errors import MessageError
from secfl.messages import ClientFailure
from secfl.secagg import messages as m
from secfl.transport.base import Transport
from secfl.wire import WireMessage, decode_message

Rewrite = Callable[[int, WireMessage], WireMessage | None]


class DeviatingTransport:
    """Applies ``rewrite(client, request)`` to every request (``None``: keep it) and
    ``drop(client, request)`` to decide whether a reply is discarded."""

    def __init__(
        self,
        inner: Transport,
        *,
        rewrite: Rewrite | None = None,
        drop: Callable[[int, WireMessage], bool] | None = None,
    ) -> None:
        self.inner = inner
        self.rewrite = rewrite
        self.drop = drop
        self.failures: dict[int, str] = {}

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        sent: dict[int, bytes] = {}
        decoded: dict[int, WireMessage] = {}
        for client_id, payload in requests.items():
            try:
                message = decode_message(payload)
            except MessageError:
                sent[client_id] = payload
                continue
            decoded[client_id] = message
            changed = self.rewrite(client_id, message) if self.rewrite else None
            sent[client_id] = changed.to_bytes() if changed is not None else payload
        replies = self.inner.exchange(sent)
        for client_id, reply in replies.items():
            if reply is None:
                continue
            try:
                answer = decode_message(reply)
            except MessageError:
                continue
            if isinstance(answer, ClientFailure):
                self.failures[client_id] = answer.reason
        if self.drop is not None:
            for client_id, message in decoded.items():
                if self.drop(client_id, message):
                    replies[client_id] = None
        return replies


def integrity_probes(
    config: RunConfig, data: FederatedData, *, folder: Path, records: int = 4
) -> dict[str, object]:
    """Run the three deviations; returns the metrics (1.0 = detected / refused) and details."""
    clients = max(min(config.data.num_clients, 10), config.aggregation.min_cohort, 3)
    owners = [i % len(data.clients) for i in range(clients)]
    parts = [data.clients[o].subset(np.arange(records) % len(data.clients[o])) for o in owners]
    weights = initial_weights(config, data)
    details: dict[str, object] = {}

    def federation(name: str) -> ProbeFederation:
        return ProbeFederation(
            config,
            parts,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            folder=folder / name,
            client_config=fedsgd_client_config(config, records),
        )

    # control: the same federation without deviation reveals a sum
    fed = federation("control")
    control = fed.round(weights, 1)
    fed.close()
    details["control_revealed"] = control.released is not None
    if control.released is None:
        return {"metrics": {}, "details": details | {"error": "the control round revealed nothing"}}

    # model inconsistency
    victim = 0
    other = (weights + np.float32(0.01)).astype(np.float32)

    def different_model(client_id: int, message: WireMessage) -> WireMessage | None:
        if client_id == victim and isinstance(message, m.AdvertiseKeysIns):
            return dataclasses.replace(message, weights=other, model_hash=model_hash(other))
        return None

    fed = federation("model_inconsistency")
    deviating = DeviatingTransport(fed.transport, rewrite=different_model)
    view = fed.round(weights, 1, transport=deviating)
    fed.close()
    inconsistency = view.released is None
    details["model_inconsistency"] = {
        "revealed": view.released is not None,
        "client_aborts": dict(sorted(deviating.failures.items())),
    }

    # dropping honest clients below the threshold (and, as a control, down to exactly t)
    threshold = _threshold(config, fed, clients)

    def dropper(keep: int) -> Callable[[int, WireMessage], bool]:
        def drop(client_id: int, message: WireMessage) -> bool:
            return isinstance(message, m.MaskedInputIns) and client_id >= keep

        return drop

    fed = federation("below_threshold")
    below = fed.round(
        weights, 1, transport=DeviatingTransport(fed.transport, drop=dropper(threshold - 1))
    )
    fed.close()
    fed = federation("at_threshold")
    at = fed.round(weights, 1, transport=DeviatingTransport(fed.transport, drop=dropper(threshold)))
    fed.close()
    details["below_threshold"] = {
        "threshold": threshold,
        "survivors_left": threshold - 1,
        "revealed": below.released is not None,
        "at_threshold_revealed": at.released is not None,
    }
    refused = below.released is None

    # key substitution
    peer = 1

    def substitute(client_id: int, message: WireMessage) -> WireMessage | None:
        if client_id == victim and isinstance(message, m.ShareKeysIns):
            ids = list(message.ids)
            if peer not in ids:
                return None
            i = ids.index(peer)
            forged = bytes(32 - len(b"server")) + b"server"
            c_pks = message.c_pks[: 32 * i] + forged + message.c_pks[32 * i + 32 :]
            return dataclasses.replace(message, c_pks=c_pks)
        return None

    fed = federation("key_substitution")
    deviating = DeviatingTransport(fed.transport, rewrite=substitute)
    fed.round(weights, 1, transport=deviating)
    fed.close()
    reason = deviating.failures.get(victim, "")
    substituted = "signature" in reason or "substituted" in reason
    details["key_substitution"] = {"victim_abort": reason or None}
    return {
        "metrics": {
            "secagg.model_inconsistency_detected": float(inconsistency),
            "secagg.below_threshold_refused": float(refused),
            "secagg.key_substitution_detected": float(substituted),
        },
        "details": details,
    }


def _threshold(config: RunConfig, fed: ProbeFederation, clients: int) -> int:
    """The SecAgg threshold t of a round with ``clients`` participants."""
    protection = fed.protection
    server = getattr(protection, "last_server", None)
    if server is not None:
        return int(server.params.threshold)
    from secfl.secagg.params import derive_params

    return int(derive_params(config.aggregation.masking, n=clients,
                             min_cohort=config.aggregation.min_cohort).threshold)  # fmt: skip
