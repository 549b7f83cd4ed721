"""Admin sessions on the real x402 stack: start (paid, on-chain), reuse, scope, end, pay again, caps, and
notify_upstream against servers answering DELETE with 200, 404, 405, 500, or not at all."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import PyServer, Stack
from tests.support.admin import AdminProxy, ThreadedApp, front_app, start_paying_admin

PAYMENT = "X-402-Proxy-Payment"
SESSION = "X-402-Proxy-Session"


@pytest.fixture(scope="module")
def admin(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    process = start_paying_admin(x402_stack, tmp_path_factory.mktemp("admin-e2e") / "home")
    yield process
    process.stop()


def conforms(admin: AdminProxy, name: str, instance: object) -> None:
    """`instance` is valid against components/schemas/<name> of the proxy's own /openapi.json."""
    doc = admin.call("GET", "/openapi.json").json()
    Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]}).validate(instance)


def samples(admin: AdminProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = admin.call("GET", "/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def settled(admin: AdminProxy) -> list[dict]:  # type: ignore[type-arg]
    return admin.call("GET", "/payments?state=settled").json()["payments"]  # type: ignore[no-any-return]


def test_start_reuse_end_then_pay_again(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    endpoint = f"{siwx_server.url}/paid/a"
    before = x402_stack.balance_of(x402_stack.pay_to)
    started = admin.call("POST", "/sessions", json={"endpoint": endpoint, "label": "e2e", "ttl_seconds": 600})
    assert started.status_code == 201, started.text
    body = started.json()
    conforms(admin, "StartSessionPaid", body)
    session = body["session"]
    assert body["payment_required"] is True and session["state"] == "active" and session["label"] == "e2e"
    assert started.headers["Location"] == f"/sessions/{session['id']}"
    assert body["response"]["status"] == 200
    assert body["payment"]["state"] == "settled" and body["payment"]["session_id"] == session["id"]
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    paid_after_start = x402_stack.balance_of(x402_stack.pay_to)

    # Reuse: through the admin API and through the proxy listener, without paying.
    shown = admin.call("GET", f"/sessions/{session['id']}").json()
    conforms(admin, "Session", shown)
    assert shown["state"] == "active" and shown["scope"] == {"kind": "prefix", "url": endpoint}
    assert session["id"] in {s["id"] for s in admin.call("GET", "/sessions?state=active").json()["sessions"]}
    origin = siwx_server.url
    assert [s["id"] for s in admin.call("GET", "/sessions", params={"origin": origin}).json()["sessions"]] == [
        session["id"]
    ]
    fetched = admin.call("POST", f"/sessions/{session['id']}/fetch", json={"url": endpoint})
    assert fetched.status_code == 200 and fetched.json()["status"] == 200, fetched.text
    assert "sign-in-with-x" in fetched.json()["body"]
    conforms(admin, "FetchedResponse", fetched.json())
    through = requests.get(endpoint, proxies={"http": admin.url}, timeout=60)
    assert through.status_code == 200 and PAYMENT not in through.headers
    assert through.headers[SESSION] == session["id"]
    assert x402_stack.balance_of(x402_stack.pay_to) == paid_after_start

    # Out of scope: same origin, another path (segment boundary), and another origin.
    for url in (f"{siwx_server.url}/paid/b", f"{siwx_server.url}/paid/ab", f"{x402_stack.py}/paid/a"):
        out = admin.call("POST", f"/sessions/{session['id']}/fetch", json={"url": url})
        assert out.status_code == 422 and out.json()["code"] == "url_not_in_scope", out.text

    # End: idempotent; the session's credentials are gone.
    ended = admin.call("DELETE", f"/sessions/{session['id']}")
    assert ended.status_code == 200, ended.text
    assert ended.json()["already_ended"] is False and ended.json()["session"]["state"] == "ended"
    assert ended.json()["session"]["credentials"] == [] and ended.json()["upstream"] is None
    conforms(admin, "EndSession", ended.json())
    again = admin.call("DELETE", f"/sessions/{session['id']}")
    assert again.status_code == 200 and again.json()["already_ended"] is True
    assert admin.call("GET", f"/sessions/{session['id']}").json()["state"] == "ended"
    after_end = admin.call("POST", f"/sessions/{session['id']}/fetch", json={"url": endpoint})
    assert after_end.status_code == 409 and after_end.json()["code"] == "session_ended"

    # The next in-scope request through the proxy pays again: exactly one more price on chain.
    before_again = x402_stack.balance_of(x402_stack.pay_to)
    paid_again = requests.get(endpoint, proxies={"http": admin.url}, timeout=60)
    assert paid_again.status_code == 200 and PAYMENT in paid_again.headers
    assert paid_again.headers[SESSION] != session["id"]
    assert x402_stack.balance_of(x402_stack.pay_to) - before_again == x402_stack.price

    metrics = samples(admin)
    assert metrics[("x402_proxy_requests_total", (("outcome", "paid"),))] == 1
    assert metrics[("x402_proxy_requests_total", (("outcome", "session"),))] == 1
    settled_rows = [v for (name, labels), v in metrics.items() if name == "x402_proxy_payments" and
                    ("state", "settled") in labels]
    assert sum(settled_rows) >= 2
    assert metrics[("x402_proxy_sessions_active", ())] == 1


def test_over_max_payment_pays_nothing(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    rows_before = len(settled(admin))
    sessions_before = admin.call("GET", "/sessions").json()["sessions"]
    cap = "0.0001"  # the price is 0.001 TUSDC
    response = admin.call("POST", "/sessions", json={"endpoint": f"{siwx_server.url}/paid/b", "max_payment": cap})
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == "over_request_cap"
    conforms(admin, "Problem", response.json())
    assert x402_stack.balance_of(x402_stack.pay_to) == before
    assert len(settled(admin)) == rows_before
    assert admin.call("GET", "/sessions").json()["sessions"] == sessions_before


def test_start_with_a_cap_that_fits(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    response = admin.call(
        "POST", "/sessions", json={"endpoint": f"{siwx_server.url}/paid/b", "max_payment": "0.001", "scope": "exact"}
    )
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    assert session["scope"]["kind"] == "exact" and session["max_session_payment"] == "1000"
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    assert admin.call("DELETE", f"/sessions/{session['id']}").json()["already_ended"] is False


def test_free_endpoint(admin: AdminProxy, siwx_server: PyServer) -> None:
    response = admin.call("POST", "/sessions", json={"endpoint": f"{siwx_server.url}/free"})
    assert response.status_code == 200, response.text
    assert response.json()["payment_required"] is False and response.json()["session"] is None
    conforms(admin, "StartSessionFree", response.json())


def test_payments_and_budget_reflect_spending(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    rows = settled(admin)
    assert rows and all(r["network"] == x402_stack.network_v2 for r in rows)
    assert any(r["session_id"] for r in rows)
    budget = admin.call("GET", "/budget").json()
    conforms(admin, "Budget", budget)
    for row in rows:
        conforms(admin, "Payment", row)
    assert float(budget["global"]["spent"]) > 0
    host = siwx_server.url.split("//")[1].split(":")[0]
    assert host in budget["hosts"]
    cli = admin.admin_cli("payments", "--state", "settled")
    assert cli.returncode == 0 and "0.001" in cli.stdout and "settled" in cli.stdout


def test_cli_start_refused_by_cap(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    result = admin.admin_cli("sessions", "start", f"{siwx_server.url}/paid/b", "--max-payment", "0.0005")
    assert result.returncode == 1 and "over_request_cap" in result.stderr
    assert x402_stack.balance_of(x402_stack.pay_to) == before


def test_cli_session_lifecycle(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    started = admin.admin_cli("sessions", "start", f"{siwx_server.url}/paid/a", "--label", "cli", "--ttl", "120")
    assert started.returncode == 0, started.stderr
    session_id = started.stdout.split()[1]
    shown = admin.admin_cli("sessions", "show", session_id)
    assert shown.returncode == 0 and "active" in shown.stdout and "cli" in shown.stdout
    fetched = admin.admin_cli("sessions", "fetch", session_id, f"{siwx_server.url}/paid/a")
    assert fetched.returncode == 0 and fetched.stdout.startswith("HTTP 200")
    listed = admin.admin_cli("sessions", "list", "--state", "active")
    assert session_id in listed.stdout
    ended = admin.admin_cli("sessions", "end", session_id)
    assert ended.returncode == 0 and "ended" in ended.stdout
    again = admin.admin_cli("sessions", "end", session_id, "--json")
    assert again.returncode == 0 and '"already_ended": true' in again.stdout


# -- notify_upstream -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fronts(siwx_server: PyServer) -> Iterator[tuple[ThreadedApp, ThreadedApp, list[tuple[str, dict[str, str]]]]]:
    deletes: list[tuple[str, dict[str, str]]] = []
    alive = ThreadedApp(front_app(siwx_server.url, deletes))
    doomed = ThreadedApp(front_app(siwx_server.url, deletes))
    yield alive, doomed, deletes
    alive.stop()
    doomed.stop()


@pytest.mark.parametrize("status, ok", [(200, True), (404, True), (405, True), (500, False), (None, False)])
def test_notify_upstream_always_ends_locally(
    admin: AdminProxy,
    fronts: tuple[ThreadedApp, ThreadedApp, list[tuple[str, dict[str, str]]]],
    status: int | None,
    ok: bool,
) -> None:
    alive, doomed, deletes = fronts
    front = doomed if status is None else alive
    endpoint = f"{front.url}/s{status or 200}/paid/a"
    started = admin.call("POST", "/sessions", json={"endpoint": endpoint})
    assert started.status_code == 201, started.text
    session_id = started.json()["session"]["id"]
    if status is None:
        doomed.stop()  # the upstream is down when the session ends
    seen = len(deletes)
    ended = admin.call("DELETE", f"/sessions/{session_id}?notify_upstream=true")
    assert ended.status_code == 200, ended.text
    body = ended.json()
    assert body["already_ended"] is False and body["session"]["state"] == "ended"
    assert body["upstream"]["ok"] is ok, body["upstream"]
    conforms(admin, "EndSession", body)
    if status is None:
        assert "error" in body["upstream"] and len(deletes) == seen
    else:
        assert body["upstream"]["status"] == status
        path, headers = deletes[-1]
        assert path == f"/s{status}/paid/a"
        lowered = {k.lower() for k in headers}
        assert lowered & {"sign-in-with-x", "x-session-token", "payment-session"}, lowered
    assert admin.call("GET", f"/sessions/{session_id}").json()["state"] == "ended"
    # A second end sends nothing upstream.
    again = admin.call("DELETE", f"/sessions/{session_id}?notify_upstream=true").json()
    assert again["already_ended"] is True and again["upstream"] is None
    assert len(deletes) == (seen if status is None else seen + 1)
