"""The federation's key material on disk (``secfl keys``) and how parties load it.

Layout of a PKI directory made by :func:`init_pki` (docs/deployment.md)::

    PKI/ca/ca.key ca.pem issued.json      the CA: keep offline, only ``secfl keys`` reads it
    PKI/federation/ca.pem crl.pem         public: give a copy to every party
    PKI/federation/certs/<name>.pem       public: every party certificate (the registry)
    PKI/<name>/cert.pem tls.key ca.pem    private to party <name> (server, client-3, ...)
    PKI/<name>/identity.key               clients only: the Ed25519 protocol identity seed

``<name>`` is ``<role>-<id>`` (``server-0``, ``client-3``, ``decryptor-0``). Private files
are written with mode 0600.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from secfl.crypto import x509 as fx
from secfl.crypto.sign import SigningKey
from secfl.errors import AuthenticationError, ConfigError
from secfl.secagg.identity import IdentityRegistry


def write_file_atomic(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write, fsync, rename: after a crash ``path`` holds the old or the new bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


def party_name(role: str, party_id: int) -> str:
    return f"{role}-{party_id}"


def init_pki(
    out: str | Path,
    *,
    clients: int,
    decryptor: bool = True,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    name: str = "secfl federation CA",
) -> Path:
    """A new CA, a server certificate for ``hosts``, ``clients`` client certificates
    (ids 0..clients-1), optionally a decryptor certificate, and an empty revocation list."""
    folder = Path(out)
    if (folder / "ca" / "ca.key").exists():
        raise ConfigError(f"{str(folder)!r} already holds a CA; use `secfl keys issue/revoke`")
    if clients < 1:
        raise ConfigError(f"--clients must be >= 1, got {clients}")
    ca_key, ca_cert = fx.create_ca(name)
    write_file_atomic(folder / "ca" / "ca.key", fx.key_to_pem(ca_key), private=True)
    write_file_atomic(folder / "ca" / "ca.pem", fx.cert_to_pem(ca_cert))
    write_file_atomic(folder / "ca" / "issued.json", b"{}")
    write_file_atomic(folder / "ca" / "revoked.json", b"[]")
    write_file_atomic(folder / "federation" / "ca.pem", fx.cert_to_pem(ca_cert))
    issue(folder, "server", 0, hosts=hosts)
    for client_id in range(clients):
        issue(folder, "client", client_id)
    if decryptor:
        issue(folder, "decryptor", 0)
    write_crl(folder)
    return folder


def issue(folder: str | Path, role: str, party_id: int, *, hosts: tuple[str, ...] = ()) -> Path:
    """Issue (or re-issue) party ``role``-``party_id``: fresh keys, certificate, files."""
    folder = Path(folder)
    ca_key = fx.key_from_pem(_read(folder / "ca" / "ca.key", "CA key"))
    ca_cert = fx.cert_from_pem(_read(folder / "ca" / "ca.pem", "CA certificate"))
    name = party_name(role, party_id)
    tls_key = fx.generate_tls_key()
    identity: SigningKey | None = None
    seed = b""
    if role == "client":
        # An Ed25519 private key is its 32-byte seed (RFC 8032 §5.1.5); drawn from the OS.
        seed = secrets.token_bytes(32)
        identity = SigningKey.from_seed(seed)
    cert = fx.issue_party_certificate(
        ca_key,
        ca_cert,
        role=role,
        party_id=party_id,
        tls_public_key=tls_key.public_key(),
        identity_key=identity.public_bytes() if identity is not None else None,
        hosts=hosts,
    )
    party_dir = folder / name
    write_file_atomic(party_dir / "tls.key", fx.key_to_pem(tls_key), private=True)
    write_file_atomic(party_dir / "cert.pem", fx.cert_to_pem(cert))
    write_file_atomic(party_dir / "ca.pem", fx.cert_to_pem(ca_cert))
    if identity is not None:
        write_file_atomic(party_dir / "identity.key", seed, private=True)
    write_file_atomic(folder / "federation" / "certs" / f"{name}.pem", fx.cert_to_pem(cert))
    issued = json.loads(_read(folder / "ca" / "issued.json", "issued list"))
    issued.setdefault(name, []).append(cert.serial_number)
    write_file_atomic(folder / "ca" / "issued.json", json.dumps(issued, indent=1).encode())
    return party_dir


def revoke(folder: str | Path, name: str) -> list[int]:
    """Revoke every certificate ever issued to party ``name``; rewrite the CRL."""
    folder = Path(folder)
    issued = json.loads(_read(folder / "ca" / "issued.json", "issued list"))
    if name not in issued:
        raise ConfigError(f"no certificate was issued to {name!r}; issued: {sorted(issued)}")
    revoked = set(json.loads(_read(folder / "ca" / "revoked.json", "revoked list")))
    revoked.update(int(s) for s in issued[name])
    write_file_atomic(folder / "ca" / "revoked.json", json.dumps(sorted(revoked)).encode())
    write_crl(folder)
    return sorted(revoked)


def write_crl(folder: str | Path) -> None:
    folder = Path(folder)
    ca_key = fx.key_from_pem(_read(folder / "ca" / "ca.key", "CA key"))
    ca_cert = fx.cert_from_pem(_read(folder / "ca" / "ca.pem", "CA certificate"))
    revoked = json.loads(_read(folder / "ca" / "revoked.json", "revoked list"))
    crl = fx.create_crl(ca_key, ca_cert, [int(s) for s in revoked])
    write_file_atomic(folder / "federation" / "crl.pem", fx.crl_to_pem(crl))


@dataclass(frozen=True)
class Credentials:
    """One party's own files: TLS key and certificate, CA, and (clients) identity key."""

    folder: Path
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    party: fx.PartyCertificate
    identity_seed: bytes | None

    @classmethod
    def load(cls, folder: str | Path) -> Credentials:
        path = Path(folder)
        cert_pem = _read(path / "cert.pem", "party certificate")
        party = fx.describe_certificate(fx.cert_from_pem(cert_pem))
        seed = None
        if party.role == "client":
            seed = _read(path / "identity.key", "identity key")
            if len(seed) != 32 or SigningKey.from_seed(seed).public_bytes() != party.identity_key:
                raise ConfigError(f"{str(path)!r}: identity.key does not match cert.pem")
        return cls(
            folder=path,
            cert_pem=cert_pem,
            key_pem=_read(path / "tls.key", "TLS key"),
            ca_pem=_read(path / "ca.pem", "CA certificate"),
            party=party,
            identity_seed=seed,
        )

    def identity(self) -> SigningKey:
        if self.identity_seed is None:
            raise ConfigError(f"{self.party.name} has no protocol identity key")
        return SigningKey.from_seed(self.identity_seed)


class Federation:
    """The public bundle (``federation/``): CA, revocation list, every party certificate.

    The revocation list is re-read whenever its file changes, so revoking a party takes
    effect at its next connection without a restart.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.ca_pem = _read(self.folder / "ca.pem", "CA certificate")
        self.ca_cert = fx.cert_from_pem(self.ca_pem)
        self._crl_stamp: tuple[int, int] | None = None
        self._crl: fx.Crl | None = None
        self.crl()

    def crl(self) -> fx.Crl:
        path = self.folder / "crl.pem"
        stat = path.stat() if path.exists() else None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat is not None else None
        if stamp != self._crl_stamp:
            self._crl = fx.crl_from_pem(path.read_bytes()) if stat is not None else None
            self._crl_stamp = stamp
        if self._crl is None:
            raise ConfigError(f"{str(path)!r} is missing: every party needs the CA's CRL")
        return self._crl

    def verify(self, cert_pem: bytes, *, roles: tuple[str, ...]) -> fx.PartyCertificate:
        """The party a presented certificate names; AuthenticationError if it must be refused."""
        return fx.verify_party_certificate(
            fx.cert_from_pem(cert_pem), ca_cert=self.ca_cert, crl=self.crl(), roles=roles
        )

    def parties(self, role: str) -> dict[int, fx.PartyCertificate]:
        """Every valid, unrevoked certificate of ``role`` in ``certs/`` by party id."""
        found: dict[int, fx.PartyCertificate] = {}
        for path in sorted((self.folder / "certs").glob(f"{role}-*.pem")):
            try:
                party = self.verify(path.read_bytes(), roles=(role,))
            except AuthenticationError:
                continue  # revoked or expired: not part of the federation
            if party.party_id in found:
                raise ConfigError(f"two valid certificates for {party.name} in certs/")
            found[party.party_id] = party
        return found

    def client_keys(self) -> dict[int, bytes]:
        """Client id -> pinned Ed25519 identity key, from the client certificates."""
        keys: dict[int, bytes] = {}
        for client_id, party in self.parties("client").items():
            if party.identity_key is None:  # pragma: no cover - describe_certificate refuses
                continue
            keys[client_id] = party.identity_key
        return keys

    def registry(self) -> IdentityRegistry:
        return IdentityRegistry(self.client_keys())
