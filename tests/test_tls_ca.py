"""Local CA, leaf contexts and trust bundles, exercised with real TLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.tls.ca import CAError, CertificateAuthority
from proxy.tls.trust import upstream_client_context, write_combined_bundle


def strict_client(cafile: Path | str | None = None) -> ssl.SSLContext:
    # Python 3.13's create_default_context adds exactly these flags; set them here so 3.11/3.12 test the same.
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


@asynccontextmanager
async def tls_echo_server(ctx: ssl.SSLContext, host: str = "127.0.0.1") -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(100)
            writer.write(data)
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def handshake(
    port: int, client: ssl.SSLContext, server_hostname: str, host: str = "127.0.0.1"
) -> tuple[bytes, str | None]:
    """Connect, round-trip a payload, and return the peer cert (DER) and negotiated ALPN."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=client, server_hostname=server_hostname), 10
    )
    try:
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(100), 10) == b"ping"
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True)
        return der, sslobj.selected_alpn_protocol()
    finally:
        writer.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "home")


# --- CA files -------------------------------------------------------------------------------------------


def test_ca_created_with_modes_and_reloaded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ca = CertificateAuthority.load_or_create(home)
    assert mode(home) == 0o700
    assert mode(home / "ca-key.pem") == 0o600
    assert mode(home / "ca.pem") == 0o644
    assert ca.ca_pem_path == home / "ca.pem"
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]

    cert = x509.load_pem_x509_certificate((home / "ca.pem").read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str) and cn.startswith("x402-proxy local CA ")
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1

    before = ((home / "ca.pem").read_bytes(), (home / "ca-key.pem").read_bytes())
    again = CertificateAuthority.load_or_create(home)
    assert again.certificate == ca.certificate
    assert ((home / "ca.pem").read_bytes(), (home / "ca-key.pem").read_bytes()) == before

    # Two installs must be distinguishable in a trust store.
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    assert other.certificate.subject != ca.certificate.subject


def test_key_created_0600_despite_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        CertificateAuthority.load_or_create(tmp_path / "home")
    finally:
        os.umask(old)
    assert mode(tmp_path / "home" / "ca-key.pem") == 0o600
    assert mode(tmp_path / "home" / "ca.pem") == 0o644


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644])
def test_insecure_key_mode_refused(tmp_path: Path, bad_mode: int) -> None:
    home = tmp_path / "home"
    CertificateAuthority.load_or_create(home)
    os.chmod(home / "ca-key.pem", bad_mode)
    with pytest.raises(CAError, match=r"ca-key\.pem"):
        CertificateAuthority.load_or_create(home)


def test_mismatched_cert_and_key_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.load_or_create(a)
    CertificateAuthority.load_or_create(b)
    (a / "ca.pem").write_bytes((b / "ca.pem").read_bytes())
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load_or_create(a)


def test_corrupt_files_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    CertificateAuthority.load_or_create(home)
    good_cert = (home / "ca.pem").read_bytes()
    (home / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with pytest.raises(CAError, match=r"ca\.pem"):
        CertificateAuthority.load_or_create(home)

    (home / "ca.pem").write_bytes(good_cert)
    fd = os.open(home / "ca-key.pem", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(CAError, match=r"ca-key\.pem"):
        CertificateAuthority.load_or_create(home)


def test_cert_without_key_refused_key_without_cert_recovered(tmp_path: Path) -> None:
    home = tmp_path / "home"
    CertificateAuthority.load_or_create(home)
    key = (home / "ca-key.pem").read_bytes()

    # A run that died after writing the key: the cert is reissued for the same key.
    (home / "ca.pem").unlink()
    ca = CertificateAuthority.load_or_create(home)
    assert (home / "ca-key.pem").read_bytes() == key
    assert ca.ca_pem_path.exists()

    (home / "ca-key.pem").unlink()
    with pytest.raises(CAError, match=r"ca-key\.pem"):
        CertificateAuthority.load_or_create(home)


# --- Leaf contexts and handshakes ------------------------------------------------------------------------


def webpki_verify(ca: CertificateAuthority, der: bytes, subject: x509.DNSName | x509.IPAddress) -> None:
    # cryptography's verifier follows the CA/B-Forum profile (like rustls/Go), stricter than OpenSSL.
    leaf = x509.load_der_x509_certificate(der)
    store = xv.Store([ca.certificate])
    verifier = xv.PolicyBuilder().store(store).build_server_verifier(subject)
    verifier.verify(leaf, [])


async def test_handshake_dns_name_strict(ca: CertificateAuthority) -> None:
    async with tls_echo_server(ca.leaf_context("localhost")) as port:
        der, alpn = await handshake(port, strict_client(ca.ca_pem_path), "localhost")
    assert alpn == "http/1.1"
    leaf = x509.load_der_x509_certificate(der)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["localhost"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).critical
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert 397 <= days <= 399
    webpki_verify(ca, der, x509.DNSName("localhost"))


async def test_handshake_ipv4_literal_strict(ca: CertificateAuthority) -> None:
    async with tls_echo_server(ca.leaf_context("127.0.0.1")) as port:
        der, _ = await handshake(port, strict_client(ca.ca_pem_path), "127.0.0.1")
    leaf = x509.load_der_x509_certificate(der)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == []
    webpki_verify(ca, der, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_handshake_ipv6_literal_strict(ca: CertificateAuthority) -> None:
    # CONNECT targets carry IPv6 literals in brackets; both spellings must map to the same certificate.
    assert ca.leaf_context("[::1]") is ca.leaf_context("0:0::1")
    async with tls_echo_server(ca.leaf_context("[::1]"), host="::1") as port:
        await handshake(port, strict_client(ca.ca_pem_path), "::1", host="::1")


async def test_idn_host_gets_a_label(ca: CertificateAuthority) -> None:
    async with tls_echo_server(ca.leaf_context("Bücher.Example")) as port:
        der, _ = await handshake(port, strict_client(ca.ca_pem_path), "xn--bcher-kva.example")
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["xn--bcher-kva.example"]
    assert ca.leaf_context("xn--bcher-kva.example") is ca.leaf_context("bücher.example")


async def test_long_hostname_without_cn(ca: CertificateAuthority) -> None:
    host = ".".join(["a" * 40, "b" * 40, "example"])
    async with tls_echo_server(ca.leaf_context(host)) as port:
        der, _ = await handshake(port, strict_client(ca.ca_pem_path), host)
    leaf = x509.load_der_x509_certificate(der)
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


async def test_client_not_trusting_ca_fails(ca: CertificateAuthority) -> None:
    async with tls_echo_server(ca.leaf_context("localhost")) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(port, strict_client(certifi.where()), "localhost")
        # Trusting the CA but asking for another name must fail too: the leaf is host-specific.
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(port, strict_client(ca.ca_pem_path), "example.com")


async def test_other_install_ca_not_trusted(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    async with tls_echo_server(other.leaf_context("localhost")) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(port, strict_client(ca.ca_pem_path), "localhost")


def test_invalid_hostname_rejected(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError):
        ca.leaf_context("bad host!")


def test_leaf_cache_and_timing(ca: CertificateAuthority) -> None:
    def timed(fn: Callable[[], ssl.SSLContext]) -> tuple[ssl.SSLContext, float]:
        t0 = time.perf_counter()
        ctx = fn()
        return ctx, (time.perf_counter() - t0) * 1000

    first, t_first = timed(lambda: ca.leaf_context("cache.example"))
    cached, t_cached = timed(lambda: ca.leaf_context("cache.example"))
    assert cached is first
    assert ca.leaf_context("CACHE.example.") is first
    assert ca.leaf_context("other.example") is not first

    n = 200
    t0 = time.perf_counter()
    for i in range(n):
        ca.leaf_context(f"h{i}.bench.example")
    t_avg = (time.perf_counter() - t0) * 1000 / n
    t0 = time.perf_counter()
    for i in range(n):
        ca.leaf_context(f"h{i}.bench.example")
    t_hit = (time.perf_counter() - t0) * 1000 / n
    print(
        f"\nleaf_context: first {t_first:.3f} ms, cached {t_cached * 1000:.1f} us; "
        f"{n} new hosts avg {t_avg:.3f} ms, cache hits avg {t_hit * 1000:.1f} us"
    )


# --- Trust bundle and upstream context -------------------------------------------------------------------


async def test_combined_bundle(ca: CertificateAuthority, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bundle = write_combined_bundle(home, ca.ca_pem_path)
    assert bundle == home / "ca-bundle.pem"
    assert mode(bundle) == 0o644
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]

    # Compared as DER via the ssl module: certifi holds a legacy root with a negative serial that
    # cryptography warns about (and will eventually refuse to parse).
    def ders(pem: bytes) -> list[bytes]:
        marker = "-----END CERTIFICATE-----"
        blocks = pem.decode().split(marker)[:-1]
        return [ssl.PEM_cert_to_DER_cert(b[b.index("-----BEGIN") :] + marker) for b in blocks]

    certs = ders(bundle.read_bytes())
    system = ders(Path(certifi.where()).read_bytes())
    ours = ders(ca.ca_pem_path.read_bytes())
    assert certs == [*system, *ours]
    loaded = ssl.create_default_context(cafile=str(bundle))
    assert loaded.cert_store_stats()["x509_ca"] == len(certs)

    # Rewriting replaces rather than appends.
    assert write_combined_bundle(home, ca.ca_pem_path) == bundle
    assert ders(bundle.read_bytes()) == certs

    async with tls_echo_server(ca.leaf_context("localhost")) as port:
        await handshake(port, strict_client(bundle), "localhost")


async def test_upstream_context_verifies(ca: CertificateAuthority) -> None:
    plain = upstream_client_context(None)
    assert plain.check_hostname and plain.verify_mode == ssl.CERT_REQUIRED
    assert plain.minimum_version >= ssl.TLSVersion.TLSv1_2
    # Public roots are loaded even when SSL_CERT_FILE is not consulted.
    assert plain.cert_store_stats()["x509_ca"] > 50

    async with tls_echo_server(ca.leaf_context("localhost")) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(port, plain, "localhost")
        _, alpn = await handshake(port, upstream_client_context(ca.ca_pem_path), "localhost")
    assert alpn == "http/1.1"


def test_upstream_context_missing_extra_bundle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        upstream_client_context(tmp_path / "nope.pem")


def test_scratch_dir_private_empty_and_recreated(ca: CertificateAuthority) -> None:
    import shutil

    ca.leaf_context("one.example")
    scratch = Path(ca._scratch_dir())
    assert mode(scratch) == 0o700
    # Leaf key material must not linger after the context is built.
    assert list(scratch.iterdir()) == []

    # A temp cleaner reaping the directory must not break later hosts.
    shutil.rmtree(scratch)
    ca.leaf_context("two.example")
    assert Path(ca._scratch_dir()) != scratch
