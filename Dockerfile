# x402-proxy as a sidecar container. Usage, trust and security notes: docs/sidecar.md;
# a compose example with an agent container: examples/sidecar/.
#
#   docker build -t x402-proxy .
#   docker run -e X402_PROXY_PROXY__AUTH__USERNAME=agent -e X402_PROXY_PROXY__AUTH__PASSWORD=... x402-proxy
#
# tests/test_sidecar.py runs this image's entrypoint, ENV and HEALTHCHECK command as plain processes.

# -- build: the project and its dependencies in a virtualenv (binary wheels only, no compiler needed) --
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir /src

# -- runtime ------------------------------------------------------------------------------------------
FROM python:3.11-slim

# A fixed numeric uid, so orchestrators can check "runs as non-root" and volumes can be chowned ahead.
# The state home (CA key, wallet ledger, admin token) is private to it; the CA export dir is public.
RUN useradd --system --uid 10402 --user-group --no-create-home \
        --home-dir /var/lib/x402-proxy --shell /usr/sbin/nologin x402 \
 && install -d -o 10402 -g 10402 -m 0700 /var/lib/x402-proxy \
 && install -d -o 10402 -g 10402 -m 0755 /x402-ca

COPY --from=build /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/x402-proxy-entrypoint

# Defaults live here rather than in the entrypoint: `docker exec` and the HEALTHCHECK get these ENV
# lines but not what a script exports, and they must resolve the same addresses as the proxy.
# The proxy listens on every interface; it refuses to start there without proxy auth
# (X402_PROXY_PROXY__AUTH__USERNAME / __PASSWORD). The admin API stays on loopback unless you set
# X402_PROXY_ADMIN__LISTEN=0.0.0.0:8403 and X402_PROXY_ADMIN__ALLOW_REMOTE=true (see docs/sidecar.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    X402_PROXY_HOME=/var/lib/x402-proxy \
    X402_PROXY_CA_EXPORT_DIR=/x402-ca \
    X402_PROXY_PROXY__LISTEN=0.0.0.0:8402 \
    X402_PROXY_ADMIN__LISTEN=127.0.0.1:8403

USER 10402:10402
WORKDIR /var/lib/x402-proxy
VOLUME ["/var/lib/x402-proxy", "/x402-ca"]
EXPOSE 8402 8403

# No curl in the slim image: `x402-proxy health` finds the admin address and token the way the proxy
# does and exits 0 only when /healthz answers 200.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["x402-proxy", "health"]

# The entrypoint exports the CA into /x402-ca, then execs `x402-proxy run` (which gets SIGTERM and drains).
ENTRYPOINT ["/usr/local/bin/x402-proxy-entrypoint"]
