"""Threat models as data (DESIGN 7c): the schema every ``threat_models/*.yaml`` follows.

One file per adversary. ``applies_to`` lists the protection modes (with settings) the file
speaks about and what each protects; ``reveals`` says, per mode, what this adversary observes;
``guarantees`` are the checks the attack suite runs (``{metric, op, threshold}``, optionally
restricted to some modes); ``required_epsilon`` names the epsilon a configuration without DP
would need for the privacy guarantees. Later features extend these files, never one file per
mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from secfl.config import StrictModel
from secfl.errors import ConfigError

ProtectionMode = Literal["none", "masking", "ckks"]
SCHEMA_VERSION = 1


class Adversary(StrictModel):
    role: Literal["server", "server+clients", "clients", "decryptor", "server+decryptor"]
    behaviour: Literal["honest-but-curious", "malicious", "byzantine"]
    description: str


class ModeScope(StrictModel):
    protection: ProtectionMode
    #: Settings this entry assumes (e.g. ``{"masking.variant": "active"}``).
    settings: dict[str, Any] = Field(default_factory=dict)
    #: What this mode protects against this adversary; an empty list means nothing.
    protects: list[str]
    statement: str


class Guarantee(StrictModel):
    metric: str
    op: Literal["<=", "<", ">=", ">", "=="]
    threshold: float
    description: str = ""
    #: Modes the check applies to; empty means every mode in ``applies_to``.
    modes: list[ProtectionMode] = Field(default_factory=list)
    #: When set, the bound is ``threshold`` times this epsilon of the configuration: the
    #: ledger's epsilon at that level, or ``required_epsilon`` where the level has no DP.
    relative_to: Literal["epsilon.sample_level", "epsilon.user_level"] | None = None

    def bound(self, reference: float | None = None) -> float:
        """The threshold the value is compared with (``reference``: the epsilon named by
        ``relative_to``)."""
        if self.relative_to is None:
            return self.threshold
        if reference is None:
            raise ValueError(f"guarantee {self.metric!r} needs the {self.relative_to} figure")
        return self.threshold * reference

    def holds(self, value: float, reference: float | None = None) -> bool:
        bound = self.bound(reference)
        return {
            "<=": value <= bound,
            "<": value < bound,
            ">=": value >= bound,
            ">": value > bound,
            "==": value == bound,
        }[self.op]


class RequiredEpsilon(StrictModel):
    sample_level: Annotated[float, Field(gt=0)] | None
    user_level: Annotated[float, Field(gt=0)] | None
    note: str = ""


class ThreatModel(StrictModel):
    schema_version: Literal[1]
    name: str
    adversary: Adversary
    capabilities: list[str] = Field(min_length=1)
    applies_to: list[ModeScope] = Field(min_length=1)
    reveals: dict[ProtectionMode, list[str]]
    guarantees: list[Guarantee] = Field(default_factory=list)
    required_epsilon: RequiredEpsilon

    @model_validator(mode="after")
    def _consistent(self) -> ThreatModel:
        modes = {scope.protection for scope in self.applies_to}
        missing = modes - set(self.reveals)
        if missing:
            raise ValueError(f"reveals must say what modes {sorted(missing)} reveal")
        for g in self.guarantees:
            stray = set(g.modes) - modes
            if stray:
                raise ValueError(
                    f"guarantee {g.metric!r} names modes {sorted(stray)} not in applies_to"
                )
        return self


def load_threat_model(path: str | Path) -> ThreatModel:
    """Load and validate a threat-model YAML file."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read threat model {str(file)!r}: {exc}") from exc
    try:
        model = ThreatModel.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"threat model {str(file)!r} is invalid: {details}") from None
    if model.name != file.stem:
        raise ConfigError(f"threat model {str(file)!r} is named {model.name!r}; use the file stem")
    return model
