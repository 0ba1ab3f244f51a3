"""The server's audit signing key: where it lives and how it is created.

The key signs the event log and the clients' receipts. It is never derived from the run's
seed (a seeded run would otherwise hand its signing key to anyone with the config) and never
stored in the run directory (whoever can edit the run directory could then re-sign it).
``security.audit_key: PATH`` names a PEM Ed25519 private key; without it the per-user
default ``$SECFL_HOME/keys/server_audit_ed25519.pem`` is used (``SECFL_HOME`` defaults to
``~/.secfl``), created on first use from the OS CSPRNG with mode 0600 and its public key
written beside it as ``.pub`` (PEM) for handing to auditors and clients.
"""

from __future__ import annotations

import os
from pathlib import Path

from secfl.crypto.sign import SigningKey, public_key_pem
from secfl.errors import AuditError, SignatureError

DEFAULT_KEY_NAME = "server_audit_ed25519.pem"


def secfl_home() -> Path:
    """``$SECFL_HOME``, or ``~/.secfl``."""
    env = os.environ.get("SECFL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".secfl"


def default_audit_key_path() -> Path:
    return secfl_home() / "keys" / DEFAULT_KEY_NAME


def load_or_create_audit_key(
    path: str | Path | None = None, *, run_dir: Path | None = None
) -> SigningKey:
    """The server's audit key from ``path`` (must exist), or the per-user default key,
    created on first use. A key inside ``run_dir`` is refused."""
    if path is not None:
        file = Path(path).expanduser()
        _refuse_inside(file, run_dir)
        if not file.exists():
            raise AuditError(
                f"security.audit_key {str(file)!r} does not exist; give an Ed25519 private key "
                "(PEM) or leave the key unset to use the per-user default key"
            )
        return _load(file)
    file = default_audit_key_path()
    _refuse_inside(file, run_dir)
    if file.exists():
        return _load(file)
    return _create(file)


def public_key_path(private_key_path: Path) -> Path:
    return private_key_path.with_name(private_key_path.name.removesuffix(".pem") + ".pub")


def _load(file: Path) -> SigningKey:
    try:
        return SigningKey.from_pem(file.read_bytes())
    except (OSError, SignatureError) as exc:
        raise AuditError(f"cannot load the audit key {str(file)!r}: {exc}") from None


def _create(file: Path) -> SigningKey:
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = SigningKey.generate()
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return _load(file)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_pem())
        f.flush()
        os.fsync(f.fileno())
    public_key_path(file).write_bytes(public_key_pem(key.public_bytes()))
    return key


def _refuse_inside(file: Path, run_dir: Path | None) -> None:
    if run_dir is None:
        return
    folder = run_dir.resolve()
    if folder in file.resolve().parents:
        raise AuditError(
            f"the audit key {str(file)!r} lies inside the run directory {str(run_dir)!r}; "
            "whoever can edit the run directory could re-sign its log: keep the key elsewhere"
        )
