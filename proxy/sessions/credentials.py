"""Capture a session's credentials from responses and compute the headers that replay them. Pure.

Rules (each one fixes a defect of the seed tools or closes a leak):

- Credentials go ONLY to URLs the session's scope covers, and only while the session is active:
  ``credential_headers`` returns ``{}`` otherwise.
- Every header name we return REPLACES the client's header of that name (``merge_headers``).
  A client header never overrides a session credential; the one exception is ``Cookie``, where
  the client's cookies are kept and merged with ours, ours winning for the same name.
- Cookies follow RFC 6265: a ``Domain`` that does not domain-match the responding host is
  dropped at capture; host-only / domain, path-match, ``Secure`` (https only, and not accepted
  from http responses), expiry and the ``__Host-``/``__Secure-`` prefixes are honoured.
- SIWX parameters are kept only if the challenge is bound to the origin that sent it (else a
  server could get us to sign in to another site) and we can sign them; the per-challenge
  nonce/time are not kept. A renewal's unusable offer never replaces working parameters. A
  signature answering a server's challenge lists only that origin's ``resources``.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from proxy.hosts import HostError, canonical_host
from proxy.sessions.model import CREDENTIAL_KINDS, Session, SessionCredentials, StoredCookie, intern_siwx
from proxy.sessions.scope import NormalizedURL, ScopeError, normalize_url, path_covers
from proxy.tokens import session_token_headers

if TYPE_CHECKING:  # eth-account and the SDK's SIWX module load when a session first signs in
    from eth_account.signers.local import LocalAccount

SIWX_HEADER = "SIGN-IN-WITH-X"
SIWX_EXTENSION = "sign-in-with-x"
# The reference server rejects an issuedAt in its future with zero tolerance; dating ours a few
# seconds back absorbs small clock differences (its max age is 5 minutes).
SIWX_BACKDATE_SECONDS = 5
SIWX_LIFETIME_SECONDS = 300
MAX_COOKIES = 50
MAX_COOKIE_BYTES = 4096

HeaderSource = Mapping[str, str] | Iterable[tuple[str, str]]
# An eth-account account, or a callable signing EIP-191 text and returning 0x-hex (its address is
# then taken from ``session.payer``).
SiwxSigner: TypeAlias = "LocalAccount | Callable[[str], str]"


def _header_pairs(headers: HeaderSource) -> Iterable[tuple[str, str]]:
    # multidict's CIMultiDict is a Mapping whose items() yields every value of repeated headers.
    return headers.items() if isinstance(headers, Mapping) else headers


def _header_values(headers: HeaderSource, name: str) -> list[str]:
    lower = name.lower()
    return [v for k, v in _header_pairs(headers) if k.lower() == lower]


# --- capture ------------------------------------------------------------------------------------


def capture_credentials(
    response_headers: HeaderSource,
    token_header_names: Iterable[str],
    request_url: str | NormalizedURL,
    *,
    now: float,
    siwx_extension: Mapping[str, Any] | None = None,
    network: str | None = None,
) -> SessionCredentials:
    """Credentials from the paid response: cookies, configured token headers, SIWX parameters."""
    n = request_url if isinstance(request_url, NormalizedURL) else normalize_url(request_url)
    cookies: list[StoredCookie] = []
    for value in _header_values(response_headers, "set-cookie"):
        cookie = parse_set_cookie(value, n, now)
        if cookie is not None:
            cookies = [c for c in cookies if _cookie_id(c) != _cookie_id(cookie)]
            cookies.append(cookie)
    tokens: dict[str, str] = {}
    for name in token_header_names:
        values = _header_values(response_headers, name)
        if values:
            tokens[name] = values[-1]
    siwx = siwx_info_from_extension(siwx_extension, n, network) if siwx_extension else None
    return SessionCredentials(cookies=cookies[-MAX_COOKIES:], token_headers=tokens, siwx=siwx)


def _cookie_id(c: StoredCookie) -> tuple[str, str | None, str]:
    return (c.name, c.domain, c.path)


def parse_set_cookie(header: str, request: NormalizedURL, now: float) -> StoredCookie | None:
    """RFC 6265 section 5.2 parsing and 5.3 storage checks; None = ignore this cookie."""
    if len(header) > MAX_COOKIE_BYTES:
        return None
    pair, *attributes = header.split(";")
    name, sep, value = pair.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        return None
    domain: str | None = None
    path: str | None = None
    expires: float | None = None
    max_age: int | None = None
    secure = False
    for attribute in attributes:
        key, _, attr_value = attribute.partition("=")
        key, attr_value = key.strip().lower(), attr_value.strip()
        if key == "domain" and attr_value:
            try:
                domain = canonical_host(attr_value.lstrip("."))
            except HostError:
                return None
        elif key == "path":
            path = attr_value if attr_value.startswith("/") else None
        elif key == "expires":
            parsed = parse_cookie_date(attr_value)
            if parsed is not None:
                expires = float(parsed)
        elif key == "max-age":
            text = attr_value[1:] if attr_value.startswith("-") else attr_value
            if text.isascii() and text.isdigit():
                max_age = int(attr_value)
        elif key == "secure":
            secure = True
    if max_age is not None:  # Max-Age wins over Expires
        expires = now + max_age if max_age > 0 else now - 1
    if domain is not None and not domain_match(request.host, domain):
        return None  # a server may only set cookies for itself or a parent domain
    if secure and request.scheme != "https":
        return None  # RFC 6265bis: a non-secure origin cannot set Secure cookies
    cookie_path = path or default_cookie_path(request.path)
    if name.startswith("__Secure-") and not secure:
        return None
    if name.startswith("__Host-") and (not secure or domain is not None or cookie_path != "/"):
        return None
    return StoredCookie(name, value, domain, cookie_path, expires, secure)


_DATE_DELIMITERS = re.compile(r"[\x09\x20-\x2f\x3b-\x40\x5b-\x60\x7b-\x7e]+")
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\D.*)?$")
_DAY_RE = re.compile(r"^(\d{1,2})(?:\D.*)?$")
_YEAR_RE = re.compile(r"^(\d{2,4})(?:\D.*)?$")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


def parse_cookie_date(text: str) -> float | None:
    """RFC 6265 5.1.1 cookie-date algorithm (accepts the RFC 1123, RFC 850 and asctime forms)."""
    time_parts: tuple[int, int, int] | None = None
    day = month = year = None
    for token in _DATE_DELIMITERS.split(text):
        if not token:
            continue
        if time_parts is None and (m := _TIME_RE.match(token)):
            time_parts = (int(m[1]), int(m[2]), int(m[3]))
        elif day is None and (m := _DAY_RE.match(token)):
            day = int(m[1])
        elif month is None and token[:3].lower() in _MONTHS:
            month = _MONTHS.index(token[:3].lower()) + 1
        elif year is None and (m := _YEAR_RE.match(token)):
            year = int(m[1])
    if time_parts is None or day is None or month is None or year is None:
        return None
    if 70 <= year <= 99:
        year += 1900
    elif 0 <= year <= 69:
        year += 2000
    hour, minute, second = time_parts
    if year < 1601 or hour > 23 or minute > 59 or second > 59:
        return None
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()
    except ValueError:  # day out of range for the month
        return None


def domain_match(host: str, domain: str) -> bool:
    if host == domain:
        return True
    is_ip = host.startswith("[") or host.replace(".", "").isdigit()
    return not is_ip and host.endswith("." + domain)


def default_cookie_path(request_path: str) -> str:
    """RFC 6265 5.1.4: the request path up to, not including, its last "/" ("/" if none)."""
    cut = request_path.rfind("/")
    return "/" if cut <= 0 else request_path[:cut]


def cookie_path_match(cookie_path: str, request_path: str) -> bool:
    # Identical to the prefix-scope rule: equal, or a prefix ending at a "/" boundary.
    return path_covers(cookie_path, request_path)


def siwx_info_from_extension(
    extension: Mapping[str, Any], request_url: str | NormalizedURL, network: str | None = None
) -> dict[str, Any] | None:
    """Stable SIWX parameters (no nonce/times) with an EVM chain chosen, or None if unusable.

    Prefers the chain equal to the payment's CAIP-2 ``network``. Refuses a challenge whose
    ``domain``/``uri`` is not the origin that sent it, and one we could never sign (``siwx_offer``).
    """
    offer = siwx_offer(extension, request_url, network)
    return offer if isinstance(offer, dict) else None


# Any well-formed address: the SDK builder validates the per-session values with it once, at capture.
_PROBE_ADDRESS = "0x" + "0" * 40


def siwx_offer(
    extension: Mapping[str, Any], request_url: str | NormalizedURL, network: str | None = None
) -> dict[str, Any] | str:
    """The stable SIWX parameters of an offer, or why we cannot use it.

    Usable means: bound to the origin that sent it (``domain`` and ``uri``), an EVM (``eip191``) chain
    with a numeric id, and values the SDK's message builder accepts. An offer that fails any of these
    is never stored, so it can neither make us sign in elsewhere nor, arriving with a renewal, replace
    (and so silently switch off) a session's working parameters.
    """
    n = request_url if isinstance(request_url, NormalizedURL) else normalize_url(request_url)
    info = extension.get("info")
    chains = extension.get("supportedChains")
    if not isinstance(info, Mapping) or not isinstance(chains, list):
        return "no info or supportedChains"
    evm = [
        c
        for c in chains
        if isinstance(c, Mapping)
        and c.get("type") == "eip191"
        and isinstance(c.get("chainId"), str)
        and c["chainId"].startswith("eip155:")
    ]
    if not evm:
        return "no EVM (eip191) chain offered"
    domain, uri, version = info.get("domain"), info.get("uri"), info.get("version") or "1"
    if not isinstance(domain, str) or not isinstance(uri, str) or not isinstance(version, str):
        return "domain, uri or version missing"
    if not _bound_to_origin(domain, uri, n):
        return f"bound to another origin than {n.origin_str} (domain {domain[:100]!r}, uri {uri[:200]!r})"
    statement = info.get("statement") if isinstance(info.get("statement"), str) else None
    usable = [c for c in evm if _signable(domain, uri, version, statement, c["chainId"])]
    if not usable:
        return "no chain we can sign for, or values the SIWX message builder refuses"
    chain = next((c for c in usable if c["chainId"] == network), usable[0])
    result: dict[str, Any] = {
        "domain": domain,
        "uri": uri,
        "version": version,
        "chainId": chain["chainId"],
        "type": "eip191",
    }
    if statement is not None:
        result["statement"] = statement
    interned = intern_siwx(result)
    assert interned is not None
    return interned


def _signable(domain: str, uri: str, version: str, statement: str | None, chain_id: str) -> bool:
    try:
        _checked_siwx_params(domain, uri, version, statement, chain_id, _PROBE_ADDRESS)
    except (ValueError, TypeError):
        return False
    return True


def _bound_to_origin(domain: str, uri: str, request: NormalizedURL) -> bool:
    # Normalised comparison (case, default port) rather than the SDK's raw netloc string test,
    # which fails on "API.x.com" or an explicit ":443" that are the same origin.
    try:
        by_domain = normalize_url(f"{request.scheme}://{domain}/")
        by_uri = normalize_url(uri)
    except ScopeError:
        return False
    return by_domain.origin == request.origin and by_uri.origin == request.origin


def merge_credentials(old: SessionCredentials, new: SessionCredentials, now: float) -> SessionCredentials:
    """Apply a later response's credentials: same (name, domain, path) cookie replaced, an
    already-expired one (``Max-Age=0``) deletes; token headers updated; SIWX/token kept."""
    replaced = {_cookie_id(c) for c in new.cookies}
    cookies = [c for c in old.cookies if _cookie_id(c) not in replaced]
    cookies += [c for c in new.cookies if c.expires is None or c.expires > now]
    return SessionCredentials(
        cookies=cookies[-MAX_COOKIES:],
        token_headers={**old.token_headers, **new.token_headers},
        siwx=new.siwx or old.siwx,
        session_token=new.session_token or old.session_token,
    )


# --- replay -------------------------------------------------------------------------------------


def credential_headers(
    session: Session,
    request_url: str | NormalizedURL,
    client_headers: HeaderSource,
    kinds: set[str],
    now: float,
    siwx_signer: SiwxSigner | None = None,
) -> dict[str, str]:
    """Headers to set on a request in the session's scope; they replace the client's (see
    ``merge_headers``). ``{}`` when the URL is out of scope or the session is not active."""
    unknown = set(kinds) - CREDENTIAL_KINDS
    if unknown:
        raise ValueError(f"unknown credential kinds: {sorted(unknown)}")
    try:
        n = request_url if isinstance(request_url, NormalizedURL) else normalize_url(request_url)
    except ScopeError:
        return {}
    # The one check that keeps credentials on their origin: never trust the caller to have done it.
    if not session.scope.covers(n) or not session.is_active(now):
        return {}
    creds = session.credentials
    out: dict[str, str] = {}
    if "cookies" in kinds:
        cookie = _cookie_header(creds.cookies, n, client_headers, now)
        if cookie is not None:
            out["Cookie"] = cookie
    if "token_headers" in kinds:
        out.update(creds.token_headers)
    if "session_token" in kinds and creds.session_token and session.payer:
        out.update(session_token_headers(creds.session_token, session.payer, session.id))
    if "siwx" in kinds and creds.siwx and siwx_signer is not None:
        header = build_siwx_header(creds.siwx, siwx_signer, n, now=now, address=session.payer)
        if header is not None:
            out[SIWX_HEADER] = header
    return out


def _cookie_header(
    cookies: list[StoredCookie], n: NormalizedURL, client_headers: HeaderSource, now: float
) -> str | None:
    # Host-only cookies (domain None) came from the scope's host, which ``covers`` already pinned.
    ours = [
        c
        for c in cookies
        if (c.expires is None or c.expires > now)
        and (not c.secure or n.scheme == "https")
        and (c.domain is None or domain_match(n.host, c.domain))
        and cookie_path_match(c.path, n.path)
    ]
    if not ours:
        return None
    ours.sort(key=lambda c: -len(c.path))  # RFC 6265 5.4: longer paths first (stable otherwise)
    names = {c.name for c in ours}
    pairs = [f"{c.name}={c.value}" for c in ours]
    for value in _header_values(client_headers, "cookie"):
        for item in value.split(";"):
            item = item.strip()
            if item and item.partition("=")[0].strip() not in names:
                pairs.append(item)
    return "; ".join(pairs)


def merge_headers(client: HeaderSource, ours: Mapping[str, str]) -> list[tuple[str, str]]:
    """Client headers with every name we set removed (any case), then ours: ours always win."""
    replaced = {name.lower() for name in ours}
    kept = [(k, v) for k, v in _header_pairs(client) if k.lower() not in replaced]
    return kept + list(ours.items())


# --- SIWX ---------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sign_text(signer: SiwxSigner, message: str) -> str:
    if callable(signer):
        return signer(message)
    from eth_account.messages import encode_defunct

    return "0x" + bytes(signer.sign_message(encode_defunct(text=message)).signature).hex()


def _signer_address(signer: SiwxSigner, fallback: str | None) -> str | None:
    return fallback if callable(signer) else str(signer.address)


def _siwx_header(complete_info: Mapping[str, Any], signer: SiwxSigner, address: str) -> str:
    """Through the SDK builder end to end (its validators included): for the rare 402 fallback."""
    from x402.extensions.sign_in_with_x import create_siwx_message

    message = create_siwx_message(dict(complete_info), address)
    return _encode_payload(complete_info, address, _sign_text(signer, message))


def build_siwx_header(
    info: Mapping[str, Any],
    signer: SiwxSigner,
    request_url: str | NormalizedURL,
    *,
    now: float,
    address: str | None = None,
    nonce: str | None = None,
) -> str | None:
    """A proactive ``SIGN-IN-WITH-X`` value from stored parameters: fresh client nonce, issuedAt
    ~now, resources = [request URL]. None if the stored info is not bound to this origin or siwe
    refuses it.

    The SDK's message builder runs siwe's ABNF validators (~3-5 ms a message: far too slow per
    request). The per-session part (domain, uri, version, statement, chain, address) is validated
    once through the SDK builder and cached; the per-request part (nonce, times, resource) is ours
    and valid by construction, and the text is laid out by ``siwe_message_text``, which the tests
    pin to the SDK's output. Signing (~0.2 ms) is then the per-request cost.
    """
    n = request_url if isinstance(request_url, NormalizedURL) else normalize_url(request_url)
    who = _signer_address(signer, address)
    domain, uri = info.get("domain"), info.get("uri")
    if who is None or not isinstance(domain, str) or not isinstance(uri, str):
        return None
    if not _bound_to_origin(domain, uri, n):
        return None
    version = str(info.get("version") or "1")
    statement = info.get("statement")
    chain = str(info.get("chainId"))
    try:
        chain_number = _checked_siwx_params(domain, uri, version, statement, chain, who)
    except ValueError:
        return None
    issued = now - SIWX_BACKDATE_SECONDS
    fields: dict[str, Any] = {
        "domain": domain,
        "uri": uri,
        "version": version,
        "statement": statement,
        "chainId": chain,
        "type": "eip191",
        "nonce": nonce or secrets.token_hex(16),
        "issuedAt": _iso(issued),
        "expirationTime": _iso(issued + SIWX_LIFETIME_SECONDS),
        "resources": [uri_safe(n)],
    }
    message = siwe_message_text({**fields, "chainId": chain_number}, who)
    return _encode_payload(fields, who, _sign_text(signer, message))


@functools.lru_cache(maxsize=1024)
def _checked_siwx_params(
    domain: str, uri: str, version: str, statement: str | None, chain_id: str, address: str
) -> int:
    """Run the SDK builder once on the per-session values; the numeric chain id, or ValueError."""
    probe = {
        "domain": domain,
        "uri": uri,
        "version": version,
        "statement": statement,
        "chainId": chain_id,
        "nonce": "0" * 16,
        "issuedAt": "2000-01-01T00:00:00.000Z",
    }
    from x402.extensions.sign_in_with_x import create_siwx_message, extract_evm_chain_id

    create_siwx_message(probe, address)
    return extract_evm_chain_id(chain_id)


def siwe_message_text(fields: Mapping[str, Any], address: str) -> str:
    """EIP-4361 text, laid out exactly as the siwe library's ``prepare_message`` (numeric chain)."""
    head = f"{fields['domain']} wants you to sign in with your Ethereum account:\n{address}"
    statement = fields.get("statement")
    head = f"{head}\n\n{statement}" if statement is not None else f"{head}\n"
    lines = [
        f"URI: {fields['uri']}",
        f"Version: {fields['version']}",
        f"Chain ID: {fields['chainId']}",
        f"Nonce: {fields['nonce']}",
        f"Issued At: {fields['issuedAt']}",
    ]
    for key, label in (("expirationTime", "Expiration Time"), ("notBefore", "Not Before")):
        if fields.get(key):
            lines.append(f"{label}: {fields[key]}")
    if fields.get("requestId") is not None:
        lines.append(f"Request ID: {fields['requestId']}")
    if fields.get("resources") is not None:
        lines.append("\n".join(["Resources:", *(f"- {r}" for r in fields["resources"])]))
    return head + "\n\n" + "\n".join(lines)


# What RFC 3986 allows literally in a path or query (pchar, "/", "?"): not "[", "]", "#".
_PATH_QUERY_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?"
)
_PCT_RE = re.compile(r"%[0-9A-Fa-f]{2}")


def uri_safe(url: NormalizedURL) -> str:
    """The URL with whatever RFC 3986 does not allow in its path and query percent-encoded (a
    verbatim query may hold ``|``, ``[``, ``ä``, a bare ``%``...): siwe validates resources as RFC
    3986 URIs and would refuse the whole message."""
    rest = url.path if url.query is None else f"{url.path}?{url.query}"
    out: list[str] = []
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "%" and _PCT_RE.match(rest, i):
            out.append(rest[i : i + 3])
            i += 3
            continue
        out.append(ch if ch in _PATH_QUERY_CHARS else "".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        i += 1
    return url.origin_str + "".join(out)


def _encode_payload(fields: Mapping[str, Any], address: str, signature: str) -> str:
    from x402.extensions.sign_in_with_x import SIWxPayload, encode_siwx_header

    present = {k: v for k, v in fields.items() if v is not None}
    payload = SIWxPayload.model_validate({**present, "address": address, "signature": signature})
    return encode_siwx_header(payload)


def own_resources(resources: object, request: NormalizedURL) -> list[str] | None:
    """The challenge's ``resources`` that are on the requesting origin: a signature must never vouch
    for another origin's URLs. None stays None (the field is left out); if the server named only
    other origins' URLs, the one resource is the request URL itself."""
    if resources is None:
        return None
    kept: list[str] = []
    for item in resources if isinstance(resources, list) else []:
        if not isinstance(item, str):
            continue
        try:
            if normalize_url(item).origin == request.origin:
                kept.append(item)
        except ScopeError:
            continue
    return kept or [uri_safe(request)]


def siwx_challenge_response(
    extension_info: Mapping[str, Any],
    account: SiwxSigner,
    url: str | NormalizedURL,
    *,
    network: str | None = None,
    address: str | None = None,
) -> str:
    """``SIGN-IN-WITH-X`` answering a 402's challenge with the server's own nonce and times.

    ``extension_info`` is ``extensions["sign-in-with-x"]`` (``{"info", "supportedChains"}``).
    Raises ``ValueError`` if it offers no EVM chain or is not bound to ``url``'s origin. Of the
    server's ``resources`` only those on ``url``'s origin are signed (``own_resources``).
    """
    n = url if isinstance(url, NormalizedURL) else normalize_url(url)
    stable = siwx_info_from_extension(extension_info, n, network)
    who = _signer_address(account, address)
    if stable is None or who is None:
        raise ValueError("SIWX challenge unusable: no EVM chain, not bound to this origin, or no address")
    info = extension_info["info"]
    complete = {
        **stable,
        "nonce": info.get("nonce"),
        "issuedAt": info.get("issuedAt"),
        "expirationTime": info.get("expirationTime"),
        "notBefore": info.get("notBefore"),
        "requestId": info.get("requestId"),
        "resources": own_resources(info.get("resources"), n),
    }
    if not isinstance(complete["nonce"], str) or not isinstance(complete["issuedAt"], str):
        raise ValueError("SIWX challenge has no nonce or issuedAt")
    return _siwx_header(complete, account, who)
