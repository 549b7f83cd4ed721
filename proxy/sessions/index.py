"""Which session covers a URL, in time independent of how many sessions exist.

Layout::

    _exact:   {scope.key ("exact https://h/p?q"): ids}
    _origins: {(scheme, host, port): {scope path ("/v1", "/v1/"): ids}}
    _scopes:  {session id: Scope}            (reverse map, for remove)

``ids`` is a bare ``str`` for the common single-session scope and a tuple (oldest first) when
several sessions share a scope. Keys and ids are the caller's own strings (``scope.key``,
``scope.path``, ``session.id``), so the index adds dict slots, not copies.

Lookup for a normalised path ``/a/b/c`` probes, most specific first, the keys ``/a/b/c``,
``/a/b/``, ``/a/b``, ``/a/``, ``/a``, ``/``: every prefix scope that can cover the path is one of
these (a scope path ending in "/" covers what lies strictly below it; one without covers itself
and what lies below; segments only ever split at a literal "/"). That is O(depth) dict probes,
whatever the number of sessions. Keying by the path string rather than by a tuple of segments is
the same thing with fewer allocations.

Order of preference: an exact scope beats any prefix scope; a longer prefix beats a shorter one
(``/v1/`` beats ``/v1``: it covers a subset); among sessions with the same scope the one added
last wins. Several sessions may share a scope - typically a renewed session next to the one it
replaces, or a session started explicitly on a scope an automatic one already has - and the
index keeps them all: ``lookup`` returns the newest, ``candidates`` yields every covering session
in preference order so the caller can skip ones it finds expired or ended (and remove them).
The index knows nothing about time: liveness is the caller's check. Re-adding an id moves it to
newest; when loading from the store, add sessions in ``created_at`` order.
"""

from __future__ import annotations

from collections.abc import Iterator

from proxy.sessions.scope import NormalizedURL, Scope, ScopeError, normalize_url

_Ids = str | tuple[str, ...]


def _with(ids: _Ids | None, session_id: str) -> _Ids:
    if ids is None:
        return session_id
    if isinstance(ids, str):
        return (ids, session_id)
    return (*ids, session_id)


def _without(ids: _Ids, session_id: str) -> _Ids | None:
    if isinstance(ids, str):
        return None if ids == session_id else ids
    rest = tuple(i for i in ids if i != session_id)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _newest_first(ids: _Ids) -> Iterator[str]:
    if isinstance(ids, str):
        yield ids
    else:
        yield from reversed(ids)


class SessionIndex:
    __slots__ = ("_exact", "_origins", "_scopes")

    def __init__(self) -> None:
        self._exact: dict[str, _Ids] = {}
        self._origins: dict[tuple[str, str, int], dict[str, _Ids]] = {}
        self._scopes: dict[str, Scope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._scopes

    def scope_of(self, session_id: str) -> Scope | None:
        return self._scopes.get(session_id)

    def add(self, scope: Scope, session_id: str) -> None:
        """Index a session; if the id is already present it is moved (to ``scope``, as newest)."""
        if session_id in self._scopes:
            self.remove(session_id)
        if scope.kind == "exact":
            self._exact[scope.key] = _with(self._exact.get(scope.key), session_id)
        else:
            paths = self._origins.get(scope.origin)
            if paths is None:
                paths = self._origins[scope.origin] = {}
            paths[scope.path] = _with(paths.get(scope.path), session_id)
        self._scopes[session_id] = scope

    def remove(self, session_id: str) -> bool:
        scope = self._scopes.pop(session_id, None)
        if scope is None:
            return False
        if scope.kind == "exact":
            rest = _without(self._exact[scope.key], session_id)
            if rest is None:
                del self._exact[scope.key]
            else:
                self._exact[scope.key] = rest
        else:
            paths = self._origins[scope.origin]
            rest = _without(paths[scope.path], session_id)
            if rest is not None:
                paths[scope.path] = rest
            else:
                del paths[scope.path]
                if not paths:
                    del self._origins[scope.origin]
        return True

    def lookup(self, url: str | NormalizedURL) -> str | None:
        """The preferred session id for ``url`` (see module doc), or None. Bad URL -> None."""
        return next(self.candidates(url), None)

    def candidates(self, url: str | NormalizedURL) -> Iterator[str]:
        """Every session whose scope covers ``url``, most preferred first."""
        if isinstance(url, NormalizedURL):
            n = url
        else:
            try:
                n = normalize_url(url)
            except ScopeError:
                return
        if self._exact:
            ids = self._exact.get(f"exact {n.to_url()}")
            if ids is not None:
                yield from _newest_first(ids)
        paths = self._origins.get((n.scheme, n.host, n.port))
        if paths is None:
            return
        for key in _prefix_keys(n.path):
            ids = paths.get(key)
            if ids is not None:
                yield from _newest_first(ids)


def _prefix_keys(path: str) -> Iterator[str]:
    """Scope paths that could cover ``path``, longest first (see the module doc)."""
    # A non-slash key that ends in "/" (empty segment, "/a//b") is really the slash key the
    # next step yields anyway: skipped, so no id is yielded twice.
    yield path
    end = len(path)
    if path.endswith("/"):
        end -= 1
        if end > 0 and path[end - 1] != "/":
            yield path[:end]  # "/a/b/" is also covered by the non-slash scope "/a/b"
    while end > 0:
        end = path.rfind("/", 0, end)
        yield path[: end + 1]  # slash scope: covers everything strictly below
        if end > 0 and path[end - 1] != "/":
            yield path[:end]  # non-slash scope: covers itself and below
