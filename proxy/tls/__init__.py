"""TLS interception: the local CA, per-host leaf contexts, and trust material for clients and upstreams."""

from proxy.tls.ca import CAError, CertificateAuthority
from proxy.tls.trust import upstream_client_context, write_combined_bundle

__all__ = ["CAError", "CertificateAuthority", "upstream_client_context", "write_combined_bundle"]
