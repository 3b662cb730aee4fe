"""Certificates and keys for a deployment (``medgen certs init`` / ``medgen certs site A``).

    DIR/ca.pem, ca.key            the study's certificate authority (keep ca.key offline)
    DIR/server.pem, server.key    the SuperLink's TLS certificate (localhost + the given host names)
    DIR/study.key, study.pub      the coordinator's study-signing key pair (Ed25519, PEM): the
                                  server signs every run with study.key, the sites check it with
                                  study.pub (medgen/deployment/signing.py)
    DIR/sites/A.key, A.pub        site A's SuperNode key pair (EC P-384, OpenSSH format): the
                                  private key stays at the site, the public key is registered
                                  with the server

Only ``ca.pem``, ``study.pub`` and ``sites/<site>.key`` go to a site; the server needs ``ca.pem``,
``server.*``, ``study.key`` and every ``sites/*.pub``. Every private key is written to a new file
of random name in the target folder (``O_CREAT|O_EXCL``, mode 0600) and then renamed over the
target: a file or link planted beside it can neither read nor redirect the key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertError(ValueError):
    """A certificate or key file is missing or unusable; the text names it."""


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write ``data`` to ``path`` through a fresh temporary file in the same folder (mkstemp:
    O_CREAT|O_EXCL, mode 0600, random name), renamed over ``path``; public files end up 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if not private:
                os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medgen study"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts) -> x509.SubjectAlternativeName:
    entries = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def init_ca(out: str | Path, hosts: list[str] | tuple[str, ...] = (), days: int = 825,
            force: bool = False) -> dict[str, Path]:
    """Make the CA and the server certificate (valid for localhost plus ``hosts``)."""
    out = Path(out)
    if (out / "ca.key").exists() and not force:
        raise CertError(f"{out / 'ca.key'} already exists: a new CA would invalidate every certificate "
                        f"made with it (use --force to replace it)")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("medgen study CA")).issuer_name(_name("medgen study CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(names[0] if not hosts else hosts[0]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return {"ca": _write(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
            "ca-key": _write(out / "ca.key", _pem_key(ca_key), private=True),
            "cert": _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
            "key": _write(out / "server.key", _pem_key(key), private=True),
            **make_study_keys(out, force=True),
            "hosts": names}


def make_study_keys(out: str | Path, force: bool = False) -> dict[str, Path]:
    """The coordinator's study-signing key pair ``study.key`` (0600) / ``study.pub`` (Ed25519)."""
    from medgen.deployment.signing import make_study_key

    out = Path(out)
    if (out / "study.key").exists() and not force:
        raise CertError(f"{out / 'study.key'} already exists: a new key invalidates every site's study.pub "
                        f"(use --force to replace it, then send the new study.pub to every site)")
    private, public = make_study_key()
    return {"study-key": _write(out / "study.key", private, private=True),
            "study-pub": _write(out / "study.pub", public)}


def check_site_name(site: str) -> str:
    if not SITE_NAME.match(site):
        raise CertError(f"site name {site!r}: use letters, digits, '_', '.', '-' (at most 64 characters)")
    return site


def make_site_keys(out: str | Path, site: str, force: bool = False) -> dict[str, Path]:
    """Site ``site``'s SuperNode key pair: EC P-384 in OpenSSH format, as Flower expects."""
    folder = Path(out) / "sites"
    private = folder / f"{check_site_name(site)}.key"
    if private.exists() and not force:
        raise CertError(f"{private} already exists (use --force to replace it; then register the new public key)")
    key = ec.generate_private_key(ec.SECP384R1())
    comment = f" medgen-site-{site}".encode()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {"key": _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()), private=True),
            "pub": _write(folder / f"{site}.pub", pub + comment + b"\n")}


def site_public_keys(certs: str | Path) -> dict[str, Path]:
    """{site: public key file} of every ``sites/<site>.pub`` in a certificate folder."""
    return {p.stem: p for p in sorted((Path(certs) / "sites").glob("*.pub"))}


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise CertError(f"{path}: public key file not found") from None
    except (ValueError, TypeError) as e:
        raise CertError(f"{path}: not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{path}: a SuperNode key must be an EC (NIST curve) key, not {type(key).__name__}")
    return key


def check_private_key(path: str | Path) -> Path:
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise CertError(f"--key {path}: private key file not found (make one with `medgen certs site NAME`)") from None
    except (ValueError, TypeError) as e:
        raise CertError(f"--key {path}: not an unencrypted OpenSSH private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"--key {path}: a SuperNode key must be an EC key (make one with `medgen certs site NAME`)")
    return path


def check_cert(path: str | Path, flag: str) -> Path:
    path = Path(path)
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"{flag} {path}: certificate file not found (make one with `medgen certs init`)") from None
    except ValueError as e:
        raise CertError(f"{flag} {path}: not a PEM certificate ({e})") from None
    return path
