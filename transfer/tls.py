"""Optional TLS for the TCP control and data connections (Python's :mod:`ssl`).

Why TLS on top of the HMAC handshake and not instead of it: the shared-secret handshake of
:mod:`transfer.rpc.auth` proves that both ends belong to the cluster but leaves the bytes in
clear; TLS encrypts them (and, with a CA, proves each end holds a certificate the cluster issued).
The two compose: a TLS connection still runs the HMAC handshake inside it.

Modes, chosen by the ``tls`` config section:

* off (default): plain TCP, and the hot paths carry no TLS branch per byte.
* ``tls.enabled`` with ``cert_file``/``key_file`` and no ``ca_file``: encryption only. Clients do
  not verify the server's certificate, so TLS alone stops passive eavesdroppers, not an active
  man in the middle; keep ``auth_secret`` set.
* with ``ca_file`` too: mutual TLS. Each server requires a client certificate signed by that CA
  and each client requires the same of the server. Host names are not checked: peers are dialed
  by IP address and segment name, so identity means "holds a certificate from the cluster CA".

One certificate and key per process serve both roles (every engine is a server and a client).
Contexts are cached by their files, so the hundreds of connections of one process share one.
"""
from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transfer.config import MooncakeConfig

__all__ = [
    "TestPki",
    "TlsContexts",
    "client_context",
    "make_test_pki",
    "server_context",
    "tls_contexts",
]

#: How long a connection may take to finish the TLS handshake before it is dropped.
HANDSHAKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class TlsContexts:
    """The two contexts one process needs: for the listeners it runs and the peers it dials."""

    server: ssl.SSLContext
    client: ssl.SSLContext


def server_context(cert_file: str, key_file: str, ca_file: str | None = None) -> ssl.SSLContext:
    """A listener's context; with ``ca_file`` clients must present a certificate it signed."""
    return _server_context(cert_file, key_file, ca_file or None)


def client_context(cert_file: str | None = None, key_file: str | None = None,
                   ca_file: str | None = None) -> ssl.SSLContext:
    """A dialing side's context; with ``ca_file`` the server's certificate must chain to it.

    ``cert_file``/``key_file`` are presented when a server asks (mutual TLS).
    """
    return _client_context(cert_file or None, key_file or None, ca_file or None)


def tls_contexts(config: MooncakeConfig) -> TlsContexts | None:
    """The contexts for ``config``'s ``tls`` section, or ``None`` when TLS is off.

    Raises :class:`ValueError` naming the file when a certificate, key or CA cannot be loaded.
    """
    t = config.tls
    if not t.enabled:
        return None
    return TlsContexts(server_context(t.cert_file, t.key_file, t.ca_file),
                       client_context(t.cert_file, t.key_file, t.ca_file))


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@functools.lru_cache(maxsize=16)
def _server_context(cert_file: str, key_file: str, ca_file: str | None) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, cert_file, key_file)
    if ca_file:
        _load_ca(ctx, ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@functools.lru_cache(maxsize=16)
def _client_context(cert_file: str | None, key_file: str | None,
                    ca_file: str | None) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # peers are dialed by address; the CA is the identity
    if ca_file:
        _load_ca(ctx, ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file and key_file:
        _load_chain(ctx, cert_file, key_file)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load TLS certificate {cert_file!r} / key {key_file!r}: "
                         f"{e}") from None


def _load_ca(ctx: ssl.SSLContext, ca_file: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load TLS CA file {ca_file!r}: {e}") from None


# -- throwaway PKI for tests and benchmarks ---------------------------------------------------


@dataclass(frozen=True)
class TestPki:
    """Files of a throwaway CA and one certificate it signed (for tests and benchmarks)."""

    __test__ = False  # not a pytest test class

    ca_file: str
    cert_file: str
    key_file: str

    def settings(self, *, mutual: bool = True) -> dict[str, object]:
        """Config overrides turning TLS on with these files (``load_config(overrides=...)``)."""
        return {"tls.enabled": True, "tls.cert_file": self.cert_file,
                "tls.key_file": self.key_file, "tls.ca_file": self.ca_file if mutual else ""}


def make_test_pki(directory: str | os.PathLike[str], name: str = "node",
                  days: int = 2) -> TestPki:
    """Write a fresh CA and a certificate for ``name`` (valid for 127.0.0.1 and localhost)
    signed by it into ``directory``. Two calls give two unrelated CAs.

    Uses the ``cryptography`` package; only for tests and benchmarks (keys are not protected).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mooncake test CA {name}")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = out / "ca.pem", out / f"{name}.pem", out / f"{name}.key"
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    return TestPki(str(ca_file), str(cert_file), str(key_file))
