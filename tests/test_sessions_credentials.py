"""Credential capture and replay: cookies, token headers, session token, SIWX."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from x402.extensions.sign_in_with_x import (
    CreateSIWxRequestHookOptions,
    InMemorySIWxStorage,
    create_siwx_message,
    create_siwx_request_hook,
    parse_siwx_header,
    validate_siwx_message,
    verify_siwx_signature,
)
from x402.http.types import HTTPRequestContext

from proxy.sessions.credentials import (
    SIWX_HEADER,
    build_siwx_header,
    capture_credentials,
    credential_headers,
    merge_credentials,
    merge_headers,
    parse_cookie_date,
    siwe_message_text,
    siwx_challenge_response,
    siwx_info_from_extension,
    siwx_offer,
    uri_safe,
)
from proxy.sessions.model import CREDENTIAL_KINDS, Session, SessionCredentials, StoredCookie
from proxy.sessions.scope import Scope, ScopeError, normalize_url
from proxy.tokens import HEADER_SESSION, HEADER_TOKEN, HEADER_WALLET, SessionClaim, make_session_token

ACCOUNT = Account.from_key("0x" + "42" * 32)
NOW = 1_700_000_000.0
URL = "https://api.x.com/v1/chat"
ALL = set(CREDENTIAL_KINDS)


def capture(*set_cookies: str, url: str = URL, **kwargs: Any) -> SessionCredentials:
    headers = [("Set-Cookie", v) for v in set_cookies] + list(kwargs.pop("extra", []))
    return capture_credentials(headers, kwargs.pop("token_names", []), url, now=NOW, **kwargs)


def session_with(creds: SessionCredentials, scope: str = "https://api.x.com/v1", now: float = NOW) -> Session:
    s = Session.create(Scope.from_url(scope), now=now, payer=ACCOUNT.address, network="eip155:84532")
    s.credentials = creds
    return s


# --- cookies: capture ---------------------------------------------------------------------------


def test_cookie_capture_attributes() -> None:
    creds = capture(
        "sid=abc; Path=/; Secure; HttpOnly; SameSite=Lax",
        "pref=1; Domain=.x.com; Max-Age=60",
        "old=1; Expires=Wed, 21 Oct 2015 07:28:00 GMT",
        "nopath=2",
        "rel=3; Path=relative",
        "=novalue",
        "noequals",
        " spaced = v w ; path=/v1",
    )
    by_name = {c.name: c for c in creds.cookies}
    assert by_name["sid"] == StoredCookie("sid", "abc", None, "/", None, True)
    assert by_name["pref"] == StoredCookie("pref", "1", "x.com", "/v1", NOW + 60, False)
    assert by_name["old"].expires == 1445412480.0
    assert by_name["nopath"].path == "/v1"  # RFC 6265 default-path of /v1/chat
    assert by_name["rel"].path == "/v1"
    assert by_name["spaced"] == StoredCookie("spaced", "v w", None, "/v1", None, False)
    assert set(by_name) == {"sid", "pref", "old", "nopath", "rel", "spaced"}


@pytest.mark.parametrize(
    "set_cookie",
    [
        "a=1; Domain=evil.net",
        "a=1; Domain=api.x.com.evil.net",
        "a=1; Domain=other.x.com",
        "a=1; Domain=pi.x.com",
        "a=1; Domain=sub.api.x.com",
        "a=1; Domain=bad%2edomain",
        "__Secure-a=1",
        "__Host-a=1; Secure; Path=/v1",
        "__Host-a=1; Secure; Path=/; Domain=api.x.com",
    ],
)
def test_cookie_rejected_at_capture(set_cookie: str) -> None:
    assert capture(set_cookie).cookies == []


def test_secure_cookie_not_accepted_from_http() -> None:
    assert capture("a=1; Secure", url="http://api.x.com/v1").cookies == []
    assert capture("a=1", url="http://api.x.com/v1").cookies[0].secure is False


def test_cookie_domain_match_and_ip_hosts() -> None:
    assert capture("a=1; Domain=API.X.COM.").cookies[0].domain == "api.x.com"
    assert capture("a=1; Domain=10.0.0.1", url="http://10.0.0.1/").cookies[0].domain == "10.0.0.1"
    assert capture("a=1; Domain=0.0.1", url="http://10.0.0.1/").cookies == []


def test_cookie_dates() -> None:
    assert parse_cookie_date("Wed, 21 Oct 2015 07:28:00 GMT") == 1445412480.0
    assert parse_cookie_date("Wednesday, 21-Oct-15 07:28:00 GMT") == 1445412480.0
    assert parse_cookie_date("Wed Oct 21 07:28:00 2015") == 1445412480.0
    assert parse_cookie_date("31 Feb 2015 00:00:00") is None
    assert parse_cookie_date("garbage") is None


def test_same_cookie_twice_keeps_last_and_multidict_input() -> None:
    headers = CIMultiDict([("Set-Cookie", "a=1"), ("set-cookie", "a=2"), ("X-Api-Key", "k1")])
    creds = capture_credentials(headers, ["x-api-key"], URL, now=NOW)
    assert [(c.name, c.value) for c in creds.cookies] == [("a", "2")]
    assert creds.token_headers == {"x-api-key": "k1"}


# --- cookies: replay ----------------------------------------------------------------------------


def test_cookie_replay_path_secure_expiry() -> None:
    creds = SessionCredentials(
        cookies=[
            StoredCookie("root", "r", None, "/", None, False),
            StoredCookie("v1", "a", None, "/v1", None, False),
            StoredCookie("deep", "d", None, "/v1/chat", None, False),
            StoredCookie("other", "o", None, "/v10", None, False),
            StoredCookie("sec", "s", None, "/", None, True),
            StoredCookie("gone", "g", None, "/", NOW - 1, False),
            StoredCookie("later", "l", None, "/", NOW + 10, False),
            StoredCookie("dom", "x", "x.com", "/", None, False),
        ]
    )
    s = session_with(creds, "https://api.x.com/")
    got = credential_headers(s, "https://api.x.com/v1/chat/x", {}, {"cookies"}, NOW)
    assert got == {"Cookie": "deep=d; v1=a; root=r; sec=s; later=l; dom=x"}
    s_http = session_with(creds, "http://api.x.com/")
    got = credential_headers(s_http, "http://api.x.com/v1", {}, {"cookies"}, NOW)
    assert got == {"Cookie": "v1=a; root=r; later=l; dom=x"}  # no Secure cookie over http


def test_client_cookies_merged_ours_win() -> None:
    s = session_with(SessionCredentials(cookies=[StoredCookie("sid", "ours", None, "/", None, True)]))
    client = [("Cookie", "sid=theirs; theme=dark"), ("cookie", "lang=en")]
    got = credential_headers(s, URL, client, {"cookies"}, NOW)
    assert got == {"Cookie": "sid=ours; theme=dark; lang=en"}
    merged = merge_headers([*client, ("Accept", "*/*")], got)
    assert merged == [("Accept", "*/*"), ("Cookie", "sid=ours; theme=dark; lang=en")]


# --- token headers, session token, client cannot override ----------------------------------------


def _token_session() -> Session:
    creds = capture(
        token_names=["X-Api-Key", "Authorization"], extra=[("x-api-key", "K"), ("Authorization", "Bearer T")]
    )
    s = session_with(creds)
    s.amount_paid, s.asset = 10_000, "0x" + "11" * 20
    claim = SessionClaim.for_session(s, address=ACCOUNT.address, tx_hash="0x" + "ab" * 32)
    s.credentials.session_token = make_session_token(claim, ACCOUNT)
    return s


def test_token_headers_and_session_token() -> None:
    s = _token_session()
    got = credential_headers(s, URL, {}, {"token_headers", "session_token"}, NOW)
    assert got["X-Api-Key"] == "K" and got["Authorization"] == "Bearer T"
    assert got[HEADER_WALLET] == ACCOUNT.address and got[HEADER_SESSION] == s.id
    assert got[HEADER_TOKEN] == s.credentials.session_token
    assert credential_headers(s, URL, {}, {"token_headers"}, NOW).keys() == {"X-Api-Key", "Authorization"}
    assert credential_headers(s, URL, {}, set(), NOW) == {}
    with pytest.raises(ValueError):
        credential_headers(s, URL, {}, {"telepathy"}, NOW)


def test_client_headers_never_override_session_credentials() -> None:
    s = _token_session()
    client = {
        "x-api-key": "client-key",
        "AUTHORIZATION": "Bearer client",
        "x-session-token": "forged",
        "X-Session-Wallet": "0x" + "00" * 20,
        "payment-session": "someone-else",
        "Accept": "application/json",
    }
    ours = credential_headers(s, URL, client, ALL, NOW)
    merged = dict(merge_headers(client, ours))
    assert merged["Accept"] == "application/json"
    lowered = {k.lower(): v for k, v in merged.items()}
    assert len(lowered) == len(merged)  # no duplicate names in different case
    assert lowered["x-api-key"] == "K"
    assert lowered["authorization"] == "Bearer T"
    assert lowered["x-session-token"] == s.credentials.session_token
    assert lowered["payment-session"] == s.id


@pytest.mark.parametrize(
    "url",
    [
        "https://api.x.com/v10",
        "https://api.x.com/",
        "https://api.x.com/v1/../admin",
        "https://api.x.com.evil.net/v1",
        "http://api.x.com/v1",
        "https://api.x.com:8443/v1",
        "https://user@api.x.com/v1",
        "garbage",
    ],
)
def test_out_of_scope_gets_nothing(url: str) -> None:
    assert credential_headers(_token_session(), url, {}, ALL, NOW, ACCOUNT) == {}


def test_inactive_session_gets_nothing_and_end_forgets_secrets() -> None:
    s = _token_session()
    assert credential_headers(s, URL, {}, ALL, s.expires_at) == {}  # expired
    s.end(NOW + 1, "user")
    assert s.state(NOW + 2) == "ended" and s.credentials.session_token is None
    assert s.credentials.token_headers == {} and s.credentials.kinds() == []
    assert credential_headers(s, URL, {}, ALL, NOW + 2) == {}


def test_repr_and_describe_carry_no_secrets() -> None:
    s = _token_session()
    s.credentials.cookies.append(StoredCookie("sid", "cookie-secret", None, "/", None, True))
    token = s.credentials.session_token
    assert token is not None
    described = json.dumps(s.describe(NOW))
    for text in (repr(s), described):
        assert "cookie-secret" not in text and "Bearer T" not in text and token[:40] not in text
        assert token.split(".")[1][:20] not in text
    assert s.describe(NOW)["credentials"] == ["cookies", "token_headers", "session_token"]


def test_store_round_trip_keeps_token_exactly() -> None:
    s = _token_session()
    again = Session.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again.credentials == s.credentials and again.scope == s.scope and again.id == s.id
    assert again.credentials.session_token == s.credentials.session_token
    odd = SessionCredentials(session_token="not-our-format")
    assert odd.session_token == "not-our-format"


def test_merge_credentials() -> None:
    old = capture("a=1", "b=1; Path=/", token_names=["X-K"], extra=[("X-K", "old")])
    new = capture("a=2", "b=; Path=/; Max-Age=0", token_names=["X-K"], extra=[("X-K", "new")])
    merged = merge_credentials(old, new, NOW)
    assert [(c.name, c.value) for c in merged.cookies] == [("a", "2")]
    assert merged.token_headers == {"X-K": "new"}


# --- SIWX ---------------------------------------------------------------------------------------


def siwx_extension(domain: str = "api.x.com", uri: str = "https://api.x.com/v1/chat") -> dict[str, Any]:
    return {
        "info": {
            "domain": domain,
            "uri": uri,
            "version": "1",
            "nonce": "a1b2c3d4e5f6a7b8",
            "issuedAt": "2023-11-14T22:13:20.000Z",
            "resources": [uri],
            "statement": "Sign in",
        },
        "supportedChains": [
            {"chainId": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "type": "ed25519"},
            {"chainId": "eip155:8453", "type": "eip191"},
            {"chainId": "eip155:84532", "type": "eip191"},
        ],
    }


def test_siwx_info_chain_choice_and_origin_binding() -> None:
    info = siwx_info_from_extension(siwx_extension(), URL, "eip155:84532")
    assert info == {
        "domain": "api.x.com",
        "uri": "https://api.x.com/v1/chat",
        "version": "1",
        "chainId": "eip155:84532",
        "type": "eip191",
        "statement": "Sign in",
    }
    assert siwx_info_from_extension(siwx_extension(), URL)["chainId"] == "eip155:8453"  # type: ignore[index]
    assert siwx_info_from_extension(siwx_extension(domain="evil.net"), URL) is None
    assert siwx_info_from_extension(siwx_extension(uri="https://evil.net/x"), URL) is None
    assert siwx_info_from_extension(siwx_extension(), "http://api.x.com/v1/chat") is None
    assert siwx_info_from_extension(siwx_extension(domain="API.x.com:443"), URL) is not None
    assert siwx_info_from_extension({"info": {}, "supportedChains": []}, URL) is None
    assert capture(siwx_extension=siwx_extension(), network="eip155:84532").siwx == info


def decode(header: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.b64decode(header))
    return data


async def test_proactive_siwx_header_verifies_with_the_sdk() -> None:
    import time

    now = time.time()
    s = session_with(capture(siwx_extension=siwx_extension(), network="eip155:84532"), now=now)
    got = credential_headers(
        s, "https://api.x.com/v1/chat?x=1", {SIWX_HEADER.lower(): "client"}, {"siwx"}, now, ACCOUNT
    )
    header = got[SIWX_HEADER]
    payload = parse_siwx_header(header)
    assert payload.address == ACCOUNT.address and payload.chain_id == "eip155:84532"
    assert payload.domain == "api.x.com" and payload.uri == "https://api.x.com/v1/chat"
    assert payload.resources == ["https://api.x.com/v1/chat?x=1"]
    assert payload.nonce != "a1b2c3d4e5f6a7b8"  # fresh client nonce, not the stale challenge's
    assert (await validate_siwx_message(payload, "https://api.x.com")).is_valid
    verified = await verify_siwx_signature(payload)
    assert verified.is_valid and verified.payer == ACCOUNT.address
    # Two requests, two nonces: the reference server refuses reused nonces.
    again = credential_headers(s, URL, {}, {"siwx"}, now, ACCOUNT)[SIWX_HEADER]
    assert decode(again)["nonce"] != decode(header)["nonce"]
    # Without a signer there is no SIWX header (and nothing crashes).
    assert credential_headers(s, URL, {}, {"siwx"}, now) == {}


async def test_reference_server_hook_grants_paid_path_only() -> None:
    """The SDK's own server hook accepts our header for a path the wallet paid for."""
    import time

    storage = InMemorySIWxStorage()
    storage.record_payment("/v1/chat", ACCOUNT.address)
    hook = create_siwx_request_hook(CreateSIWxRequestHookOptions(storage=storage, origin="https://api.x.com"))
    s = session_with(capture(siwx_extension=siwx_extension(), network="eip155:84532"), now=time.time())
    route = SimpleNamespace(accepts=[object()])  # a paid route: access needs a recorded payment

    async def ask(path: str) -> Any:
        header = credential_headers(s, f"https://api.x.com{path}", {}, {"siwx"}, time.time(), ACCOUNT)[
            SIWX_HEADER
        ]
        adapter = SimpleNamespace(
            get_header=lambda name: header if name.lower() == "sign-in-with-x" else None
        )
        context = HTTPRequestContext(adapter=adapter, path=path, method="GET")
        return await hook(context, route)

    assert await ask("/v1/chat") is not None
    # The reference server records payments per exact path: a prefix session's other paths are
    # refused there (the proxy then pays, or uses another credential kind).
    assert await ask("/v1/other") is None


def test_siwx_callable_signer_uses_session_payer() -> None:
    calls: list[str] = []

    def signer(message: str) -> str:
        calls.append(message)
        return "0x" + bytes(ACCOUNT.sign_message(encode_defunct(text=message)).signature).hex()

    info = siwx_info_from_extension(siwx_extension(), URL, "eip155:84532")
    assert info is not None
    header = build_siwx_header(info, signer, URL, now=NOW, address=ACCOUNT.address)
    assert header is not None and calls and ACCOUNT.address in calls[0]
    assert build_siwx_header(info, signer, URL, now=NOW) is None  # no address known
    assert build_siwx_header(info, ACCOUNT, "https://evil.net/v1/chat", now=NOW) is None


async def test_siwx_challenge_response_uses_server_nonce() -> None:
    ext = siwx_extension()
    header = siwx_challenge_response(ext, ACCOUNT, URL, network="eip155:84532")
    payload = parse_siwx_header(header)
    assert payload.nonce == "a1b2c3d4e5f6a7b8" and payload.issued_at == "2023-11-14T22:13:20.000Z"
    assert payload.resources == ["https://api.x.com/v1/chat"]
    assert (await verify_siwx_signature(payload)).payer == ACCOUNT.address
    with pytest.raises(ValueError):
        siwx_challenge_response(siwx_extension(domain="evil.net"), ACCOUNT, URL)
    with pytest.raises(ValueError):
        siwx_challenge_response(
            {"info": ext["info"], "supportedChains": ext["supportedChains"][:1]}, ACCOUNT, URL
        )
    no_nonce = {"info": {**ext["info"], "nonce": None}, "supportedChains": ext["supportedChains"]}
    with pytest.raises(ValueError):
        siwx_challenge_response(no_nonce, ACCOUNT, URL)


def test_normalized_url_accepted_everywhere() -> None:
    n = normalize_url(URL)
    s = _token_session()
    assert credential_headers(s, n, {}, {"token_headers"}, NOW) == credential_headers(
        s, URL, {}, {"token_headers"}, NOW
    )


# --- the fast SIWE layout is the SDK's layout ----------------------------------------------------

_ISO = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2099, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
)


@settings(max_examples=60, deadline=None)
@given(
    domain=st.sampled_from(["api.x.com", "localhost:4021", "[::1]:8080"]),
    statement=st.one_of(st.none(), st.sampled_from(["Sign in", "Sign in to the API, please."])),
    chain=st.integers(1, 10**9),
    nonce=st.text("abcdef0123456789XYZ", min_size=8, max_size=40),
    issued=_ISO,
    expiration=st.one_of(st.none(), _ISO),
    not_before=st.one_of(st.none(), _ISO),
    request_id=st.one_of(st.none(), st.sampled_from(["", "req-1"])),
    resources=st.one_of(
        st.none(), st.lists(st.sampled_from(["https://api.x.com/a?b=c", "urn:x:y"]), max_size=3)
    ),
)
def test_siwe_layout_matches_the_sdk(
    domain: str,
    statement: str | None,
    chain: int,
    nonce: str,
    issued: str,
    expiration: str | None,
    not_before: str | None,
    request_id: str | None,
    resources: list[str] | None,
) -> None:
    fields = {
        "domain": domain,
        "uri": f"https://{domain}/v1/x",
        "version": "1",
        "statement": statement,
        "chainId": f"eip155:{chain}",
        "nonce": nonce,
        "issuedAt": issued,
        "expirationTime": expiration,
        "notBefore": not_before,
        "requestId": request_id,
        "resources": resources,
    }
    expected = create_siwx_message(fields, ACCOUNT.address)
    assert siwe_message_text({**fields, "chainId": chain}, ACCOUNT.address) == expected


@given(st.text(max_size=30))
@example('[]#|^`{}\\"<>')
def test_resource_urls_are_always_valid_rfc3986(query: str) -> None:
    from siwe.siwe import _validate_rfc3986_uri

    try:
        n = normalize_url(f"http://[::1]:8080/a?{query}")
    except ScopeError:
        return
    _validate_rfc3986_uri(uri_safe(n))  # raises if siwe would refuse the message


async def test_odd_query_still_gives_a_verifiable_header() -> None:
    import time

    now = time.time()
    s = session_with(capture(siwx_extension=siwx_extension(), network="eip155:84532"), now=now)
    header = credential_headers(s, "https://api.x.com/v1/x?q=|ä%zz{}", {}, {"siwx"}, now, ACCOUNT)[
        SIWX_HEADER
    ]
    payload = parse_siwx_header(header)
    assert payload.resources == ["https://api.x.com/v1/x?q=%7C%C3%A4%25zz%7B%7D"]
    assert (await verify_siwx_signature(payload)).payer == ACCOUNT.address


def test_siwx_challenge_answer_signs_only_this_origins_resources() -> None:
    """A server's `resources` naming other origins' URLs: only this origin's are signed; if none is
    left, the request URL itself. Was: the whole list was signed."""
    ext = siwx_extension()
    ext["info"]["resources"] = [
        "https://api.x.com/v1/chat",
        "https://evil.net/steal",
        "http://api.x.com/v1/chat",  # another scheme: another origin
        "https://api.x.com:8443/x",
        "not a url",
        7,
    ]
    payload = decode(siwx_challenge_response(ext, ACCOUNT, URL, network="eip155:84532"))
    assert payload["resources"] == ["https://api.x.com/v1/chat"]
    ext["info"]["resources"] = ["https://evil.net/steal"]
    payload = decode(siwx_challenge_response(ext, ACCOUNT, URL + "?q=1", network="eip155:84532"))
    assert payload["resources"] == ["https://api.x.com/v1/chat?q=1"]
    del ext["info"]["resources"]
    assert "resources" not in decode(siwx_challenge_response(ext, ACCOUNT, URL, network="eip155:84532"))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"domain": "evil.net"}, "another origin"),
        ({"chains": [{"chainId": "eip155:not-a-chain", "type": "eip191"}]}, "no chain"),
        ({"chains": [{"chainId": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "type": "ed25519"}]}, "no EVM"),
        ({"version": "2"}, "no chain we can sign for"),
        ({"statement": "line one\nline two"}, "no chain we can sign for"),
    ],
)
def test_a_renewals_siwx_offer_replaces_the_stored_one_only_when_usable(
    change: dict[str, Any], why: str
) -> None:
    """The rule: a later offer replaces the session's parameters only if it is bound to this origin,
    offers an EVM chain with a numeric id, and the SIWX message builder accepts its values; otherwise the
    stored parameters stay (the stage logs why). Was: any origin-bound eip155 offer replaced them, and
    one we cannot sign switched proactive SIWX off."""
    stored = capture(siwx_extension=siwx_extension(), network="eip155:84532")
    offer = siwx_extension(domain=change.get("domain", "api.x.com"))
    if "chains" in change:
        offer["supportedChains"] = change["chains"]
    for key in ("version", "statement"):
        if key in change:
            offer["info"][key] = change[key]
    assert why in str(siwx_offer(offer, URL, "eip155:84532"))
    renewal = capture(siwx_extension=offer, network="eip155:84532")
    assert renewal.siwx is None
    merged = merge_credentials(stored, renewal, NOW)
    assert merged.siwx == stored.siwx
    header = build_siwx_header(merged.siwx or {}, ACCOUNT, URL, now=NOW)
    assert header is not None and decode(header)["chainId"] == "eip155:84532"  # still signs


def test_a_usable_renewal_offer_replaces_the_stored_one() -> None:
    stored = capture(siwx_extension=siwx_extension(), network="eip155:84532")
    offer = siwx_extension()
    offer["info"]["statement"] = "Renewed"
    merged = merge_credentials(stored, capture(siwx_extension=offer, network="eip155:84532"), NOW)
    assert merged.siwx is not None and merged.siwx["statement"] == "Renewed"
