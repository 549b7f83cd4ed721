#!/usr/bin/env bash
# Idempotent setup for `make bench`.
#
#   bash bench/setup.sh            apt tools (if missing) + mitmproxy venv (if missing/outdated)
#   bash bench/setup.sh --apt-only just the Debian packages (what `make apt-bench` runs)
#   bash bench/setup.sh --mitm-only just the mitmproxy venv
#
# Debian packages: nginx (origin), tinyproxy (contender), wrk (load), hey
# (optional cross-check client, `run.py --https-client hey`), curl (streaming).
# mitmproxy lives in its own venv, .bench/mitm-venv, never in the project venv:
# its pinned dependencies must not leak into the proxy's environment.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-all}"
PY="${PY:-python3.11}"
MITM_SPEC="${MITM_SPEC:-mitmproxy>=11,<12}"
MITM_VENV=".bench/mitm-venv"

# command -> Debian package
declare -A PKG=([nginx]=nginx [tinyproxy]=tinyproxy [wrk]=wrk [hey]=hey [curl]=curl)

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

apt_tools() {
    local missing=()
    for cmd in "${!PKG[@]}"; do have "$cmd" || missing+=("${PKG[$cmd]}"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    local SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "bench/setup.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        SUDO=(sudo)
    fi
    echo "bench/setup.sh: installing ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq
    # The packages' maintainer scripts may try to start system nginx/tinyproxy
    # services; the benchmark never uses those (it runs its own on free ports).
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

mitm_venv() {
    local stamp="$MITM_VENV/.spec"
    if [ -x "$MITM_VENV/bin/mitmdump" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$MITM_SPEC" ]; then
        return 0
    fi
    command -v "$PY" >/dev/null 2>&1 || PY=python3
    echo "bench/setup.sh: creating $MITM_VENV ($MITM_SPEC, $("$PY" --version 2>&1))"
    mkdir -p .bench
    rm -rf "$MITM_VENV"
    "$PY" -m venv "$MITM_VENV"
    "$MITM_VENV/bin/pip" install -q --upgrade pip
    "$MITM_VENV/bin/pip" install -q "$MITM_SPEC"
    echo "$MITM_SPEC" > "$stamp"
    local v; v="$("$MITM_VENV/bin/mitmdump" --version)"; echo "${v%%$'\n'*}"
}

case "$MODE" in
    --apt-only) apt_tools ;;
    --mitm-only) mitm_venv ;;
    all|"") apt_tools; mitm_venv ;;
    *) echo "usage: $0 [--apt-only|--mitm-only]" >&2; exit 2 ;;
esac
