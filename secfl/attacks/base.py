"""The poisoning-attack interface and its registry (sans-I/O: no transport, no messages).

An attack is a malicious-client behaviour. It may poison the malicious clients' training data
(``poison_data``, data attacks) and it crafts the updates they send (``craft``) from

* ``benign``: the malicious clients' own updates as they trained them (on poisoned data for a
  data attack), by client id;
* ``honest``: the round's honest updates by client id when the adversary is omniscient,
  else empty;
* ``ctx``: the round (index, n participants, f malicious participants), a random stream
  and a ``notes`` dict the attack may fill with what it chose (logged with every update).

Attacks are found by name in a registry. ``@register_attack("name")`` on a factory (a class
or a function taking the attack's parameters as keyword arguments and returning an
:class:`Attack`) adds one, from inside or outside the package; ``adversary.plugin:
"pkg.module:factory"`` in a run config imports a factory at config time and registers it
under ``adversary.attack``. ``docs/attacks.md`` shows both.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from secfl.errors import ConfigError
from secfl.randomness import RandomStream


@dataclass(frozen=True, eq=False)
class AttackContext:
    """What an attack knows about the round besides the updates."""

    round: int
    attempt: int
    #: Participants of the round that were asked to train (honest and malicious).
    num_participants: int
    #: Malicious participants of the round whose update the adversary holds.
    num_malicious: int
    #: The adversary's random stream for this round (``adversary.craft``); never numpy's.
    stream: RandomStream
    collusion: bool = True
    omniscient: bool = True
    #: Filled by ``craft`` with what it chose (gamma, z, epsilon, ...); logged with updates.
    notes: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Attack(Protocol):
    """A model-poisoning behaviour: crafts the malicious clients' updates."""

    name: str

    def describe(self) -> dict[str, Any]:
        """The attack's name and pinned parameters (JSON values), echoed in benchmarks."""
        ...

    def craft(
        self,
        round_index: int,
        benign: Mapping[int, np.ndarray],
        honest: Mapping[int, np.ndarray],
        ctx: AttackContext,
    ) -> dict[int, np.ndarray]:
        """The update each malicious client in ``benign`` sends (same keys, same shapes)."""
        ...


@runtime_checkable
class DataPoisoningAttack(Attack, Protocol):
    """An attack that also changes the malicious clients' training data."""

    def poison_data(
        self, x: np.ndarray, y: np.ndarray, num_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Poisoned copies of one malicious client's ``(x, y)``; the inputs are untouched."""
        ...


AttackFactory = Callable[..., Attack]

_ATTACKS: dict[str, AttackFactory] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_attack(name: str) -> Callable[[AttackFactory], AttackFactory]:
    """Decorator: register ``factory`` under ``name`` (lowercase letters, digits, ``_``).

    Registering the same factory twice is harmless; another factory under a taken name is a
    :class:`ConfigError` (an auditor's plug-in never silently replaces a built-in attack).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"attack name {name!r} is not allowed: lowercase letters, digits and '_', "
            "starting with a letter"
        )

    def decorate(factory: AttackFactory) -> AttackFactory:
        if not callable(factory):
            raise ConfigError(f"attack {name!r}: the factory must be callable, got {factory!r}")
        known = _ATTACKS.get(name)
        if known is not None and known is not factory:
            raise ConfigError(
                f"attack name {name!r} is already registered (by {_qualname(known)}); "
                "choose another name"
            )
        _ATTACKS[name] = factory
        return factory

    return decorate


def registered_attacks() -> list[str]:
    """The names of every registered attack, sorted."""
    _load_builtins()
    return sorted(_ATTACKS)


def get_attack(name: str, params: Mapping[str, Any] | None = None) -> Attack:
    """A fresh attack ``name`` built with ``params``; unknown names or parameters raise
    :class:`ConfigError` listing what is allowed."""
    _load_builtins()
    factory = _ATTACKS.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown attack {name!r}; registered attacks: {sorted(_ATTACKS)} "
            "(an auditor's own attack: adversary.plugin or register_attack, docs/attacks.md)"
        )
    params = dict(params or {})
    allowed = _keyword_parameters(factory)
    if allowed is not None:
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ConfigError(
                f"attack {name!r} has no parameter(s) {unknown}; allowed: {sorted(allowed)}"
            )
    try:
        attack = factory(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"attack {name!r} with params {params!r}: {exc}") from exc
    if not isinstance(attack, Attack):
        raise ConfigError(
            f"attack {name!r}: factory {_qualname(factory)} returned {type(attack).__name__}, "
            "which lacks name / describe / craft"
        )
    return attack


def load_plugin(spec: str, name: str) -> AttackFactory:
    """Import ``"pkg.module:attribute"`` and register that factory under ``name``.

    The module may also register its attacks itself with :func:`register_attack` on import;
    the attribute must then be the factory registered under ``name`` (or not clash with it).
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"adversary.plugin={spec!r} is not allowed: expected 'package.module:factory'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"adversary.plugin={spec!r}: cannot import {module_name!r}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"adversary.plugin={spec!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"adversary.plugin={spec!r}: {attribute!r} is not callable")
    factory: AttackFactory = target
    register_attack(name)(factory)
    return factory


def _keyword_parameters(factory: AttackFactory) -> list[str] | None:
    """The keyword parameters ``factory`` accepts, or None if it takes ``**kwargs``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(parameter.name)
    return names


def _qualname(factory: object) -> str:
    module = getattr(factory, "__module__", "?")
    return f"{module}.{getattr(factory, '__qualname__', repr(factory))}"


def _load_builtins() -> None:
    # The built-in attacks register themselves when their module is imported.
    importlib.import_module("secfl.attacks.poisoning")
