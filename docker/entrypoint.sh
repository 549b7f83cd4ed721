#!/bin/sh
# Entrypoint of the x402-proxy container (docker/entrypoint.sh -> /usr/local/bin/x402-proxy-entrypoint).
#
# Configuration is environment only: the proxy itself reads every X402_PROXY_SECTION__KEY variable
# (see config.example.toml), and the image's defaults are ENV lines in the Dockerfile, so that
# `docker exec` and the HEALTHCHECK see exactly what the proxy sees. This script adds one thing the
# proxy does not do: it copies the CA into a directory that agent containers mount, then hands over.
#
#   X402_PROXY_CA_EXPORT_DIR  where to write ca.pem (our CA alone, for NODE_EXTRA_CA_CERTS) and
#                             ca-bundle.pem (public roots + our CA, for SSL_CERT_FILE and friends);
#                             empty = no export
#   arguments                 passed on to `x402-proxy run` (e.g. --listen 0.0.0.0:9000)
set -eu

log() {
    printf 'x402-proxy-entrypoint: %s\n' "$*" >&2
}

# Copy under a temporary name, then rename: an agent starting at that moment never reads half a file.
publish() {
    tmp="$2.tmp.$$"
    cp "$1" "$tmp"
    chmod 0644 "$tmp"  # public certificates; the agent container runs as another user
    mv -f "$tmp" "$2"
}

export_ca() {
    mkdir -p "$1"
    # `x402-proxy env` creates the CA on first start and writes the combined bundle; its output names
    # both files. It also validates the config, so a refused setting stops us here, before anything
    # is published. (A separate assignment, so that `set -e` sees its exit status.)
    exports=$(x402-proxy env)
    (
        eval "$exports"
        publish "$NODE_EXTRA_CA_CERTS" "$1/ca.pem"
        publish "$SSL_CERT_FILE" "$1/ca-bundle.pem"
    )
    log "CA exported to $1/ca.pem (bundle with public roots: $1/ca-bundle.pem)"
}

if [ -n "${X402_PROXY_CA_EXPORT_DIR:-}" ]; then
    export_ca "$X402_PROXY_CA_EXPORT_DIR"
fi

# exec: the proxy becomes this process (PID 1 in the container) and receives SIGTERM itself, so
# `docker stop` drains in-flight requests instead of killing them.
exec x402-proxy run "$@"
