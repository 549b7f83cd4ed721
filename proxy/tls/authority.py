"""The interception CA as the running proxy holds it: checked at start with the standard library only,
its X.509 half loaded at the first TLS interception.

`cryptography.x509` and the hazmat primitives behind it are ~10 MiB of an idle proxy (bench/footprint.py),
used only to issue leaf certificates (proxy/tls/ca.py). So when the CA's files exist, the start checks
them with `ssl` (OpenSSL itself): the key file is a regular file readable by its owner only, an
unencrypted EC key; the certificate parses, is a CA and is not expired; key and certificate belong
together. The same messages as `CertificateAuthority` (`CAError`), before the proxy listens. The first
intercepted CONNECT imports proxy/tls/ca.py off the event loop (`TLS_MODULES`, proxy/warmup.py
`load_off_loop`, ~0.1 s once) and loads the CA with cryptography's full checks. A first start (no CA
yet) creates it with cryptography right away, as before.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from proxy.tls.keyfile import CA_CERT_NAME, CA_KEY_NAME, CAError, read_private_key
from proxy.warmup import load_off_loop

if TYPE_CHECKING:
    from proxy.tls.ca import CertificateAuthority

__all__ = ["CA_CERT_NAME", "CA_KEY_NAME", "TLS_MODULES", "CAError", "InterceptionCA", "read_private_key"]

# Imported off the loop before the first leaf certificate (front_door.py).
TLS_MODULES: Final = ("proxy.tls.ca",)
# id-ecPublicKey (1.2.840.10045.2.1), DER: in every PKCS#8 EC private key.
_EC_OID: Final = bytes.fromhex("06072a8648ce3d0201")
_PEM: Final = re.compile(rb"-----BEGIN ([A-Z ]+)-----\s+([A-Za-z0-9+/=\s]+?)-----END \1-----")


class _Encrypted(Exception):
    pass


def _no_password() -> str:
    raise _Encrypted


def _key_kind_problem(pem: bytes) -> str | None:
    found = _PEM.search(pem)
    if found is None:
        return "corrupt, encrypted or unsupported: no PEM key"
    label = found.group(1)
    if label == b"EC PRIVATE KEY":
        return None
    if label == b"ENCRYPTED PRIVATE KEY":
        return "corrupt, encrypted or unsupported: encrypted"
    if label != b"PRIVATE KEY":
        return "not an EC private key"
    try:
        der = base64.b64decode(b"".join(found.group(2).split()), validate=True)
    except ValueError:
        return "corrupt, encrypted or unsupported: bad base64"
    return None if _EC_OID in der[:32] else "not an EC private key"


def check_files(cert_path: Path, key_path: Path) -> None:
    """The start-up checks of an existing CA (see the module docstring); CAError names the problem."""
    problem = _key_kind_problem(read_private_key(key_path))
    if problem is not None:
        raise CAError(f"CA key {key_path} is {problem}")
    store = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        store.load_verify_locations(cafile=str(cert_path))
    except ssl.SSLError as exc:  # before OSError: it is one
        raise CAError(f"CA certificate {cert_path} is corrupt: {exc.reason or exc}") from exc
    except OSError as exc:
        raise CAError(f"cannot read CA certificate {cert_path}: {exc.strerror}") from exc
    certs = store.get_ca_certs()  # only what OpenSSL deems a CA (basicConstraints CA:TRUE)
    if not certs:
        raise CAError(f"CA certificate {cert_path} is not a CA certificate")
    not_after = ssl.cert_time_to_seconds(str(certs[0]["notAfter"]))
    if not_after <= time.time():
        expired = time.strftime("%Y-%m-%d", time.gmtime(not_after))
        raise CAError(
            f"CA certificate {cert_path} expired on {expired}; "
            f"remove {cert_path} and its key to create a new CA"
        )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(str(cert_path), str(key_path), password=_no_password)
    except _Encrypted:
        raise CAError(f"CA key {key_path} is corrupt, encrypted or unsupported: encrypted") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise CAError(f"CA certificate {cert_path} does not match the key in {key_path}") from exc
        raise CAError(f"CA key {key_path} is corrupt, encrypted or unsupported: {exc.reason or exc}") from exc


class InterceptionCA:
    """The running proxy's CA: `ca_pem_path` at once, leaf contexts from the full CA once loaded."""

    def __init__(self, home: Path, loaded: CertificateAuthority | None = None) -> None:
        self._home = home
        self._loaded = loaded
        self._lock = threading.Lock()

    @classmethod
    def open(cls, home: Path) -> InterceptionCA:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = home / CA_CERT_NAME, home / CA_KEY_NAME
        if cert_path.exists() and key_path.exists():
            check_files(cert_path, key_path)
            return cls(home)
        from proxy.tls.ca import CertificateAuthority  # a first start: the CA is made now

        return cls(home, CertificateAuthority.load_or_create(home))

    @property
    def ca_pem_path(self) -> Path:
        return self._home / CA_CERT_NAME

    def authority(self) -> CertificateAuthority:
        """The full CA (cryptography), loaded and checked on first use."""
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    from proxy.tls.ca import CertificateAuthority

                    self._loaded = CertificateAuthority.load_or_create(self._home)
        return self._loaded

    def leaf_context(self, host: str) -> ssl.SSLContext:
        """As `CertificateAuthority.leaf_context`; CAError if the CA's files went bad since the start."""
        return self.authority().leaf_context(host)

    async def leaf_context_off_loop(self, host: str) -> ssl.SSLContext:
        """`leaf_context` for the event loop: the first call imports proxy/tls/ca.py and reads and checks
        the CA's files in a worker thread, so an interception never stalls other connections on them."""
        if self._loaded is None:
            await load_off_loop(TLS_MODULES)
            await asyncio.to_thread(self.authority)
        return self.leaf_context(host)
