"""The start-up check of an existing CA with the standard library only (proxy/tls/authority.py): the
same refusals as the full CertificateAuthority, and leaf contexts once loaded."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.tls.authority import CAError, InterceptionCA
from proxy.tls.ca import CertificateAuthority


def _cert(key: ec.EllipticCurvePrivateKey, *, ca: bool = True, days: int = 30) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, pem)
    os.close(fd)


def _pkcs8(key: object, encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


def _not_a_ca(home: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(home / "ca-key.pem", _pkcs8(key))
    (home / "ca.pem").write_bytes(_cert(key, ca=False))


def _expired(home: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(home / "ca-key.pem", _pkcs8(key))
    (home / "ca.pem").write_bytes(_cert(key, days=-1))


def _rsa_key(home: Path) -> None:
    _write_key(home / "ca-key.pem", _pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=2048)))


def _encrypted_key(home: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(home / "ca-key.pem", _pkcs8(key, serialization.BestAvailableEncryption(b"pw")))


def _other_key(home: Path) -> None:
    _write_key(home / "ca-key.pem", _pkcs8(ec.generate_private_key(ec.SECP256R1())))


def _garbage_cert(home: Path) -> None:
    (home / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")


def _garbage_key(home: Path) -> None:
    _write_key(home / "ca-key.pem", b"not a key")


def _open_mode(home: Path) -> None:
    os.chmod(home / "ca-key.pem", 0o644)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_not_a_ca, r"ca\.pem is not a CA certificate"),
        (_expired, r"ca\.pem expired on"),
        (_rsa_key, r"ca-key\.pem is not an EC private key"),
        (_encrypted_key, r"ca-key\.pem is corrupt, encrypted or unsupported"),
        (_other_key, r"ca\.pem does not match the key in .*ca-key\.pem"),
        (_garbage_cert, r"ca\.pem is corrupt"),
        (_garbage_key, r"ca-key\.pem is corrupt, encrypted or unsupported"),
        (_open_mode, r"ca-key\.pem is accessible by group/others"),
    ],
)
def test_a_bad_ca_is_refused_at_start_as_the_full_check_refuses_it(
    tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    home = tmp_path / "home"
    CertificateAuthority.load_or_create(home)
    damage(home)
    with pytest.raises(CAError, match=message):
        InterceptionCA.open(home)
    with pytest.raises(CAError):  # and the full check agrees it is bad
        CertificateAuthority.load_or_create(home)


def test_a_good_ca_opens_without_cryptography_and_issues_leaves(tmp_path: Path) -> None:
    home = tmp_path / "home"
    CertificateAuthority.load_or_create(home)
    code = (
        "import sys\nfrom pathlib import Path\nfrom proxy.tls.authority import InterceptionCA\n"
        f"ca = InterceptionCA.open(Path({str(home)!r}))\n"
        "print(any(m.startswith('cryptography.x509') for m in sys.modules))\n"
        "ca.leaf_context('example.test')\n"
        "print(any(m.startswith('cryptography.x509') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "True"], out


def test_a_first_start_creates_the_ca(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ca = InterceptionCA.open(home)
    assert ca.ca_pem_path == home / "ca.pem" and ca.ca_pem_path.exists()
    assert ca.leaf_context("localhost") is ca.leaf_context("localhost")
    assert InterceptionCA.open(home).authority().certificate == ca.authority().certificate


def test_the_first_interception_loads_the_ca_off_the_event_loop(tmp_path: Path) -> None:
    """The proxy's leaf contexts (front_door.py): import, file reads and checks in a worker thread."""
    home = tmp_path / "home"
    CertificateAuthority.load_or_create(home)
    code = (
        "import asyncio, sys, threading\nfrom pathlib import Path\nfrom proxy.tls.authority import InterceptionCA\n"
        "reads = []\n"
        "def audit(event, args):\n"
        "    if event == 'open' and str(args[0]).endswith('.pem'):\n"
        "        reads.append(threading.current_thread() is threading.main_thread())\n"
        "sys.addaudithook(audit)\n"
        f"ca = InterceptionCA.open(Path({str(home)!r}))\n"
        "on_loop = len(reads)\n"
        "asyncio.run(ca.leaf_context_off_loop('example.test'))\n"
        "print(on_loop, reads[on_loop:])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    checked_at_start, later = out.stdout.split(" ", 1)
    assert int(checked_at_start) >= 1, out  # the start's check_files, on the main thread
    # The full load reads key and certificate again, off the loop (the leaf's own temporary file follows).
    assert later.strip().startswith("[False, False"), out
