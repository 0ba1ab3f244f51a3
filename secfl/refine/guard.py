"""What refinement may invert (DESIGN 5), decided from the configuration alone.

The aggregate (and earlier global models) are always allowed: they are what every mode
releases, and with DP they are post-processing of a DP release. Individual client models
only in mode ``none`` without user-level DP: the server sees them there anyway, but a
user-level DP guarantee covers only the noised aggregate, and distilling un-noised client
models into the released model would void it. Sub-cohort models only under ``masking`` with
sub-cohorts (``trust.defense: vote``), where the server is shown every sub-cohort's sum (each
carrying the full user-level noise when it is configured). A configuration that asks to
invert what its mode hides is refused with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from secfl.errors import ConfigError

if TYPE_CHECKING:
    from secfl.config import RunConfig

TeacherSource = Literal["clients", "cohorts", "aggregate"]


def _cohorts_available(config: RunConfig) -> bool:
    trust = config.trust
    return (
        config.aggregation.protection == "masking" and trust is not None and trust.defense == "vote"
    )


def _clients_refusal(config: RunConfig) -> str | None:
    protection = config.aggregation.protection
    if protection != "none":
        return (
            f"aggregation.protection={protection!r} hides every client's update from the "
            "server, so there is no client model to invert"
        )
    if config.privacy.user_level is not None:
        return (
            "privacy.user_level protects each client's contribution only through the noised "
            "aggregate; inverting un-noised client models and distilling them into the "
            "released model would void that guarantee"
        )
    return None


def teacher_source(config: RunConfig) -> TeacherSource | None:
    """Which models ``refine.server_inversion`` inverts in ``config``, or None if it is off.
    Raises :class:`ConfigError` when the requested teacher is hidden by the mode."""
    refine = config.refine
    if refine is None or refine.server_inversion is None:
        return None
    wanted = refine.server_inversion.teacher
    if wanted == "aggregate":
        return "aggregate"
    if wanted == "clients":
        reason = _clients_refusal(config)
        if reason is not None:
            raise ConfigError(
                f"refine.server_inversion.teacher='clients' is refused: {reason}; allowed "
                "here: " + ("'cohorts', " if _cohorts_available(config) else "") + "'aggregate'"
            )
        return "clients"
    if wanted == "cohorts":
        if not _cohorts_available(config):
            raise ConfigError(
                "refine.server_inversion.teacher='cohorts' is refused: sub-cohort models exist "
                "only under aggregation.protection 'masking' with trust.defense 'vote' "
                f"(here protection={config.aggregation.protection!r}, trust="
                f"{config.trust.defense if config.trust else None!r}); allowed: 'aggregate'"
            )
        return "cohorts"
    if _clients_refusal(config) is None:
        return "clients"
    if _cohorts_available(config):
        return "cohorts"
    return "aggregate"
