"""Session sets for the index's scaling and memory checks, shared by tests/test_sessions_index.py
(correctness at scale, memory budget) and bench/session_index.py (time to the first covering session at
10 vs 100k sessions, through `candidates` as `SessionManager.match` calls it)."""

from __future__ import annotations

import gc
import time
import tracemalloc

from eth_account import Account

from proxy.sessions.index import SessionIndex
from proxy.sessions.model import Session, StoredCookie, intern_siwx
from proxy.sessions.scope import NormalizedURL, Scope, ScopeKind
from proxy.tokens import SessionClaim, make_session_token

QUERY_ORIGINS = [f"https://q{i}.example.com" for i in range(5)]
# Each query walks 5 levels and finds its session at depth 1, in both indexes: the work per lookup
# is the same, only the number of sessions differs.
QUERIES = [f"{o}/api/v{j}/items/{k}/detail?x=1" for o in QUERY_ORIGINS for j in range(10) for k in range(10)]


def base_scopes() -> list[Scope]:
    # Two prefix paths per query origin: the query takes the dict walk (an origin with a single
    # path is answered by one comparison, which would flatter the small index), and one exact
    # scope so both indexes also take the exact-map probe (skipped when the map is empty).
    scopes = [Scope.from_url(f"{o}/api") for o in QUERY_ORIGINS]
    scopes += [Scope.from_url(f"{o}/other") for o in QUERY_ORIGINS[:4]]
    scopes.append(Scope.from_url(f"{QUERY_ORIGINS[4]}/other?x=1", "exact"))
    return scopes


def bulk_scopes(count: int) -> list[Scope]:
    # Spread over 1000 origins (including the query origins) and many paths and depths; none of
    # them sits on a query's walk, so the hit stays at depth 1.
    origins = QUERY_ORIGINS + [f"https://h{i}.example.org:{8000 + i % 7}" for i in range(995)]
    scopes = []
    for i in range(count):
        origin = origins[i % len(origins)]
        depth = 1 + i % 4
        path = "/".join(f"p{(i >> s) % 97}" for s in range(depth))
        kind: ScopeKind = "exact" if i % 10 == 0 else "prefix"
        scopes.append(Scope.from_url(f"{origin}/{path}/{i}" + ("?k=1" if kind == "exact" else ""), kind))
    return scopes


def build(scopes: list[Scope]) -> SessionIndex:
    index = SessionIndex()
    for n, scope in enumerate(scopes):
        index.add(scope, f"sid-{n}")
    return index


def time_candidates(index: SessionIndex) -> float:
    """ns per query to the first covering session, as production asks (`SessionManager.match` walks
    `candidates` until an active session; every session here is active, so the first one)."""
    start = time.perf_counter_ns()
    for url in QUERIES:
        next(index.candidates(url), None)
    return (time.perf_counter_ns() - start) / len(QUERIES)


def time_walk(index: SessionIndex, normalized: list[NormalizedURL]) -> float:
    """The same on URLs already normalized: the index walk alone."""
    start = time.perf_counter_ns()
    for n in normalized:
        next(index.candidates(n), None)
    return (time.perf_counter_ns() - start) / len(normalized)


def session_bytes(with_cookie_and_header: bool) -> float:
    account = Account.from_key("0x" + "11" * 32)
    tokens = []
    for i in range(2000):  # hosts are shared by all sessions on them: warm the host cache first
        template = Session.create(Scope.from_url(f"https://api{i}.example.com/v1/"), now=1_700_000_000.0)
        template.asset, template.network, template.amount_paid = "0x" + "1" * 40, "eip155:84532", 10_000
        template.pay_to = "0x" + "2" * 40
        claim = SessionClaim.for_session(template, address=account.address, tx_hash="0x" + f"{i:064x}")
        # Signed outside the measurement: eth-account's own caches are not session memory.
        tokens.append(make_session_token(claim, account))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = SessionIndex()
        sessions = []
        for i in range(2000):
            scope = Scope.from_url(f"https://api{i}.example.com/v1/")
            # Fresh string objects per session, as they come from a payment record or the store.
            session = Session.create(
                scope,
                now=1_700_000_000.0 + i,
                label="Premium API",
                asset="".join(["0x036CbD53842c5426634e7929541eC2318f3dCF7e"]),
                network="".join(["eip155:", "84532"]),
                decimals=6,
                pay_to="".join(["0x", "2" * 40]),
                payer="".join([account.address]),
            )
            session.record_payment(i, 10_000)
            session.credentials.siwx = intern_siwx(
                {
                    "domain": f"api{i}.example.com",
                    "uri": f"https://api{i}.example.com/v1/x",
                    "version": "1",
                    "chainId": "".join(["eip155:", "84532"]),
                    "type": "eip191",
                }
            )
            session.credentials.session_token = tokens[i]
            if with_cookie_and_header:
                session.credentials.cookies.append(StoredCookie("sid", "v" * 40, None, "/", None, True))
                session.credentials.token_headers["X-Api-Key"] = "k" * 40
            sessions.append(session)
            index.add(scope, session.id)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / len(sessions)
