"""TLS interception: the local CA, per-host leaf contexts, and trust material for clients and upstreams.

`CertificateAuthority` (proxy/tls/ca.py, cryptography's X.509) is imported on first use, so importing
this package does not load it (proxy/tls/authority.py)."""

from typing import Any

from proxy.tls.authority import CAError, InterceptionCA
from proxy.tls.trust import upstream_client_context, write_combined_bundle

__all__ = [
    "CAError",
    "CertificateAuthority",
    "InterceptionCA",
    "upstream_client_context",
    "write_combined_bundle",
]


def __getattr__(name: str) -> Any:
    if name == "CertificateAuthority":
        from proxy.tls.ca import CertificateAuthority

        return CertificateAuthority
    raise AttributeError(name)
