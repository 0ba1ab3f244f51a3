"""Builder for mode ``ckks`` in simulation: three roles in one process, bytes between them.

The decryptor is its own object holding the secret key; the server-side protection gets
only a byte channel to it (``Decryptor.handle``) and the public contexts it hands out. Client
identity keys are registered with the server and the decryptor the way a deployment would
distribute certificates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secfl.audit.events import EventLog
from secfl.crypto import ckks
from secfl.crypto.sign import SigningKey
from secfl.he.client import CkksClient
from secfl.he.decryptor import Decryptor, DecryptorPolicy
from secfl.he.server import CkksProtection
from secfl.randomness import Randomness

if TYPE_CHECKING:
    from secfl.client.app import ClientApp
    from secfl.config import RunConfig


def build_protection(
    config: RunConfig, clients: list[ClientApp], randomness: Randomness, events: EventLog
) -> CkksProtection:
    settings = config.aggregation.ckks
    preset = ckks.get_preset(settings.preset)
    policy = DecryptorPolicy(
        min_cohort=config.aggregation.min_cohort,
        max_weight_share=settings.max_weight_share,
        clip_range=settings.clip_range,
        statistical_bits=settings.flooding.statistical_bits,
        query_budget=settings.flooding.query_budget,
    )
    identities: dict[int, bytes] = {}
    for app in clients:
        if randomness.secure:
            identity = SigningKey.generate()
        else:
            identity = SigningKey.from_seed(
                randomness.stream("ckks.identity", party=app.party).bytes(32)
            )
        side = CkksClient(app, preset, clip_range=settings.clip_range, identity=identity)
        side.attach()
        identities[app.client_id] = side.public_identity
    decryptor = Decryptor(
        preset, policy, client_keys=identities, randomness=randomness, events=events
    )
    return CkksProtection(
        preset,
        decryptor=decryptor.handle,
        client_keys=identities,
        min_cohort=config.aggregation.min_cohort,
        num_clients=len(clients),
        query_budget=policy.query_budget,
    )
