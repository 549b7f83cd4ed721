"""`x402-proxy sessions|payments|refusals|budget`: the admin API from the command line.

Talks to a running proxy's admin listener (address from `--admin`, else `[admin] listen`; token from
env X402_PROXY_ADMIN_TOKEN, else `[admin] token`, else `<home>/admin-token`). Human tables by default,
`--json` prints the API's JSON unchanged. Exit codes: 0 success, 1 the API refused (its problem detail
goes to stderr) or could not be reached, 2 a usage or configuration problem.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from proxy.admin.auth import TokenError, resolve_token
from proxy.config import Config
from proxy.payments.amounts import format_units

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
# Starting a session may wait for the upstream (up to 60 s) plus a payment: allow more than that.
HTTP_TIMEOUT = 90.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--admin", default=argparse.SUPPRESS, help="HOST:PORT of the admin API (default: [admin] listen)"
    )
    client.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON")
    parents = [common, client]

    sessions = sub.add_parser("sessions", parents=parents, help="list, start, use and end sessions")
    s_sub = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = s_sub.add_parser("list", parents=parents, help="list sessions")
    listing.add_argument("--state", choices=["active", "expired", "ended"])
    listing.add_argument("--origin", help="only sessions on this origin (e.g. https://api.example.com)")
    show = s_sub.add_parser("show", parents=parents, help="show one session")
    show.add_argument("id")
    start = s_sub.add_parser("start", parents=parents, help="pay once and open a session for URL")
    start.add_argument("url")
    start.add_argument("--scope", choices=["prefix", "exact"], default=None)
    start.add_argument("--ttl", type=int, default=None, help="seconds, 60..2592000 (default 3600)")
    start.add_argument("--label", default=None)
    start.add_argument("--max-payment", default=None, help='decimal in the asset\'s units, e.g. "0.01"')
    _request_options(start)
    end = s_sub.add_parser("end", parents=parents, help="end a session (idempotent)")
    end.add_argument("id")
    end.add_argument("--notify-upstream", action="store_true", help="send a DELETE to the scope URL first")
    fetch = s_sub.add_parser("fetch", parents=parents, help="request URL with a session's credentials")
    fetch.add_argument("id")
    fetch.add_argument("url")
    fetch.add_argument("--allow-renew", action="store_true", help="pay again if the session is rejected")
    _request_options(fetch)

    payments = sub.add_parser(
        "payments", parents=parents, help="list ledger rows (newest first), or reconcile them from the chain"
    )
    payments.add_argument(
        "action",
        nargs="?",
        choices=["list", "reconcile"],
        default="list",
        help="list (default) | reconcile: resolve now every payment whose money could have moved",
    )
    payments.add_argument("--state", default=None)
    payments.add_argument("--host", default=None)
    payments.add_argument("--since", type=float, default=None, help="Unix seconds")
    payments.add_argument("--limit", type=int, default=None)

    refusals = sub.add_parser(
        "refusals", parents=parents, help="402s the proxy refused to pay (newest first, last 30 days)"
    )
    refusals.add_argument("--host", default=None)
    refusals.add_argument("--reason", default=None, help="a reason code, e.g. budget_exhausted")
    refusals.add_argument("--since", type=float, default=None, help="Unix seconds")
    refusals.add_argument("--limit", type=int, default=None, help="1..10000 (default 100)")

    sub.add_parser("budget", parents=parents, help="spending limits and what the last 24 h used")
    approvals = sub.add_parser(
        "approvals", parents=parents, help="payments waiting for a decision (above [policy] ask_above)"
    )
    a_sub = approvals.add_subparsers(dest="approvals_command", required=True)
    a_sub.add_parser("list", parents=parents, help="waiting approvals, then recent decisions")
    approve = a_sub.add_parser("approve", parents=parents, help="let a waiting payment be signed")
    approve.add_argument("id")
    approve.add_argument("--remember", choices=["host", "scope"], default=None, help="do not ask again for")
    approve.add_argument("--hours", type=float, default=None, help="how long to remember (default 1)")
    deny = a_sub.add_parser("deny", parents=parents, help="refuse a waiting payment (approval_denied)")
    deny.add_argument("id")

    audit = sub.add_parser(
        "audit", parents=parents, help="compare the ledger with the chain (exit 1 on any discrepancy)"
    )
    audit.add_argument(
        "--since", default="24h", help="window ending now: 90m, 24h, 7d or seconds (default 24h)"
    )


def _request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", default=None, type=str.upper, choices=["GET", "POST", "PUT", "PATCH", "DELETE"]
    )
    parser.add_argument(
        "-H", "--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra request header"
    )
    parser.add_argument("--body", default=None, help="request body")
    parser.add_argument("--timeout-ms", type=int, default=None, help="1000..60000 (default 30000)")


# -- transport ------------------------------------------------------------------------------------------


class AdminClient:
    def __init__(self, host: str, port: int, token: str, timeout: float = HTTP_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self._token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        # http.client rather than urllib: no *_proxy environment applies (the proxy refuses itself anyway).
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except OSError as exc:
            raise ApiError(
                0, "unreachable", f"cannot reach the admin API at {self.host}:{self.port}: {exc}"
            ) from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if response.status >= 400:
            if isinstance(payload, dict):
                code = str(payload.get("code") or payload.get("type") or "error")
                detail = str(payload.get("detail") or payload.get("title") or response.reason)
            else:
                code, detail = "error", f"HTTP {response.status} {response.reason}"
            raise ApiError(response.status, code, detail)
        return response.status, payload


def admin_address(args: argparse.Namespace, config: Config) -> tuple[str, int]:
    """Where to connect: --admin (already folded into the config) or [admin] listen."""
    host, port = config.admin.listen_address(config.proxy.listen_address[1])
    if port == 0:
        raise ValueError("the admin port is chosen at startup (proxy port 0): pass --admin HOST:PORT")
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def run(
    args: argparse.Namespace,
    config: Config,
    home: Path,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    env = os.environ if env is None else env
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        host, port = admin_address(args, config)
        token = resolve_token(config.admin, home, env, create=False)
    except (ValueError, TokenError) as exc:
        print(f"x402-proxy: {exc}", file=err)
        return EXIT_USAGE
    client = AdminClient(host, port, token.value)
    as_json = bool(getattr(args, "json", False))
    try:
        if args.command == "sessions":
            return _sessions(args, client, as_json, out)
        if args.command == "payments":
            if args.action == "reconcile":
                return _reconcile(client, as_json, out)
            return _payments(args, client, as_json, out)
        if args.command == "refusals":
            return _refusals(args, client, as_json, out)
        if args.command == "audit":
            return _audit(args, client, as_json, out, err)
        if args.command == "approvals":
            return _approvals(args, client, as_json, out)
        return _budget(client, as_json, out)
    except ApiError as exc:
        if exc.status:
            print(f"x402-proxy: {exc.code} ({exc.status}): {exc.detail}", file=err)
        else:
            print(f"x402-proxy: {exc.detail}", file=err)
        return EXIT_API
    except ValueError as exc:
        print(f"x402-proxy: {exc}", file=err)
        return EXIT_USAGE


def _headers(items: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {item!r} is not 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def _request_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.method:
        body["method"] = args.method
    if args.header:
        body["headers"] = _headers(args.header)
    if args.body is not None:
        body["body"] = args.body
    if args.timeout_ms is not None:
        body["timeout_ms"] = args.timeout_ms
    return body


def _sid(value: str) -> str:
    return quote(value, safe="")


def _sessions(args: argparse.Namespace, client: AdminClient, as_json: bool, out: TextIO) -> int:
    command = args.sessions_command
    if command == "list":
        query = {k: v for k, v in (("state", args.state), ("origin", args.origin)) if v}
        _, data = client.call("GET", "/sessions" + (f"?{urlencode(query)}" if query else ""))
        if as_json:
            return _dump(data, out)
        rows = [
            [
                s["id"],
                s["state"],
                f"{s['scope']['kind']} {s['scope']['url']}",
                _duration(s.get("expires_in", 0)) if s["state"] == "active" else "-",
                str(s.get("call_count", 0)),
                _amount(s.get("amount_paid"), s.get("decimals")),
                s.get("label") or "",
            ]
            for s in data["sessions"]
        ]
        header = ["ID", "STATE", "SCOPE", "EXPIRES IN", "CALLS", "PAID", "LABEL"]
        if any(s.get("channel") for s in data["sessions"]):  # a CHANNEL column only when one has one
            header.append("CHANNEL")
            for row, s in zip(rows, data["sessions"], strict=True):
                row.append(_channel(s.get("channel")))
        _table(out, header, rows)
        return EXIT_OK
    if command == "show":
        _, data = client.call("GET", f"/sessions/{_sid(args.id)}")
        return _dump(data, out) if as_json else _show_session(data, out)
    if command == "start":
        body: dict[str, Any] = {"endpoint": args.url, **_request_body(args)}
        for key, value in (
            ("scope", args.scope),
            ("ttl_seconds", args.ttl),
            ("label", args.label),
            ("max_payment", args.max_payment),
        ):
            if value is not None:
                body[key] = value
        status, data = client.call("POST", "/sessions", body)
        if as_json:
            return _dump(data, out)
        if status == 200:
            print(
                f"no payment required (upstream answered {data['response']['status']}); no session opened",
                file=out,
            )
            return EXIT_OK
        session, payment = data["session"], data.get("payment") or {}
        print(f"session {session['id']} opened", file=out)
        print(f"  scope:   {session['scope']['kind']} {session['scope']['url']}", file=out)
        print(f"  expires: {_when(session['expires_at'])}", file=out)
        print(
            f"  paid:    {_amount(payment.get('amount'), payment.get('decimals'))} "
            f"on {payment.get('network')} (payment #{payment.get('id')}, tx {payment.get('tx_hash') or '-'})",
            file=out,
        )
        return EXIT_OK
    if command == "end":
        path = f"/sessions/{_sid(args.id)}" + ("?notify_upstream=true" if args.notify_upstream else "")
        _, data = client.call("DELETE", path)
        if as_json:
            return _dump(data, out)
        session = data["session"]
        if data["already_ended"]:
            print(f"session {session['id']} was already {session['state']}", file=out)
        else:
            print(f"session {session['id']} ended after {data['calls_made']} call(s)", file=out)
        if session.get("channel"):
            print(f"  channel: {_channel(session['channel'])}", file=out)
        upstream = data.get("upstream")
        if upstream is not None:
            status = upstream.get("status", upstream.get("error", "?"))
            print(f"  upstream notified: {'ok' if upstream.get('ok') else 'failed'} ({status})", file=out)
        return EXIT_OK
    body = {"url": args.url, **_request_body(args)}
    if args.allow_renew:
        body["allow_renew"] = True
    _, data = client.call("POST", f"/sessions/{_sid(args.id)}/fetch", body)
    if as_json:
        return _dump(data, out)
    print(f"HTTP {data['status']}", file=out)
    out.write(data["body"])
    if data["body"] and not data["body"].endswith("\n"):
        out.write("\n")
    if data.get("body_truncated"):
        print("[body truncated]", file=out)
    return EXIT_OK


def _payments(args: argparse.Namespace, client: AdminClient, as_json: bool, out: TextIO) -> int:
    query = {
        k: v
        for k, v in (("state", args.state), ("host", args.host), ("since", args.since), ("limit", args.limit))
        if v is not None
    }
    _, data = client.call("GET", "/payments" + (f"?{urlencode(query)}" if query else ""))
    if as_json:
        return _dump(data, out)
    _table(
        out,
        ["ID", "STATE", "AMOUNT", "NETWORK", "HOST", "CREATED", "SESSION"],
        [
            [
                str(p["id"]),
                p["state"],
                _amount(p.get("amount"), p.get("decimals")),
                p.get("network") or "",
                p.get("host") or "",
                _when(p.get("created_at")),
                p.get("session_id") or "",
            ]
            for p in data["payments"]
        ],
    )
    return EXIT_OK


def _refusals(args: argparse.Namespace, client: AdminClient, as_json: bool, out: TextIO) -> int:
    query = {
        k: v
        for k, v in (
            ("host", args.host),
            ("reason", args.reason),
            ("since", args.since),
            ("limit", args.limit),
        )
        if v is not None
    }
    _, data = client.call("GET", "/refusals" + (f"?{urlencode(query)}" if query else ""))
    if as_json:
        return _dump(data, out)
    _table(
        out,
        ["ID", "CREATED", "REASON", "HOST", "ASKED", "REQUEST", "DETAIL"],
        [
            [
                str(r["id"]),
                _when(r.get("created_at")),
                r["reason"],
                r.get("host") or "",
                _amount(r.get("amount"), r.get("decimals")),
                f"{r.get('method')} {r.get('url')}",
                r.get("detail") or "",
            ]
            for r in data["refusals"]
        ],
    )
    return EXIT_OK


def _reconcile(client: AdminClient, as_json: bool, out: TextIO) -> int:
    _, data = client.call("POST", "/payments/reconcile")
    if as_json:
        return _dump(data, out)
    for name in ("settled", "undelivered", "never_moved", "in_doubt", "no_rpc", "errors"):
        ids = ", ".join(f"#{i}" for i in data.get(name, [])) or "-"
        print(f"{name + ':':<13}{ids}", file=out)
    return EXIT_OK


def _approvals(args: argparse.Namespace, client: AdminClient, as_json: bool, out: TextIO) -> int:
    if args.approvals_command == "list":
        _, data = client.call("GET", "/approvals")
        if as_json:
            return _dump(data, out)
        _table(
            out,
            ["ID", "STATE", "PRICE", "REQUEST", "REASON", "DECIDED BY"],
            [
                [
                    a["id"],
                    a["state"],
                    a["price"],
                    f"{a['method']} {a['url']}",
                    a["reason"],
                    a.get("decided_by") or "",
                ]
                for a in data["approvals"]
            ],
        )
        return EXIT_OK
    body: dict[str, Any] = {
        "decision": "approve" if args.approvals_command == "approve" else "deny",
        "via": "cli",
    }
    if getattr(args, "remember", None):
        body["remember_for"] = args.remember
        if args.hours is not None:
            body["hours"] = args.hours
    _, data = client.call("POST", f"/approvals/{quote(args.id, safe='')}", body)
    if as_json:
        return _dump(data, out)
    remembered = data.get("remember")
    suffix = f" (remembered for {remembered['for']} {remembered['key']})" if remembered else ""
    print(f"approval {data['id']}: {data['state']}{suffix}", file=out)
    return EXIT_OK


def parse_duration(text: str) -> float:
    """'90m', '24h', '7d', '30s' or plain seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], 0)
    number = text[:-1] if scale else text
    if not number.isascii() or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"--since {text!r}: use e.g. 90m, 24h, 7d or a number of seconds")
    return float(number) * (scale or 1)


def _audit(args: argparse.Namespace, client: AdminClient, as_json: bool, out: TextIO, err: TextIO) -> int:
    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        print(f"x402-proxy: {exc}", file=err)
        return EXIT_USAGE
    _, data = client.call("GET", f"/audit?since={since:g}")
    if as_json:
        _dump(data, out)
    else:
        for network in data["networks"]:
            counts = {k: len(network[k]) for k in AUDIT_KINDS}
            verdict = "ok" if network["ok"] else "DISCREPANCIES"
            print(
                f"{network['network']}: {verdict} " + " ".join(f"{k}={v}" for k, v in counts.items()),
                file=out,
            )
            for kind in AUDIT_KINDS[1:5]:
                for item in network[kind]:
                    print(f"  {kind}: {json.dumps(item, sort_keys=True)}", file=out)
        for skipped in data.get("skipped", []):
            print(f"{skipped['network']}: not checked ({skipped['reason']})", file=out)
    return EXIT_OK if data["ok"] else 1


AUDIT_KINDS = ("matched", "ledger_only", "chain_only", "amount_mismatch", "state_mismatch", "open")


def _budget(client: AdminClient, as_json: bool, out: TextIO) -> int:
    _, data = client.call("GET", "/budget")
    if as_json:
        return _dump(data, out)
    overall = data["global"]
    hours = data["window_seconds"] // 3600
    print(f"window:          last {hours} h", file=out)
    print(
        f"daily budget:    {overall['limit']} (spent {overall['spent']}, remaining {overall['remaining']})",
        file=out,
    )
    print(f"per host:        {data['per_host_limit']}", file=out)
    print(f"max per payment: {data['max_per_payment']}", file=out)
    if data.get("dry_run"):
        print("dry run:         yes (nothing is signed)", file=out)
    for host, spent in data.get("hosts", {}).items():
        refused = spent.get("refusals_24h", 0)
        print(
            f"  {host}: spent {spent['spent']}, remaining {spent['remaining']}, refused {refused}", file=out
        )
    return EXIT_OK


# -- formatting -----------------------------------------------------------------------------------------


def _dump(data: Any, out: TextIO) -> int:
    json.dump(data, out, indent=2)
    out.write("\n")
    return EXIT_OK


def _show_session(session: dict[str, Any], out: TextIO) -> int:
    rows = [
        ("id", session["id"]),
        ("state", session["state"]),
        ("scope", f"{session['scope']['kind']} {session['scope']['url']}"),
        ("label", session.get("label") or "-"),
        ("created", _when(session.get("created_at"))),
        ("expires", _when(session.get("expires_at"))),
        ("last used", _when(session.get("last_used_at"))),
        ("calls", str(session.get("call_count", 0))),
        ("paid", _amount(session.get("amount_paid"), session.get("decimals"))),
        ("network", session.get("network") or "-"),
        ("asset", session.get("asset") or "-"),
        ("credentials", ", ".join(session.get("credentials") or []) or "-"),
        ("renewals", str(session.get("renewals", 0))),
    ]
    if session.get("channel"):
        rows.append(("channel", _channel(session["channel"])))
    if session.get("ended_at") is not None:
        rows.append(("ended", f"{_when(session['ended_at'])} ({session.get('ended_reason') or '-'})"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}", file=out)
    return EXIT_OK


def _table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    if not rows:
        print("(none)", file=out)
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip(), file=out)


def _channel(channel: Any) -> str:
    """A channel session's `channel` summary on one line, amounts in the asset's units (as the dashboard
    shows it): the current channel's state, then deposit, signed, charged, refunded and net spend summed
    over the session's channels; refunded "not yet" and net spend "open" until every one is refunded."""
    if not channel:
        return "-"
    decimals = channel.get("decimals")
    pending = channel.get("refunded") is None
    parts = [
        ("deposit", _amount(channel.get("deposit"), decimals)),
        ("signed", _amount(channel.get("signed"), decimals)),
        ("charged", _amount(channel.get("charged"), decimals)),
        ("refunded", "not yet" if pending else _amount(channel.get("refunded"), decimals)),
        ("net spend", "open" if pending else _amount(channel.get("net_spend"), decimals)),
    ]
    return f"{channel.get('state') or '-'}: " + ", ".join(f"{name} {value}" for name, value in parts)


def _amount(amount: Any, decimals: Any) -> str:
    if amount is None:
        return "-"
    try:
        return format_units(int(amount), int(decimals)) if decimals is not None else str(amount)
    except (TypeError, ValueError):
        return str(amount)


def _when(timestamp: Any) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: int) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60}s"
    return f"{seconds}s"
