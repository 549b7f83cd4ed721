"""Turn a 402 response into a normalized, bounded, validated ``Challenge`` (pure: no I/O).

V2: ``PAYMENT-REQUIRED: base64(JSON)`` header. V1: JSON body ``{"x402Version": 1, "accepts": [...]}``.

Outcomes:
- ``None``: the response is not an x402 challenge (not a 402, or a plain 402): pass it through.
- ``MalformedChallenge``: it claims to be x402 (header present, or JSON body with ``x402Version``)
  but cannot be trusted: bad base64/JSON, too big, no usable payment option.
- ``Challenge``: at least one well-formed requirement. Individually malformed entries are dropped
  and listed in ``Challenge.invalid`` (a server may offer options we do not understand next to one
  we do); we only ever pay an entry that passed every check here.

We parse the JSON ourselves instead of through the SDK's pydantic models because V2 servers
deep-compare ``accepted`` with their own requirement: the SDK models drop unknown fields and add
defaults (``extra: {}``), so a re-serialized requirement may no longer match. ``Requirement.raw``
is the exact dict the server sent; the signer echoes it untouched.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.payments.amounts import UINT256_MAX
from proxy.payments.assets import EVM_ADDRESS
from proxy.payments.headers import PAYMENT_REQUIRED, get_header
from proxy.payments.networks import EIP155_PATTERN, NetworkRegistry, to_caip2

# Bounds. A challenge is attacker-controlled input that decides where money goes: keep it small.
MAX_HEADER_CHARS = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
MAX_ACCEPTS = 64
MAX_FIELD_CHARS = 256
MAX_AMOUNT_DIGITS = 78  # len(str(2**256 - 1))
# maxTimeoutSeconds: above a year is nonsense -> entry rejected. Otherwise the signing window is
# clamped to [MIN, MAX]: a longer window only lengthens the time an in-doubt authorization can
# still settle, and a shorter one would expire before a slow handler finishes.
MAX_TIMEOUT_ACCEPTED = 365 * 24 * 3600
MIN_SIGNING_WINDOW = 30
MAX_SIGNING_WINDOW = 3600

# Matched with fullmatch: "$" would also accept a trailing newline ("10000\n", "0x...\n"), and a
# recipient written that way compared unequal to its pay_to_deny entry.
_DIGITS = re.compile(r"[0-9]{1,78}")
_SNIFF_BYTES = 4096


class MalformedChallenge(ValueError):
    """The response claims to be an x402 challenge but is not usable."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Requirement:
    index: int  # position in the server's accepts list
    scheme: str
    network: str  # CAIP-2 when known or given as CAIP-2, else the raw name
    network_raw: str
    amount: int  # atomic units (V2 amount / V1 maxAmountRequired)
    asset: str
    pay_to: str
    max_timeout_seconds: int  # clamped signing window, see MIN/MAX_SIGNING_WINDOW
    extra: Mapping[str, Any]
    raw: Mapping[str, Any]  # exactly what the server sent: echoed back as V2 `accepted`
    resource_url: str | None = None  # V1 carries the resource per requirement

    @property
    def is_evm(self) -> bool:
        return self.network.startswith("eip155:")

    @property
    def transfer_method(self) -> str:
        """eip3009 | permit2: how the exact/upto scheme moves the tokens."""
        if self.scheme == "upto":
            return "permit2"
        method = self.extra.get("assetTransferMethod")
        return "permit2" if method == "permit2" else "eip3009"


@dataclass(frozen=True)
class InvalidRequirement:
    index: int
    detail: str


@dataclass(frozen=True)
class Challenge:
    version: int  # 1 | 2
    requirements: tuple[Requirement, ...]
    resource: Mapping[str, Any] | str | None  # V2 resource object / V1 resource URL
    extensions: Mapping[str, Any]
    raw: Mapping[str, Any]
    error: str | None = None
    invalid: tuple[InvalidRequirement, ...] = field(default=())

    @property
    def resource_url(self) -> str | None:
        if isinstance(self.resource, Mapping):
            url = self.resource.get("url")
            return url if isinstance(url, str) else None
        return self.resource


_DEFAULT_NETWORKS = NetworkRegistry()


def parse_challenge(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    networks: NetworkRegistry | None = None,
) -> Challenge | None:
    """Parse a 402. See the module docstring for the three outcomes."""
    if status != 402:
        return None
    registry = networks or _DEFAULT_NETWORKS
    header = get_header(headers, PAYMENT_REQUIRED)
    if header is not None:
        return _from_document(_decode_header(header), registry, source="PAYMENT-REQUIRED header")
    document = _sniff_body(body)
    if document is None:
        return None
    return _from_document(document, registry, source="body")


def _decode_header(value: str) -> dict[str, Any]:
    value = value.strip()
    if len(value) > MAX_HEADER_CHARS:
        raise MalformedChallenge(
            f"PAYMENT-REQUIRED header is {len(value)} characters (limit {MAX_HEADER_CHARS})"
        )
    raw = _b64decode(value)
    if raw is None:
        raise MalformedChallenge("PAYMENT-REQUIRED header is not valid base64")
    document = _loads(raw)
    if not isinstance(document, dict):
        raise MalformedChallenge("PAYMENT-REQUIRED header is not a base64 JSON object")
    return document


def _b64decode(value: str) -> bytes | None:
    padded = value + "=" * (-len(value) % 4)
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and Python's int-digits limit on absurd numbers.
        raise MalformedChallenge(f"challenge is not valid JSON ({type(exc).__name__})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which json.dumps would echo back as the non-JSON token "Infinity".
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError("number out of range")
    return value


def _sniff_body(body: bytes) -> dict[str, Any] | None:
    """A V1 challenge is a JSON body with x402Version; anything else is a plain 402."""
    if not body:
        return None
    head = body[:_SNIFF_BYTES].lstrip()
    if not head.startswith(b"{"):
        return None
    claims_x402 = b'"x402Version"' in head
    if len(body) > MAX_BODY_BYTES:
        if claims_x402:
            raise MalformedChallenge(f"challenge body is {len(body)} bytes (limit {MAX_BODY_BYTES})")
        return None
    try:
        document = _loads(body)
    except MalformedChallenge:
        if claims_x402:
            raise
        return None
    if not isinstance(document, dict) or "x402Version" not in document:
        return None
    return document


def challenge_from_document(
    document: dict[str, Any], networks: NetworkRegistry, *, source: str = "an MCP tool result"
) -> Challenge:
    """A PaymentRequired that did not come in an HTTP 402 (an MCP tool result): the same checks."""
    return _from_document(document, networks, source=source)


def _from_document(document: dict[str, Any], networks: NetworkRegistry, *, source: str) -> Challenge:
    version = document.get("x402Version", 2 if source.startswith("PAYMENT-REQUIRED") else None)
    if isinstance(version, bool) or version not in (1, 2):
        raise MalformedChallenge(f"unsupported x402Version {version!r} in {source}")
    accepts = document.get("accepts")
    if not isinstance(accepts, list):
        raise MalformedChallenge(f"challenge in {source} has no 'accepts' list")
    if not accepts:
        raise MalformedChallenge("challenge offers no payment options ('accepts' is empty)")
    if len(accepts) > MAX_ACCEPTS:
        raise MalformedChallenge(f"challenge offers {len(accepts)} payment options (limit {MAX_ACCEPTS})")

    resource: Mapping[str, Any] | str | None = None
    extensions: Mapping[str, Any] = {}
    if version == 2:
        resource = _v2_resource(document.get("resource"))
        raw_extensions = document.get("extensions")
        if raw_extensions is not None and not isinstance(raw_extensions, dict):
            raise MalformedChallenge("'extensions' must be an object")
        extensions = raw_extensions or {}

    requirements: list[Requirement] = []
    invalid: list[InvalidRequirement] = []
    for index, entry in enumerate(accepts):
        try:
            requirements.append(_requirement(index, entry, version, networks))
        except _InvalidEntry as exc:
            invalid.append(InvalidRequirement(index, str(exc)))
    if not requirements:
        details = "; ".join(f"accepts[{i.index}]: {i.detail}" for i in invalid[:3])
        raise MalformedChallenge(f"no well-formed payment option: {details}")

    if version == 1:
        resource = requirements[0].resource_url
    error = document.get("error")
    return Challenge(
        version=version,
        requirements=tuple(requirements),
        resource=resource,
        extensions=extensions,
        raw=document,
        error=error[:MAX_FIELD_CHARS] if isinstance(error, str) else None,
        invalid=tuple(invalid),
    )


def _v2_resource(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        raise MalformedChallenge("'resource' must be an object with a 'url' string")
    return value


class _InvalidEntry(ValueError):
    pass


def _requirement(index: int, entry: Any, version: int, networks: NetworkRegistry) -> Requirement:
    if not isinstance(entry, dict):
        raise _InvalidEntry("not an object")
    scheme = _text(entry, "scheme", limit=64)
    network_raw = _text(entry, "network", limit=64)
    network = to_caip2(network_raw, networks)
    amount = _amount(entry, "amount" if version == 2 else "maxAmountRequired")
    asset = _text(entry, "asset")
    pay_to = _text(entry, "payTo")
    if network.startswith("eip155:"):
        if EIP155_PATTERN.fullmatch(network) is None:
            raise _InvalidEntry(f"network {network_raw!r} is not a valid eip155 id")
        _evm_address(asset, "asset")
        _evm_address(pay_to, "payTo")
    timeout = _timeout(entry.get("maxTimeoutSeconds"))
    extra = _extra(entry.get("extra"), version)
    resource_url: str | None = None
    if version == 1:
        resource_url = _text(entry, "resource", limit=8192)
    return Requirement(
        index=index,
        scheme=scheme,
        network=network,
        network_raw=network_raw,
        amount=amount,
        asset=asset,
        pay_to=pay_to,
        max_timeout_seconds=timeout,
        extra=extra,
        raw=entry,
        resource_url=resource_url,
    )


def _text(entry: Mapping[str, Any], key: str, *, limit: int = MAX_FIELD_CHARS) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _InvalidEntry(f"'{key}' must be a non-empty string")
    if len(value) > limit:
        raise _InvalidEntry(f"'{key}' is longer than {limit} characters")
    return value


def _amount(entry: Mapping[str, Any], key: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool):
        raise _InvalidEntry(f"'{key}' must be an integer string, got a boolean")
    if isinstance(value, int):
        amount = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        amount = int(value)
    else:
        shown = value if not isinstance(value, str) else value[:40]
        raise _InvalidEntry(f"'{key}' must be a non-negative integer string of atomic units, got {shown!r}")
    if not 0 <= amount <= UINT256_MAX:
        raise _InvalidEntry(f"'{key}' is outside 0..2**256-1")
    return amount


def _evm_address(value: str, key: str) -> None:
    from proxy.payments.evm_sign import checksum_address

    if EVM_ADDRESS.fullmatch(value) is None:
        raise _InvalidEntry(f"'{key}' is not an EVM address")
    body = value[2:]
    if body != body.lower() and body != body.upper() and checksum_address(value) != value:
        # Mixed case that fails EIP-55 is a corrupted address: never send money to it.
        raise _InvalidEntry(f"'{key}' fails its EIP-55 checksum")


def _timeout(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidEntry("'maxTimeoutSeconds' must be an integer")
    if value < 0 or value > MAX_TIMEOUT_ACCEPTED:
        raise _InvalidEntry(f"'maxTimeoutSeconds' {value} is outside 0..{MAX_TIMEOUT_ACCEPTED}")
    return min(max(value, MIN_SIGNING_WINDOW), MAX_SIGNING_WINDOW)


def _extra(value: Any, version: int) -> Mapping[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if version == 1 and isinstance(value, str) and len(value) <= MAX_FIELD_CHARS * 16:
        # Some V1 servers send `extra` as a JSON string; the SDK accepts it too.
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    raise _InvalidEntry("'extra' must be an object")


# --- V1 HTML paywall -----------------------------------------------------------------------------
# x402-express 1.x (and x402 1.x for Next/Hono) answer a "browser" (Accept contains text/html AND
# User-Agent contains Mozilla) with an HTML paywall and no JSON challenge. V2 servers (x402 2.x
# Python middleware, @x402/express) still send the PAYMENT-REQUIRED header with their HTML, so only
# a 402 without that header and with an HTML body needs the challenge fetched again.

REFETCH_USER_AGENT = "x402-proxy (challenge refetch)"


def needs_challenge_refetch(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    if status != 402 or get_header(headers, PAYMENT_REQUIRED) is not None:
        return False
    content_type = (get_header(headers, "Content-Type") or "").lower()
    if "text/html" in content_type:
        return True
    head = body[:_SNIFF_BYTES].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def challenge_refetch_headers(original: Mapping[str, str]) -> dict[str, str]:
    """Headers for re-requesting the same URL so a V1 server answers with its JSON challenge.

    Express 1.x only needs one of the two conditions broken; we break both (Accept first) because
    other V1 ports use the same test. Everything else (auth, cookies, body headers) is kept.
    """
    headers: dict[str, str] = {}
    for key, value in original.items():
        lower = key.lower()
        if lower == "accept":
            continue
        if lower == "user-agent" and "mozilla" in value.lower():
            continue
        headers[key] = value
    headers["Accept"] = "application/json"
    if not any(k.lower() == "user-agent" for k in headers):
        headers["User-Agent"] = REFETCH_USER_AGENT
    return headers
