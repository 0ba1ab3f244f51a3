"""Federation certificates: a CA, per-party certificates with a role, and a revocation list.

Every party of a deployment holds an ECDSA P-256 key for mutual TLS and a certificate signed
by the federation's CA. The certificate names

- the role (``server``, ``client`` or ``decryptor``) in the subject's organizational unit
  and in a URI ``urn:secfl:<role>:<id>`` in the subject alternative name, and
- for clients, the party's Ed25519 *protocol identity* key (the key SecAgg and CKKS
  signatures verify against, :mod:`secfl.crypto.sign`) in a private extension
  (:data:`IDENTITY_KEY_OID`, an OCTET STRING of the 32 raw key bytes).

So the SecAgg identity registry and the decryptor's client keys come from certificates the
CA signed, never from keys the server relays. Checking a presented certificate
(:func:`verify_party_certificate`) collapses every failure into one
:class:`~secfl.errors.AuthenticationError` whose message says which check failed (the
peer sees only "refused").
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfl.errors import AuthenticationError, ConfigError

ROLES = ("server", "client", "decryptor")
#: Private arc for the Ed25519 protocol identity key (documented in docs/deployment.md).
IDENTITY_KEY_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57264.7001.1")
_URI_PREFIX = "urn:secfl:"
#: Re-exported so that callers outside secfl/crypto/ can annotate without importing x509.
Crl = x509.CertificateRevocationList
Certificate = x509.Certificate
_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def generate_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (OS CSPRNG)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("a secfl TLS key must be an EC private key (PEM, PKCS#8)")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise AuthenticationError(f"not a PEM certificate: {exc}") from None


def crl_from_pem(data: bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate revocation list: {exc}") from None


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def create_ca(
    name: str,
    *,
    valid_days: int = 3650,
    now: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed federation CA (path length 0: it signs party certificates only)."""
    if valid_days < 1:
        raise ConfigError(f"valid_days must be >= 1, got {valid_days}")
    start = now or _now()
    key = generate_tls_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secfl federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _DAY)
        .not_valid_after(start + valid_days * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_party_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    role: str,
    party_id: int,
    tls_public_key: ec.EllipticCurvePublicKey,
    identity_key: bytes | None = None,
    hosts: Sequence[str] = (),
    valid_days: int = 365,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A party certificate for ``role`` and ``party_id``; ``hosts`` (server only) become
    DNS / IP subject alternative names the clients check."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    if not 0 <= party_id < 2**32:
        raise ConfigError(f"party_id must be in [0, 2^32), got {party_id}")
    if identity_key is not None and len(identity_key) != 32:
        raise ConfigError(f"identity key must be 32 raw Ed25519 bytes, got {len(identity_key)}")
    if role == "client" and identity_key is None:
        raise ConfigError("a client certificate needs the client's Ed25519 identity key")
    start = now or _now()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(party_uri(role, party_id))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secfl federation"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"{role}-{party_id}"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(tls_public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _DAY)
        .not_valid_after(start + valid_days * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    if identity_key is not None:
        der = b"\x04" + bytes([len(identity_key)]) + identity_key  # OCTET STRING
        builder = builder.add_extension(
            x509.UnrecognizedExtension(IDENTITY_KEY_OID, der), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def create_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked_serials: Iterable[int],
    *,
    now: datetime.datetime | None = None,
    valid_days: int = 30,
) -> x509.CertificateRevocationList:
    """The CA's revocation list naming ``revoked_serials``."""
    start = now or _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(start - _DAY)
        .next_update(start + valid_days * _DAY)
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(start - datetime.timedelta(seconds=1))
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def revoked_serials(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def party_uri(role: str, party_id: int) -> str:
    return f"{_URI_PREFIX}{role}:{party_id}"


@dataclass(frozen=True)
class PartyCertificate:
    """What a verified party certificate says."""

    role: str
    party_id: int
    serial: int
    #: The Ed25519 protocol identity key (clients), or None.
    identity_key: bytes | None
    #: SHA-256 of the certificate's DER encoding, hex.
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.role}-{self.party_id}"


def _identity_key(cert: x509.Certificate) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_KEY_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    if len(raw) != 34 or raw[:2] != b"\x04\x20":
        raise AuthenticationError("identity key extension is not a 32-byte OCTET STRING")
    return bytes(raw[2:])


def describe_certificate(cert: x509.Certificate) -> PartyCertificate:
    """Role, id and identity key of ``cert`` without checking who signed it."""
    try:
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise AuthenticationError("certificate has no subject alternative name") from None
    uris = [
        u
        for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(_URI_PREFIX)
    ]
    if len(uris) != 1 or len(units) != 1:
        raise AuthenticationError("certificate must name exactly one secfl role and id")
    role, _, ident = uris[0][len(_URI_PREFIX) :].partition(":")
    if role not in ROLES or units[0].value != role or not ident.isdigit():
        raise AuthenticationError(f"certificate names an unknown or inconsistent role {role!r}")
    identity = _identity_key(cert)
    if role == "client" and identity is None:
        raise AuthenticationError("client certificate carries no identity key")
    return PartyCertificate(
        role=role,
        party_id=int(ident),
        serial=cert.serial_number,
        identity_key=identity,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


def verify_party_certificate(
    cert: x509.Certificate,
    *,
    ca_cert: x509.Certificate,
    crl: x509.CertificateRevocationList | None,
    roles: Sequence[str],
    now: datetime.datetime | None = None,
) -> PartyCertificate:
    """Check ``cert`` was issued by the CA, is valid now, is not revoked and has one of
    ``roles``; return what it says. Any failure raises :class:`AuthenticationError`."""
    moment = now or _now()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise AuthenticationError(
            f"certificate not issued by the federation CA ({exc!r})"
        ) from None
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise AuthenticationError(
            f"certificate valid {cert.not_valid_before_utc} .. {cert.not_valid_after_utc}, "
            f"not at {moment}"
        )
    if crl is not None:
        if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            raise AuthenticationError("the revocation list is not signed by the federation CA")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise AuthenticationError(f"certificate serial {cert.serial_number:x} is revoked")
    party = describe_certificate(cert)
    if party.role not in roles:
        raise AuthenticationError(
            f"certificate role {party.role!r} is not allowed here; allowed: {list(roles)}"
        )
    return party
