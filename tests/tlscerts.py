"""Certificates for the TLS tests, made with `cryptography` (no files in the repository):
a CA, the listener's certificate (for localhost and 127.0.0.1) and two senders', all
signed by it, and a sender's certificate signed by another CA."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    folder: Path

    def pem(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def client(self, name: str | None) -> ssl.SSLContext:
        """A sender's context: trusts our CA; presents ``name``'s certificate (None:
        none)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.pem("ca")))
        if name is not None:
            ctx.load_cert_chain(str(self.pem(name)), str(self.key(name)))
        return ctx


#: the subject alternative names of the ``scanner`` certificate: a DNS name, an IPv6
#: address and an e-mail address
SCANNER_NAMES = ("ct1.radiology.example.org", "2001:db8::10", "ct1@radiology.example.org")


def make_certs(folder: Path) -> Certs:
    """``ca``; ``server``, ``client`` and ``scanner`` (signed by ``ca``; ``scanner``'s
    common name is "CT Scanner 1", with the names of :data:`SCANNER_NAMES`);
    ``stranger`` (another CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, key, issuer: str, issuer_key, ca: bool = False,
              names: tuple = ()):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, key, cert) -> None:
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    write("ca", ca_key, issue("Test CA", ca_key, "Test CA", ca_key, ca=True))
    server = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    scanner = (x509.DNSName(SCANNER_NAMES[0]),
               x509.IPAddress(ipaddress.ip_address(SCANNER_NAMES[1])),
               x509.RFC822Name(SCANNER_NAMES[2]))
    for stem, name, issuer, issuer_key, names in (
            ("server", "server", "Test CA", ca_key, server),
            ("client", "client", "Test CA", ca_key, ()),
            ("scanner", "CT Scanner 1", "Test CA", ca_key, scanner),
            ("stranger", "stranger", "Other CA", other_key, ())):
        key = ec.generate_private_key(ec.SECP256R1())
        write(stem, key, issue(name, key, issuer, issuer_key, names=names))
    return Certs(folder)
