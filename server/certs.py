"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, and one node
authentication key pair per site.

- The CA signs the server certificate; every site gets ``ca.crt`` to verify the server (TLS).
- The server certificate names every host name and IP the sites will dial (subject alt names).
- A site's key pair is ECDSA P-384 in OpenSSH format (what ``flower-supernode`` reads). The
  private key belongs at the site only; the centre registers the public key.
Private keys are written 0600, in folders 0700.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS_CA = 3650
VALID_DAYS_SERVER = 825  # the longest TLS server lifetime most clients still accept


@dataclass(frozen=True)
class IssuedFile:
    path: Path
    goes_to: str  # who needs it, for the printed table
    secret: bool


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if secret:
        path.parent.chmod(0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(0o600 if secret else 0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clinicfl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(folder: Path) -> list[IssuedFile]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("clinicfl CA")).issuer_name(_name("clinicfl CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS_CA))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(folder / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), secret=True)
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return [IssuedFile(folder / "ca.key", "stays at the centre, offline if possible (signs server certificates)", True),
            IssuedFile(folder / "ca.crt", "the SuperLink and every site (sites verify the server with it)", False)]


def create_server_certificate(folder: Path, hosts: list[str]) -> list[IssuedFile]:
    """A TLS certificate for the SuperLink, valid for every given host name and IP address."""
    if not hosts:
        raise ValueError("give at least one --host: the name or IP address the sites will connect to")
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS_SERVER))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(folder / "server.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()), secret=True)
    _write(folder / "server.crt", cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return [IssuedFile(folder / "server.key", "the SuperLink host only", True),
            IssuedFile(folder / "server.crt", f"the SuperLink host (valid for {', '.join(hosts)})", False)]


def create_site_keys(folder: Path, site: str) -> list[IssuedFile]:
    """An ECDSA P-384 key pair in OpenSSH format for SuperNode authentication."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(folder / f"{site}.key", private, secret=True)
    _write(folder / f"{site}.pub", public + f" clinicfl-{site}\n".encode(), secret=False)
    return [IssuedFile(folder / f"{site}.key", f"site {site} only (its SuperNode's identity); delete the centre's "
                                               "copy once delivered", True),
            IssuedFile(folder / f"{site}.pub", f"the centre: clinicfl-server register-site {site} {site}.pub", False)]
