"""Trust material: the combined CA bundle handed to clients, and the context used to reach upstreams."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import Final

__all__ = ["BUNDLE_NAME", "system_roots_file", "upstream_client_context", "write_combined_bundle"]

log = logging.getLogger(__name__)

BUNDLE_NAME: Final = "ca-bundle.pem"


def system_roots_file() -> Path | None:
    """A PEM file of public roots: certifi's if installed, else the one OpenSSL was built to use."""
    try:
        # Optional: some distro builds of dependencies drop it.
        import certifi

        return Path(certifi.where())
    except ImportError:
        pass
    # Only OpenSSL's compiled-in location: `.cafile` follows SSL_CERT_FILE, which may name our own bundle
    # (the bundle would then grow by one copy per run, and upstreams could present our CA).
    cafile = ssl.get_default_verify_paths().openssl_cafile
    if cafile and os.path.isfile(cafile):
        return Path(cafile)
    return None


def write_combined_bundle(home: Path, ca_pem: Path) -> Path:
    """Write `home/ca-bundle.pem` = public roots + our CA, and return its path.

    SSL_CERT_FILE, REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE *replace* a client's default roots, so pointing them
    at our CA alone would break every connection that does not go through the proxy.
    """
    ours = ca_pem.read_bytes()
    roots_path = system_roots_file()
    if roots_path is None:
        log.warning("no system CA bundle found; %s will trust only the x402-proxy CA", BUNDLE_NAME)
        roots = b""
    else:
        roots = roots_path.read_bytes()
    if roots and not roots.endswith(b"\n"):
        roots += b"\n"
    data = roots + b"\n# x402-proxy local CA (" + str(ca_pem).encode() + b")\n" + ours

    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = home / BUNDLE_NAME
    # Clients may read the bundle at any moment (another agent starting up); rename makes the swap atomic.
    fd, tmp = tempfile.mkstemp(dir=home, prefix=f".{BUNDLE_NAME}.", suffix=".tmp")
    try:
        try:
            # mkstemp creates 0600; the bundle holds only public certificates and may be read by other users'
            # tools (e.g. a sandboxed agent), so match the CA cert's mode.
            os.fchmod(fd, 0o644)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def upstream_client_context(extra_ca_bundle: Path | None) -> ssl.SSLContext:
    """Client context for origin servers: public roots plus an optional operator-supplied CA file or dir.

    The process's own SSL_CERT_FILE is deliberately not consulted: it may point at the combined bundle,
    and the proxy must never accept its own CA from an upstream.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode=CERT_REQUIRED, check_hostname=True
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    roots = system_roots_file()
    if roots is not None:
        ctx.load_verify_locations(cafile=roots)
    else:
        # capath alone (e.g. /etc/ssl/certs) still works on distros without a single bundle file.
        ctx.load_verify_locations(capath=ssl.get_default_verify_paths().openssl_capath)
    if extra_ca_bundle is not None:
        if extra_ca_bundle.is_dir():
            ctx.load_verify_locations(capath=extra_ca_bundle)
        elif extra_ca_bundle.is_file():
            ctx.load_verify_locations(cafile=extra_ca_bundle)
        else:
            raise FileNotFoundError(f"extra CA bundle {extra_ca_bundle} does not exist")
    # The upstream connection carries the client's HTTP/1.1 request bytes as-is.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
