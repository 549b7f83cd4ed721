import base64
import json

import pytest
from multidict import CIMultiDict

from proxy.payments.challenge import (
    MAX_ACCEPTS,
    MAX_SIGNING_WINDOW,
    MIN_SIGNING_WINDOW,
    MalformedChallenge,
    challenge_refetch_headers,
    needs_challenge_refetch,
    parse_challenge,
)
from proxy.payments.networks import NetworkConfig, NetworkRegistry
from tests.test_payments_fixtures import (
    BASE_SEPOLIA_USDC,
    DROP,
    PAY_TO,
    b64json,
    v1_document,
    v1_requirement,
    v1_response,
    v2_document,
    v2_requirement,
    v2_response,
)

# --- well-formed challenges ------------------------------------------------------------------


def test_v2_header_challenge_is_normalized_and_keeps_the_raw_requirement() -> None:
    requirement = v2_requirement(somethingNew={"kept": True})
    status, headers, body = v2_response(
        requirement, extensions={"payment-identifier": {"info": {"required": False}}}
    )
    challenge = parse_challenge(status, headers, body)
    assert challenge is not None
    assert challenge.version == 2
    (req,) = challenge.requirements
    assert req.scheme == "exact"
    assert req.network == "eip155:84532"
    assert req.amount == 10_000
    assert req.asset == BASE_SEPOLIA_USDC
    assert req.pay_to == PAY_TO
    assert req.raw == requirement  # unknown fields survive: the signer echoes this dict
    assert challenge.resource_url == "http://shop.test/paid"
    assert "payment-identifier" in challenge.extensions


def test_v1_body_challenge_maps_network_names_to_caip2() -> None:
    challenge = parse_challenge(*v1_response())
    assert challenge is not None
    assert challenge.version == 1
    (req,) = challenge.requirements
    assert req.network == "eip155:84532"
    assert req.network_raw == "base-sepolia"
    assert req.resource_url == "http://shop.test/paid"
    assert challenge.resource == "http://shop.test/paid"


@pytest.mark.parametrize("name", ["PAYMENT-REQUIRED", "payment-required", "Payment-Required"])
def test_header_lookup_is_case_insensitive_for_plain_dicts(name: str) -> None:
    challenge = parse_challenge(402, {name: b64json(v2_document())}, b"")
    assert challenge is not None and challenge.version == 2


def test_cimultidict_headers_are_accepted() -> None:
    headers = CIMultiDict({"payment-required": b64json(v2_document())})
    assert parse_challenge(402, headers, b"") is not None


def test_header_wins_over_body_and_urlsafe_unpadded_base64_is_accepted() -> None:
    raw = json.dumps(v2_document()).encode()
    value = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    challenge = parse_challenge(402, {"PAYMENT-REQUIRED": value}, json.dumps(v1_document()).encode())
    assert challenge is not None and challenge.version == 2


def test_v1_extra_as_json_string_is_understood_and_echoed_raw() -> None:
    requirement = v1_requirement(extra=json.dumps({"name": "USDC", "version": "2"}))
    challenge = parse_challenge(*v1_response(requirement))
    assert challenge is not None
    assert challenge.requirements[0].extra == {"name": "USDC", "version": "2"}
    assert isinstance(challenge.requirements[0].raw["extra"], str)


def test_integer_json_amount_is_accepted() -> None:
    challenge = parse_challenge(*v2_response(v2_requirement(amount=10000)))
    assert challenge is not None and challenge.requirements[0].amount == 10_000


def test_unknown_network_is_kept_for_the_policy_to_refuse() -> None:
    challenge = parse_challenge(*v2_response(v2_requirement(network="eip155:999999")))
    assert challenge is not None and challenge.requirements[0].network == "eip155:999999"
    challenge = parse_challenge(*v1_response(v1_requirement(network="some-new-chain")))
    assert challenge is not None and challenge.requirements[0].network == "some-new-chain"


def test_non_evm_requirements_are_parsed_without_address_checks() -> None:
    solana = v2_requirement(
        network="solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1",
        asset="EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
        payTo="9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin",
    )
    challenge = parse_challenge(*v2_response(solana))
    assert challenge is not None and not challenge.requirements[0].is_evm


def test_configured_networks_are_used_for_v1_names() -> None:
    registry = NetworkRegistry(extra=[NetworkConfig("eip155:31337", testnet=True, v1_name="anvil")])
    challenge = parse_challenge(*v1_response(v1_requirement(network="anvil")), networks=registry)
    assert challenge is not None and challenge.requirements[0].network == "eip155:31337"


@pytest.mark.parametrize(
    ("given", "window"), [(0, MIN_SIGNING_WINDOW), (60, 60), (86_400, MAX_SIGNING_WINDOW)]
)
def test_timeout_is_clamped_to_a_sane_signing_window(given: int, window: int) -> None:
    challenge = parse_challenge(*v2_response(v2_requirement(maxTimeoutSeconds=given)))
    assert challenge is not None and challenge.requirements[0].max_timeout_seconds == window


# --- not a challenge -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (402, {}, b""),
        (402, {"Content-Type": "text/plain"}, b"pay up"),
        (402, {"Content-Type": "application/json"}, b'{"error": "payment required"}'),
        (402, {}, b"{not json"),
        (402, {}, b"[1, 2, 3]"),
        (200, {"PAYMENT-REQUIRED": b64json(v2_document())}, b""),
        (401, {}, json.dumps(v1_document()).encode()),
        (402, {}, b"{" + b" " * (2 * 1024 * 1024) + b"}"),
    ],
)
def test_plain_responses_are_not_challenges(status: int, headers: dict[str, str], body: bytes) -> None:
    assert parse_challenge(status, headers, body) is None


# --- malformed challenges --------------------------------------------------------------------


def _malformed(status: int, headers: dict[str, str], body: bytes) -> str:
    with pytest.raises(MalformedChallenge) as info:
        parse_challenge(status, headers, body)
    return info.value.detail


def test_bad_base64_header() -> None:
    assert "base64" in _malformed(402, {"PAYMENT-REQUIRED": "!!!not base64!!!"}, b"")


def test_header_that_is_base64_but_not_json() -> None:
    value = base64.b64encode(b"hello").decode()
    assert "JSON" in _malformed(402, {"PAYMENT-REQUIRED": value}, b"")


def test_header_that_is_json_but_not_an_object() -> None:
    assert "object" in _malformed(402, {"PAYMENT-REQUIRED": b64json([1, 2])}, b"")


def test_oversized_header() -> None:
    assert "limit" in _malformed(402, {"PAYMENT-REQUIRED": "A" * (65 * 1024)}, b"")


def test_ten_thousand_accepts_are_refused_before_any_work() -> None:
    compact = {"x402Version": 1, "accepts": [{}] * 10_000}
    assert "10000 payment options" in _malformed(402, {}, json.dumps(compact).encode())
    many = v2_document(*[v2_requirement() for _ in range(MAX_ACCEPTS + 1)])
    assert "payment options" in _malformed(402, {"PAYMENT-REQUIRED": b64json(many)}, b"")
    assert parse_challenge(
        402, {"PAYMENT-REQUIRED": b64json(v2_document(*[v2_requirement()] * MAX_ACCEPTS))}, b""
    )


def test_huge_v1_body_claiming_x402_is_malformed() -> None:
    document = v1_document(*[v1_requirement() for _ in range(10_000)])
    body = json.dumps(document).encode()
    assert len(body) > 1024 * 1024
    assert "limit" in _malformed(402, {}, body)


def test_unsupported_version() -> None:
    assert "x402Version" in _malformed(402, {}, json.dumps({"x402Version": 3, "accepts": []}).encode())
    assert "x402Version" in _malformed(
        402, {"PAYMENT-REQUIRED": b64json({"x402Version": "2", "accepts": []})}, b""
    )


def test_missing_or_empty_accepts() -> None:
    assert "accepts" in _malformed(402, {"PAYMENT-REQUIRED": b64json({"x402Version": 2})}, b"")
    assert "no payment options" in _malformed(*v2_response_raw(accepts=[]))


def v2_response_raw(**document: object) -> tuple[int, dict[str, str], bytes]:
    base = {"x402Version": 2, "resource": {"url": "http://shop.test/paid"}}
    base.update(document)
    return 402, {"PAYMENT-REQUIRED": b64json(base)}, b""


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"amount": "-1"}, "amount"),
        ({"amount": "1.5"}, "amount"),
        ({"amount": "1e6"}, "amount"),
        ({"amount": " 100"}, "amount"),
        ({"amount": "0x10"}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": -5}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": None}, "amount"),
        ({"amount": "ten"}, "amount"),
        ({"amount": str(2**256)}, "amount"),
        ({"amount": "9" * 79}, "amount"),
        ({"amount": DROP}, "amount"),
        ({"maxTimeoutSeconds": -1}, "maxTimeoutSeconds"),
        ({"maxTimeoutSeconds": 10**12}, "maxTimeoutSeconds"),
        ({"maxTimeoutSeconds": "60"}, "maxTimeoutSeconds"),
        ({"maxTimeoutSeconds": 60.5}, "maxTimeoutSeconds"),
        ({"payTo": "0x1234"}, "payTo"),
        ({"payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287c"}, "checksum"),
        ({"asset": "not-an-address"}, "asset"),
        ({"scheme": ""}, "scheme"),
        ({"scheme": "x" * 100}, "scheme"),
        ({"network": 8453}, "network"),
        ({"network": "eip155:0"}, "eip155"),
        ({"extra": "a string"}, "extra"),
    ],
)
def test_malformed_requirement_fields(override: dict[str, object], fragment: str) -> None:
    detail = _malformed(*v2_response(v2_requirement(**override)))
    assert fragment in detail


def test_huge_json_number_does_not_crash_the_parser() -> None:
    text = json.dumps(v2_document()).replace('"10000"', "1" + "0" * 5000)
    assert "JSON" in _malformed(402, {"PAYMENT-REQUIRED": base64.b64encode(text.encode()).decode()}, b"")


def test_nan_is_not_json() -> None:
    text = json.dumps(v2_document()).replace("60", "NaN")
    _malformed(402, {"PAYMENT-REQUIRED": base64.b64encode(text.encode()).decode()}, b"")


def test_overflowing_float_is_malformed_because_it_could_not_be_echoed() -> None:
    text = json.dumps(v2_document(v2_requirement(outputSchema={"x": 1.5}))).replace("1.5", "1e400")
    _malformed(402, {"PAYMENT-REQUIRED": base64.b64encode(text.encode()).decode()}, b"")


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    text = '{"x402Version": 2, "accepts": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _malformed(402, {"PAYMENT-REQUIRED": base64.b64encode(text.encode()).decode()}, b"")


def test_bad_entries_are_dropped_when_a_good_one_remains() -> None:
    challenge = parse_challenge(*v2_response(v2_requirement(amount="-1"), v2_requirement(), "junk"))  # type: ignore[arg-type]
    assert challenge is not None
    assert [r.index for r in challenge.requirements] == [1]
    assert [i.index for i in challenge.invalid] == [0, 2]


def test_bad_resource_and_extensions_types() -> None:
    assert "resource" in _malformed(*v2_response_raw(resource="http://x", accepts=[v2_requirement()]))
    assert "extensions" in _malformed(*v2_response_raw(extensions=[1], accepts=[v2_requirement()]))


def test_invalid_json_body_that_claims_x402_is_malformed() -> None:
    assert "JSON" in _malformed(402, {}, b'{"x402Version": 1, "accepts": [}')


# --- V1 HTML paywall -------------------------------------------------------------------------

PAYWALL = b"<!DOCTYPE html><html><head><title>Payment Required</title></head><body>...</body></html>"


def test_html_paywall_needs_a_refetch() -> None:
    assert needs_challenge_refetch(402, {"Content-Type": "text/html; charset=utf-8"}, PAYWALL)
    assert needs_challenge_refetch(402, {}, PAYWALL)
    assert parse_challenge(402, {"Content-Type": "text/html"}, PAYWALL) is None


def test_v2_html_with_header_and_json_challenges_need_no_refetch() -> None:
    headers = {"Content-Type": "text/html", "PAYMENT-REQUIRED": b64json(v2_document())}
    assert not needs_challenge_refetch(402, headers, PAYWALL)
    assert not needs_challenge_refetch(*v1_response())
    assert not needs_challenge_refetch(200, {"Content-Type": "text/html"}, PAYWALL)


def test_refetch_headers_stop_looking_like_a_browser_but_keep_the_rest() -> None:
    original = {
        "Accept": "text/html,application/xhtml+xml",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
        "Authorization": "Bearer abc",
        "Cookie": "a=b",
    }
    headers = challenge_refetch_headers(original)
    assert headers["Accept"] == "application/json"
    assert "mozilla" not in headers["User-Agent"].lower()
    assert headers["Authorization"] == "Bearer abc" and headers["Cookie"] == "a=b"
    # express 1.x: isWebBrowser = accept.includes("text/html") && userAgent.includes("Mozilla")
    assert not ("text/html" in headers["Accept"] and "Mozilla" in headers["User-Agent"])
    kept = challenge_refetch_headers({"user-agent": "curl/8.0", "accept": "*/*"})
    assert kept["user-agent"] == "curl/8.0" and kept["Accept"] == "application/json"
    assert "accept" not in kept
