"""Secrets for a test broker: mosquitto password lines and a throw-away TLS CA.

:func:`mosquitto_password_line` hashes like ``mosquitto_passwd`` (PBKDF2-SHA512,
``$7$``); :func:`make_test_certificates` makes a CA and a server certificate for
the given hosts with the ``cryptography`` package if installed, else the
``openssl`` CLI (:func:`tls_tooling` says which, or None). Used by
:mod:`simulators.broker` and the tests.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import shutil
import subprocess
from pathlib import Path

__all__ = ["BrokerUnavailable", "make_test_certificates", "mosquitto_password_line", "tls_tooling"]


class BrokerUnavailable(RuntimeError):
    """The requested broker cannot run here (binary not installed, no TLS tooling, ...)."""


def mosquitto_password_line(user: str, password: str, iterations: int = 101) -> str:
    """One line of a mosquitto 2 password file, hashed as ``mosquitto_passwd`` does.

    Format ``user:$7$<iterations>$<salt b64>$<PBKDF2-SHA512 digest b64>``, 12-byte salt.
    """
    if ":" in user:
        raise ValueError(f"a mosquitto user name cannot contain ':' ({user!r})")
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"{user}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


# ------------------------------------------------------------------ TLS material
def tls_tooling() -> str | None:
    """``"cryptography"`` or ``"openssl"`` (what can make certificates here), or None."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        pass
    else:
        return "cryptography"
    if shutil.which("openssl"):
        return "openssl"
    return None


def make_test_certificates(
    directory: Path,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    *,
    client_auth: bool = False,
) -> tuple[Path, Path, Path]:
    """Write a throw-away CA and a server certificate for ``hosts`` (valid 2 days).

    Returns ``(ca.crt, server.crt, server.key)``. EC P-256 keys. ``client_auth``: the
    certificate is a client's too (extended key usage clientAuth besides serverAuth), as a
    Ray node's with TLS is: it shows the same one when it calls the others. Raises
    :class:`BrokerUnavailable` when neither ``cryptography`` nor ``openssl`` exists.
    """
    tool = tls_tooling()
    if tool == "cryptography":
        return _certs_cryptography(directory, hosts, client_auth)
    if tool == "openssl":
        return _certs_openssl(directory, hosts, client_auth)
    raise BrokerUnavailable(
        "cannot generate TLS certificates: neither the 'cryptography' package nor the 'openssl' CLI is available"
    )


def _certs_openssl(
    directory: Path, hosts: tuple[str, ...], client_auth: bool
) -> tuple[Path, Path, Path]:
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth{',clientAuth' if client_auth else ''}\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "2",
         "-subj", "/CN=labbridge test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={hosts[0]}"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-set_serial", str(secrets.randbits(63)), "-out", crt, "-days", "2", "-extfile", ext],
    ]  # fmt: skip
    for cmd in commands:
        result = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, check=False, timeout=30
        )
        if result.returncode != 0:
            raise BrokerUnavailable(
                f"openssl failed ({' '.join(map(str, cmd[:3]))}): {result.stderr.strip()}"
            )
    return ca_crt, crt, key


def _certs_cryptography(
    directory: Path, hosts: tuple[str, ...], client_auth: bool
) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    later = now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labbridge test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(later)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH]
                + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    no_crypt = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    ca_crt, crt, key_file = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_crt.write_bytes(ca_cert.public_bytes(pem))
    crt.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, pkcs8, no_crypt))
    (directory / "ca.key").write_bytes(ca_key.private_bytes(pem, pkcs8, no_crypt))
    return ca_crt, crt, key_file


# ---------------------------------------------------------------------- brokers
