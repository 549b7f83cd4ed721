"""Signed session tokens: round trip, tampering, signer, time window, scope."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, replace
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from hypothesis import given
from hypothesis import strategies as st

from proxy.sessions.model import Session
from proxy.sessions.scope import Scope
from proxy.tokens import (
    HEADER_SESSION,
    HEADER_TOKEN,
    HEADER_WALLET,
    InvalidSessionToken,
    SessionClaim,
    canonical_json,
    decode_session_token,
    make_session_token,
    session_token_headers,
    verify_session_token,
)

ACCOUNT = Account.from_key("0x" + "42" * 32)
OTHER = Account.from_key("0x" + "43" * 32)
NOW = 1_700_000_000
SID = "0b7f6a1e-7c1d-4a55-9c43-2a7e2b1d9f00"


def claim(**changes: Any) -> SessionClaim:
    base = SessionClaim(
        session_id=SID,
        address=ACCOUNT.address,
        origin="https://api.x.com",
        scope="prefix",
        path="/v1",
        query=None,
        issued_at=NOW,
        expires_at=NOW + 3600,
        tx_hash="0x" + "ab" * 32,
        amount="10000",
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        network="eip155:84532",
        pay_to="0x" + "22" * 20,
    )
    return replace(base, **changes)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reason(token: str, **kwargs: Any) -> str:
    kwargs.setdefault("now", NOW + 10)
    with pytest.raises(InvalidSessionToken) as info:
        verify_session_token(token, **kwargs)
    return info.value.reason


def test_round_trip_and_wire_format() -> None:
    c = claim()
    token = make_session_token(c, ACCOUNT)
    payload, signature = token.split(".")
    assert "=" not in payload and signature.startswith("0x") and len(signature) == 132
    raw = base64.urlsafe_b64decode(payload + "==")
    assert raw == c.canonical_json()
    assert b" " not in raw and json.loads(raw) == asdict(c)
    assert list(json.loads(raw)) == sorted(json.loads(raw))
    # EIP-191 personal_sign over exactly the decoded bytes: any eth library can check it.
    assert Account.recover_message(encode_defunct(primitive=raw), signature=signature) == ACCOUNT.address
    got = verify_session_token(
        token, url="https://api.x.com/v1/chat", wallet=ACCOUNT.address.lower(), now=NOW + 10, session_id=SID
    )
    assert got == c
    assert decode_session_token(token)[0] == c
    assert session_token_headers(token, ACCOUNT.address, SID) == {
        HEADER_TOKEN: token,
        HEADER_WALLET: ACCOUNT.address,
        HEADER_SESSION: SID,
    }


def test_for_session() -> None:
    session = Session.create(Scope.from_url("https://api.x.com:8443/v1/x?q=1", "exact"), now=NOW + 0.7)
    session.amount_paid, session.asset, session.network = 5, "0x" + "11" * 20, "eip155:8453"
    c = SessionClaim.for_session(session, address=ACCOUNT.address, tx_hash=None)
    assert (c.origin, c.scope, c.path, c.query) == ("https://api.x.com:8443", "exact", "/v1/x", "q=1")
    assert (c.issued_at, c.expires_at, c.amount, c.tx_hash) == (NOW, NOW + 3600, "5", None)
    token = make_session_token(c, ACCOUNT)
    assert verify_session_token(token, url="https://api.x.com:8443/v1/x?q=1", now=NOW + 1) == c
    assert reason(token, url="https://api.x.com:8443/v1/x?q=2") == "out_of_scope"
    assert reason(token, url="https://api.x.com/v1/x?q=1") == "out_of_scope"


def test_non_ascii_is_utf8_not_escaped() -> None:
    c = claim(path="/v1/%C3%A4")
    assert canonical_json({"k": "ä"}) == '{"k":"ä"}'.encode()
    token = make_session_token(c, ACCOUNT)
    assert verify_session_token(token, url="https://api.x.com/v1/ä/x", now=NOW) == c


TAMPERS: dict[str, Any] = {
    "session_id": "0b7f6a1e-7c1d-4a55-9c43-2a7e2b1d9f01",
    "address": OTHER.address,
    "origin": "https://api.x.com.evil.net",
    "scope": "exact",
    "path": "/",
    "query": "a=1",
    "issued_at": NOW - 1,
    "expires_at": NOW + 360000,
    "tx_hash": "0x" + "cd" * 32,
    "amount": "1",
    "asset": "0x" + "00" * 20,
    "network": "eip155:8453",
    "pay_to": "0x" + "33" * 20,
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_tampering_any_field_is_rejected(field: str) -> None:
    token = make_session_token(claim(), ACCOUNT)
    signature = token.split(".")[1]
    data = asdict(claim())
    data[field] = TAMPERS[field]
    forged = b64(canonical_json(data)) + "." + signature
    assert reason(forged) in {"bad_signature", "malformed"}


def test_tampered_prefix_query_is_malformed_and_version_unsupported() -> None:
    signature = make_session_token(claim(), ACCOUNT).split(".")[1]
    for changes, expected in (
        ({"query": "a=1"}, "malformed"),  # a prefix scope with a query
        ({"version": 2}, "unsupported"),
        ({"extra": 1}, "malformed"),
        ({"amount": "1.5"}, "malformed"),
        ({"amount": 10000}, "malformed"),
        ({"issued_at": True}, "malformed"),
        ({"path": "/v1/../admin"}, "malformed"),
        ({"origin": "https://API.x.com:443"}, "malformed"),
        ({"expires_at": NOW}, "malformed"),
    ):
        data = {**asdict(claim()), **changes}
        assert reason(b64(canonical_json(data)) + "." + signature) == expected, changes


def test_non_canonical_encodings_are_refused() -> None:
    c = claim()
    token = make_session_token(c, ACCOUNT)
    signature = token.split(".")[1]
    spaced = json.dumps(asdict(c), sort_keys=True).encode()
    assert reason(b64(spaced) + "." + signature) == "malformed"
    padded = base64.urlsafe_b64encode(c.canonical_json()).decode()
    if padded.endswith("="):
        assert reason(padded + "." + signature) == "malformed"
    std = base64.b64encode(c.canonical_json()).decode().rstrip("=")
    if std != b64(c.canonical_json()):
        assert reason(std + "." + signature) == "malformed"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "e30.0x" + "00" * 65,
        "!!!.0x" + "00" * 65,
        b64(b"[1]") + ".0x" + "00" * 65,
        b64(b"\xff\xfe") + ".0x" + "00" * 65,
        "x" * 9000,
    ],
)
def test_garbage(token: str) -> None:
    assert reason(token) in {"malformed", "unsupported", "bad_signature"}


def test_bad_signatures() -> None:
    token = make_session_token(claim(), ACCOUNT)
    payload, signature = token.split(".")
    assert reason(payload + ".0x" + "00" * 65) == "bad_signature"
    assert reason(payload + "." + signature[:-2]) == "bad_signature"
    assert reason(payload + "." + signature[2:]) == "bad_signature"
    flipped = signature[:10] + ("0" if signature[10] != "0" else "1") + signature[11:]
    assert reason(payload + "." + flipped) == "bad_signature"


def test_wrong_signer() -> None:
    # Signed by OTHER while claiming ACCOUNT's address: the signature does not prove the claim.
    forged = (
        b64(claim().canonical_json())
        + "."
        + "0x"
        + OTHER.sign_message(encode_defunct(primitive=claim().canonical_json()))
        .signature.hex()
        .removeprefix("0x")
    )
    assert reason(forged) == "bad_signature"
    # Validly signed by OTHER for OTHER, but we expected ACCOUNT's wallet.
    theirs = make_session_token(claim(address=OTHER.address), OTHER)
    assert verify_session_token(theirs, now=NOW).address == OTHER.address
    assert reason(theirs, wallet=ACCOUNT.address) == "wrong_signer"
    with pytest.raises(ValueError):
        make_session_token(claim(address=OTHER.address), ACCOUNT)


def test_time_window_with_leeway() -> None:
    token = make_session_token(claim(), ACCOUNT)
    assert verify_session_token(token, now=NOW - 29)
    assert reason(token, now=NOW - 31) == "not_yet_valid"
    assert verify_session_token(token, now=NOW + 3600 + 29)
    assert reason(token, now=NOW + 3600 + 30) == "expired"
    assert reason(token, now=NOW + 3600, leeway=0) == "expired"
    assert verify_session_token(token, now=NOW + 3599, leeway=0)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.x.com/v10",
        "https://api.x.com/v1/../admin",
        "https://api.x.com.evil.net/v1",
        "http://api.x.com/v1",
        "https://api.x.com:8443/v1",
        "https://user@api.x.com/v1",
        "not a url",
    ],
)
def test_out_of_scope(url: str) -> None:
    token = make_session_token(claim(), ACCOUNT)
    assert reason(token, url=url) == "out_of_scope"


def test_session_mismatch() -> None:
    token = make_session_token(claim(), ACCOUNT)
    assert reason(token, session_id="another") == "session_mismatch"


@given(st.sampled_from(sorted(TAMPERS)), st.text(min_size=1, max_size=30))
def test_any_text_in_any_field_is_rejected(field: str, text: str) -> None:
    token = make_session_token(claim(), ACCOUNT)
    signature = token.split(".")[1]
    data = asdict(claim())
    if data[field] == text:
        return
    data[field] = text
    with pytest.raises(InvalidSessionToken):
        verify_session_token(b64(canonical_json(data)) + "." + signature, now=NOW)
