"""The secfl error hierarchy.

Every failure a user can cause raises a subclass of :class:`SecflError` whose message names
what was wrong (the parameter or message), the value seen and what is allowed. Validation
never uses ``assert`` (it vanishes under ``python -O``); it raises one of these.
"""

from __future__ import annotations


class SecflError(Exception):
    """Base class of every error secfl raises on purpose."""


class ConfigError(SecflError, ValueError):
    """A run configuration, threat model or parameter is malformed or out of range."""


class DataError(SecflError, ValueError):
    """A dataset cannot be loaded, has the wrong shape, or cannot be partitioned as asked."""


class ModelError(SecflError, ValueError):
    """A model cannot be built, or a parameter vector does not fit the model."""


class MessageError(SecflError, ValueError):
    """A protocol message is malformed: wrong magic, version, type, length or field."""


class ProtocolError(SecflError):
    """A protocol was driven out of order or received a message it must refuse."""


class UpdateError(SecflError, ValueError):
    """A client update is unusable: wrong length, NaN/Inf values, non-positive weight."""


class CheckpointError(SecflError):
    """A checkpoint is missing, corrupt, or belongs to a different run configuration."""


class RunDirectoryError(SecflError):
    """A run directory cannot be used as asked (for example it already holds a run)."""


class BenchmarkError(SecflError):
    """A benchmark name or option is unknown, or its baseline failed."""


class SignatureError(SecflError):
    """A signature did not verify (one error for every cause, so nothing leaks)."""


class SecAggAbort(ProtocolError):
    """The secure-aggregation protocol stopped: below threshold, a message for the wrong
    stage, round or sender, a replay, a wrong length or a bad signature. The message names the
    cause; an aborting client has wiped its secrets, and a server reveals no partial sum."""


class AuthenticationError(SecflError):
    """An authenticated ciphertext did not decrypt (wrong key, nonce, data or tag); one
    error for every cause, so nothing leaks about which check failed."""


class CkksError(SecflError, ValueError):
    """A CKKS ciphertext or context is unusable: corrupted, or made under other parameters."""


class CkksParameterError(ConfigError):
    """A CKKS preset or flooding choice is unsafe (below 128-bit security) or insufficient."""


class DecryptorRefusal(ProtocolError):
    """The decryptor refused a request its policy does not allow; the message says why."""


class PrivacyError(SecflError, ValueError):
    """A privacy setting or DP event is invalid (epsilon <= 0, delta too large for n, clip
    <= 0, an unknown accountant or mechanism), or a mechanism cannot be accounted."""


class BudgetExhausted(PrivacyError):
    """Running on would exceed a privacy budget; the message names the budget that ran out.
    The run stops cleanly with its checkpoint saved; a client refuses to train."""


class AuditError(SecflError):
    """The audit trail cannot be written or verified as asked: a log signed by another key,
    a receipt for another run, round or client, or a server key that cannot be loaded."""
