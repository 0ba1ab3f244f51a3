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
from secfl.errors import ConfigError, PrivacyError
from secfl.he.client import CkksClient
from secfl.he.decryptor import Decryptor, DecryptorPolicy
from secfl.he.server import CkksProtection
from secfl.randomness import Randomness

if TYPE_CHECKING:
    from secfl.client.app import ClientApp
    from secfl.config import RunConfig
    from secfl.privacy.distributed import DistributedNoise
    from secfl.trust.defense import TrustModule


def build_protection(
    config: RunConfig,
    clients: list[ClientApp],
    randomness: Randomness,
    events: EventLog,
    *,
    user_level: DistributedNoise | None = None,
    trust: TrustModule | None = None,
) -> CkksProtection:
    """Decryptor, clients and server of mode ``ckks``; with user-level DP (Gaussian shares)
    every client noises its update for sums of at least ``aggregation.min_cohort``."""
    settings = config.aggregation.ckks
    if trust is not None:
        if trust.defense != "vote":
            raise ConfigError(
                f"trust.defense={trust.defense!r} needs every update in clear; under "
                "aggregation.protection=ckks only 'vote' runs (from per-client scalars)"
            )
        if not ckks.get_preset(settings.preset).galois_keys:
            raise ConfigError(
                f"trust under ckks needs aggregation.ckks.preset='trust' (evaluation keys for "
                f"the encrypted scalars), got {settings.preset!r}"
            )
    min_cohort = config.aggregation.min_cohort
    if user_level is not None:
        if user_level.kind != "gaussian":
            raise PrivacyError(f"mode ckks adds Gaussian shares, not {user_level.kind}")
        user_level.check_ckks_range(settings.clip_range, min_cohort)
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
        side = CkksClient(
            app,
            preset,
            clip_range=settings.clip_range,
            identity=identity,
            noise=user_level,
            threshold=min_cohort,
        )
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
        user_level=user_level,
        trust=trust,
        clip_range=settings.clip_range,
    )
