"""Local certificate authority and per-host leaf certificates for TLS interception.

The running proxy loads this module (and cryptography's X.509 half) at its first interception
(proxy/tls/authority.py); the CLI and a first start use it directly."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import os
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Final

import idna
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.tls.keyfile import CA_CERT_NAME, CA_KEY_NAME, CAError, read_private_key

__all__ = ["CA_CERT_NAME", "CA_KEY_NAME", "CAError", "CertificateAuthority"]

CA_COMMON_NAME: Final = "x402-proxy local CA"
CA_VALIDITY: Final = dt.timedelta(days=3650)
# 397 days: the ceiling browsers enforce on public leaves; some clients apply it to private roots too.
LEAF_VALIDITY: Final = dt.timedelta(days=397)
# Backdating absorbs clock skew between this machine and clients (VMs and containers drift).
LEAF_BACKDATE: Final = dt.timedelta(days=1)
LEAF_CACHE_SIZE: Final = 1024
# RFC 5280 upper bound for commonName; longer names go in the SAN only.
_CN_MAX: Final = 64
# Underscores are invalid in IDNA labels but occur in real hostnames, so ASCII names skip IDNA.
_ASCII_HOST: Final = re.compile(r"^[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*$")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + mode at creation: the key is never visible with looser permissions, not even briefly.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    try:
        if mode & 0o044:
            # The umask may have stripped read bits the public cert needs; set them before any data lands.
            os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_new(path: Path, data: bytes, mode: int) -> bool:
    """Atomically create `path` with `data`; False if another process created it first."""
    # Written under a temp name first so a crash never leaves a half-written PEM under the real name.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        _write_new_file(tmp, data, mode)
        try:
            # link() refuses to overwrite, so two first runs racing each other converge on one CA.
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: accept last-writer-wins for this rare race.
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _build_ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    # The suffix makes each install's CA distinguishable in trust stores and in `openssl x509` output.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_COMMON_NAME} {secrets.token_hex(4)}")])
    now = _utcnow()
    pub = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - LEAF_BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: this CA only ever signs leaves; a stolen key cannot mint intermediates.
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, hashes.SHA256())
    )


def _normalize_host(host: str) -> str:
    """Canonical cache key: lowercase A-label name, or compressed IP literal."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return ipaddress.ip_address(h).compressed
    except ValueError:
        pass
    h = h.rstrip(".").lower()
    if _ASCII_HOST.match(h):
        return h
    try:
        return idna.encode(h, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"invalid hostname for a TLS certificate: {host!r}") from exc


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class CertificateAuthority:
    """A persisted CA plus an in-process cache of server contexts, one per intercepted host."""

    def __init__(self, home: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self._home = home
        self._cert = cert
        self._key = key
        ski = _ski(cert)
        self._aki = (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
            if ski is not None
            else x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        )
        # One leaf key for every host: EC keygen is cheap, but sharing it makes each new host cost one
        # signature, and it is never persisted.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._leaf_ski = x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key())
        self._scratch_lock = threading.Lock()
        self._scratch: str | None = None
        self._scratch_finalizer: weakref.finalize[[str], CertificateAuthority] | None = None
        self._context_for = functools.lru_cache(maxsize=LEAF_CACHE_SIZE)(self._build_context)

    @classmethod
    def load_or_create(cls, home: Path) -> CertificateAuthority:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path = home / CA_CERT_NAME
        key_path = home / CA_KEY_NAME
        cert_exists = cert_path.exists()
        key_exists = key_path.exists()

        if not key_exists:
            if cert_exists:
                # Regenerating would silently invalidate a CA the user may already have put in trust stores.
                raise CAError(
                    f"CA certificate {cert_path} exists but its key {key_path} is missing; "
                    f"remove {cert_path} to create a new CA (and re-trust it)"
                )
            key = ec.generate_private_key(ec.SECP256R1())
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if not _publish_new(key_path, key_pem, 0o600):
                key = cls._load_key(key_path)
        else:
            key = cls._load_key(key_path)

        if not cert_exists:
            # Also reached when a previous run died between writing the key and the cert: nobody can have
            # trusted a cert that was never written, so issuing one for the existing key is safe.
            cert = _build_ca_cert(key)
            if not _publish_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644):
                cert = cls._load_cert(cert_path)
        else:
            cert = cls._load_cert(cert_path)

        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise CAError(f"CA certificate {cert_path} does not match the key in {key_path}")
        return cls(home, cert, key)

    @staticmethod
    def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
        data = read_private_key(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CAError(f"CA key {path} is corrupt, encrypted or unsupported: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"CA key {path} is not an EC private key")
        return key

    @staticmethod
    def _load_cert(path: Path) -> x509.Certificate:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except OSError as exc:
            raise CAError(f"cannot read CA certificate {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise CAError(f"CA certificate {path} is corrupt: {exc}") from exc
        if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
            raise CAError(f"CA certificate {path} does not hold an EC public key")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        except ValueError as exc:
            raise CAError(f"CA certificate {path} has malformed extensions: {exc}") from exc
        if bc is None or not bc.ca:
            raise CAError(f"CA certificate {path} is not a CA certificate")
        if cert.not_valid_after_utc <= _utcnow():
            raise CAError(
                f"CA certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                f"remove {path} and its key to create a new CA"
            )
        return cert

    @property
    def ca_pem_path(self) -> Path:
        return self._home / CA_CERT_NAME

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def leaf_context(self, host: str) -> ssl.SSLContext:
        """Server-side context presenting a certificate for `host` (a DNS name or IP literal).

        Raises ValueError for names that cannot appear in a certificate.
        """
        return self._context_for(_normalize_host(host))

    def cache_info(self) -> functools._CacheInfo:
        return self._context_for.cache_info()

    def _build_leaf(self, host: str) -> x509.Certificate:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        # An empty subject is allowed only with a critical SAN (RFC 5280 4.2.1.6).
        cn = [x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= _CN_MAX else []
        subject = x509.Name(cn)
        now = _utcnow()
        # A leaf outliving its issuer fails verification in strict clients, so clamp to the CA's lifetime.
        not_after = min(now + LEAF_VALIDITY, self._cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=len(subject) == 0)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._leaf_ski, critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _build_context(self, host: str) -> ssl.SSLContext:
        cert_pem = self._build_leaf(host).public_bytes(serialization.Encoding.PEM)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Only HTTP/1.1 is proxied; advertising h2 would have clients speak what the handler cannot parse.
        ctx.set_alpn_protocols(["http/1.1"])
        self._load_chain(ctx, cert_pem)
        return ctx

    def _load_chain(self, ctx: ssl.SSLContext, cert_pem: bytes) -> None:
        # The ssl module only loads cert chains from paths (~1 ms per host all told, measured). The file lives
        # in a 0700 directory, is created 0600 with O_EXCL, and exists only while load_cert_chain reads it.
        for attempt in range(2):
            scratch = self._scratch_dir()
            try:
                fd, path = tempfile.mkstemp(dir=scratch, suffix=".pem")
            except FileNotFoundError:
                if attempt:
                    raise
                # Long-running processes can have their temp dir reaped (systemd-tmpfiles); make a fresh one
                # instead of recreating a name someone else could have claimed meanwhile.
                with self._scratch_lock:
                    if self._scratch == scratch:
                        self._scratch = None
                continue
            try:
                try:
                    _write_all(fd, self._leaf_key_pem + cert_pem)
                finally:
                    os.close(fd)
                ctx.load_cert_chain(path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return

    def _scratch_dir(self) -> str:
        with self._scratch_lock:
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix="x402-proxy-tls-")
                if self._scratch_finalizer is not None:
                    self._scratch_finalizer.detach()
                # Leaf key material may sit here for microseconds; remove the directory with the CA object.
                self._scratch_finalizer = weakref.finalize(self, _remove_tree, self._scratch)
            return self._scratch
