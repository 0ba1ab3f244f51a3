"""Each party's side of the configured protection mode, for one process per party.

The simulation builders (:mod:`secfl.secagg.simulation`, :mod:`secfl.he.simulation`) equip
every client of one process at once and derive identity keys themselves. Here each party
builds only its own side, with its identity key from its credentials and everybody else's
pinned keys from the federation's certificates. The protocol objects are the same.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secfl.audit.events import EventLog
from secfl.config import MaskingConfig, RunConfig
from secfl.crypto import ckks
from secfl.crypto.prg import MaskEngine
from secfl.crypto.sign import SigningKey
from secfl.errors import ConfigError, PrivacyError
from secfl.he.client import CkksClient
from secfl.he.decryptor import DecryptorPolicy
from secfl.he.server import CkksProtection, DecryptorChannel
from secfl.secagg import messages as m
from secfl.secagg.client import SecAggClient, ShareReleaseLog
from secfl.secagg.identity import IdentityRegistry
from secfl.secagg.simulation import MaskingProtection, _trainer
from secfl.server.protection import Protection

if TYPE_CHECKING:
    from secfl.client.app import ClientApp
    from secfl.privacy.distributed import DistributedNoise
    from secfl.trust.defense import TrustModule

#: Modes a deployment runs (``none`` would show the server every update in clear).
DEPLOYABLE_MODES = ("masking", "ckks")


class ThreadSafeEventLog(EventLog):
    """The event log shared by the round loop and the gRPC threads of one process."""

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        self._lock = threading.RLock()
        self._closed = False
        super().__init__(path, **kwargs)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            if self._closed:  # a stream thread finishing after the run ended
                return {}
            return super().emit(event, **fields)

    def sync(self) -> None:
        with self._lock:
            if not self._closed:
                super().sync()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            super().close()


def check_deployable(config: RunConfig) -> None:
    """Refuse what a real deployment must not run (insecure randomness, plaintext mode,
    simulated adversaries and dropouts) or does not run (refinement)."""
    if config.security.randomness != "os":
        raise ConfigError(
            f"security.randomness={config.security.randomness!r}: secfl serve/join/decryptor "
            "accept only 'os' (seeded keys and masks are reproducible from the seed)"
        )
    if config.aggregation.protection not in DEPLOYABLE_MODES:
        raise ConfigError(
            f"aggregation.protection={config.aggregation.protection!r} is not deployable; "
            f"allowed: {list(DEPLOYABLE_MODES)}"
        )
    if config.adversary is not None or config.simulation.dropout_rate > 0:
        raise ConfigError(
            "adversary and simulation.dropout_rate are simulation-only; remove them to deploy"
        )
    if config.refine is not None:
        # secfl serve/join run no statistics rounds, inversions or shared-set tuning: a
        # refine block would be ignored, and the operator would believe the model refined
        raise ConfigError(
            "refine is not run by secfl serve/join (no shared-set tuning, statistics rounds "
            "or model inversion in a deployment); remove the refine block to deploy, or run "
            "refinement in simulation with secfl run"
        )


def distributed_noise(config: RunConfig, model_size: int) -> DistributedNoise | None:
    """The clients' noise shares of user-level DP (masking: Skellam, ckks: Gaussian)."""
    from secfl.privacy.distributed import DistributedNoise, user_level_mechanism

    mechanism = user_level_mechanism(config, model_size)
    if mechanism is not None and not isinstance(mechanism, DistributedNoise):
        raise PrivacyError("a deployment adds distributed noise; central noise needs mode none")
    return mechanism


def effective_masking(config: RunConfig, user_level: DistributedNoise | None) -> MaskingConfig:
    """The masking settings every party uses: under user-level DP the L2 clip replaces the
    clip range and weights are uniform (as in :func:`secfl.secagg.simulation.build_protection`)."""
    masking = config.aggregation.masking
    if user_level is None:
        return masking
    if user_level.kind != "skellam":
        raise PrivacyError(f"mode masking adds Skellam shares, not {user_level.kind}")
    return masking.model_copy(update={"clip_range": user_level.clip_norm, "weighting": "uniform"})


def decryptor_policy(config: RunConfig) -> DecryptorPolicy:
    settings = config.aggregation.ckks
    return DecryptorPolicy(
        min_cohort=config.aggregation.min_cohort,
        max_weight_share=settings.max_weight_share,
        clip_range=settings.clip_range,
        statistical_bits=settings.flooding.statistical_bits,
        query_budget=settings.flooding.query_budget,
    )


def server_protection(
    config: RunConfig,
    *,
    client_keys: dict[int, bytes],
    decryptor: DecryptorChannel | None,
    user_level: DistributedNoise | None,
    trust: TrustModule | None,
) -> Protection:
    """The server side of the configured mode with the certificates' client keys."""
    min_cohort = config.aggregation.min_cohort
    if config.aggregation.protection == "masking":
        masking = effective_masking(config, user_level)
        return MaskingProtection(
            masking,
            min_cohort=min_cohort,
            registry=IdentityRegistry(client_keys),
            engine=MaskEngine(threads=masking.threads),
            user_level=user_level,
            trust=trust,
        )
    if decryptor is None:
        raise ConfigError("mode ckks needs a decryptor channel")
    settings = config.aggregation.ckks
    if user_level is not None:
        if user_level.kind != "gaussian":
            raise PrivacyError(f"mode ckks adds Gaussian shares, not {user_level.kind}")
        user_level.check_ckks_range(settings.clip_range, min_cohort)
    return CkksProtection(
        ckks.get_preset(settings.preset),
        decryptor=decryptor,
        client_keys=client_keys,
        min_cohort=min_cohort,
        num_clients=len(client_keys),
        query_budget=decryptor_policy(config).query_budget,
        user_level=user_level,
        trust=trust,
        clip_range=settings.clip_range,
    )


def equip_client(
    app: ClientApp,
    config: RunConfig,
    *,
    identity: SigningKey,
    registry: IdentityRegistry,
    state_dir: Path,
    user_level: DistributedNoise | None,
) -> None:
    """Register the client's protocol handlers on ``app``. Under masking the share release
    log lives in ``state_dir`` (fsync'd), so a restarted client never releases the other
    share of a (round, attempt)."""
    min_cohort = config.aggregation.min_cohort
    if config.aggregation.protection == "masking":
        masking = effective_masking(config, user_level)
        machine = SecAggClient(
            app.client_id,
            masking=masking,
            min_cohort=min_cohort,
            signing_key=identity,
            registry=registry,
            randomness=app.randomness,
            compute_update=_trainer(app),
            release_log=ShareReleaseLog(state_dir / f"client-{app.client_id}-releases.jsonl"),
            engine=MaskEngine(threads=masking.threads),
            noise=user_level,
            cohorts=config.trust is not None and config.trust.defense != "none",
        )
        app.register(m.AdvertiseKeysIns, machine.on_advertise_keys)
        app.register(m.ShareKeysIns, machine.on_share_keys)
        app.register(m.MaskedInputIns, machine.on_masked_input)
        app.register(m.ConsistencyCheckIns, machine.on_consistency_check)
        app.register(m.UnmaskIns, machine.on_unmask)
        return
    settings = config.aggregation.ckks
    CkksClient(
        app,
        ckks.get_preset(settings.preset),
        clip_range=settings.clip_range,
        identity=identity,
        noise=user_level,
        threshold=min_cohort,
    ).attach()
