"""Certificates for remote access: vzd's own CA, its server certificate, and the client
certificates it issues.

vzd is its own certificate authority: clients pin the CA's fingerprint (it travels in the
join token), so no public CA is involved and a server certificate can be re-issued (new
addresses) without clients noticing. Client keys are made on the client and never leave it;
vzd signs their CSRs. Keys are ECDSA P-256: made in milliseconds, small, and accepted by
every TLS 1.2+ stack.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vzkit.errors import InvalidConfig

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 3650
# Re-issue the server certificate when it has less than this left.
RENEW_BEFORE = datetime.timedelta(days=30)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """SHA-256 of the DER encoding, lower-case hex: what `vz trust list` shows."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes | str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise InvalidConfig(
            f"not a PEM certificate: {exc}", hint="pass the certificate in PEM form"
        ) from exc


def write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically, never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_csr(key: PrivateKey, name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object, days: int
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        # An hour back: clients whose clock is a little behind still accept it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


@dataclass(frozen=True)
class CertAuthority:
    key: PrivateKey
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return builder.add_extension(aki, critical=False).sign(self.key, hashes.SHA256())

    def issue_server(
        self, key: PrivateKey, dns_names: Iterable[str], ips: Iterable[str]
    ) -> x509.Certificate:
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(dns_names)]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(ips)]
        builder = (
            _builder(_cn(socket.gethostname()), self.cert.subject, key.public_key(), SERVER_DAYS)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        return self._sign(builder)

    def issue_client(self, csr_pem: str, name: str) -> x509.Certificate:
        """Sign a client's CSR. The subject is ``name`` whatever the CSR asked for."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise InvalidConfig(
                f"not a PEM certificate signing request: {exc}",
                hint="vz remote add makes the request; pass its PEM text unchanged",
            ) from exc
        if not csr.is_signature_valid:
            raise InvalidConfig("the certificate signing request's signature does not verify")
        pub = csr.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            if pub.key_size < 2048:
                raise InvalidConfig(
                    f"the request's RSA key has {pub.key_size} bits",
                    hint="use an ECDSA P-256 key or RSA with at least 2048 bits",
                )
        elif not isinstance(pub, ec.EllipticCurvePublicKey):
            raise InvalidConfig(
                f"the request's key type {type(pub).__name__} is not accepted",
                hint="use an ECDSA or RSA key",
            )
        builder = (
            _builder(_cn(name), self.cert.subject, pub, CLIENT_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return self._sign(builder)


def load_or_create_ca(directory: Path) -> CertAuthority:
    key_path, crt_path = directory / "ca.key", directory / "ca.crt"
    if key_path.exists() and crt_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise InvalidConfig(f"{key_path} holds an unsupported key type")
        return CertAuthority(key, load_cert(crt_path.read_bytes()))
    key = new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vzkit"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"vzd CA {socket.gethostname()}"),
        ]
    )
    cert = (
        _builder(subject, subject, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
    # The key first: a CA certificate without its key would be unusable after a crash.
    write_private(key_path, key_pem(key))
    write_private(crt_path, cert_pem(cert))
    os.chmod(crt_path, 0o644)
    return CertAuthority(key, cert)


def _covers(cert: x509.Certificate, dns_names: list[str], ips: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    return set(dns_names) <= have_dns and {str(ipaddress.ip_address(a)) for a in ips} <= have_ips


def ensure_server_cert(
    directory: Path, ca: CertAuthority, dns_names: list[str], ips: list[str]
) -> tuple[Path, Path]:
    """The server certificate and key paths, (re-)issued when missing, expiring, signed by
    another CA, or not naming every address vzd listens on."""
    key_path, crt_path = directory / "server.key", directory / "server.crt"
    if key_path.exists() and crt_path.exists():
        cert = load_cert(crt_path.read_bytes())
        fresh = cert.not_valid_after_utc - _now() > RENEW_BEFORE
        if fresh and cert.issuer == ca.cert.subject and _covers(cert, dns_names, ips):
            return crt_path, key_path
    key = new_key()
    cert = ca.issue_server(key, dns_names, ips)
    write_private(key_path, key_pem(key))
    # The chain, so a client that trusts only the CA can verify it.
    write_private(crt_path, cert_pem(cert) + cert_pem(ca.cert))
    return crt_path, key_path
