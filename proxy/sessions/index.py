"""Which session covers a URL, in time independent of how many sessions exist.

Layout::

    _exact:   {NormalizedURL of the exact scope: ids}    (a request's own NormalizedURL is the key)
    _origins: {(scheme, host, port): {directory: ids | _Dir}  or  (scope path, ids)}
    _scopes:  {session id: Scope}                        (reverse map, for remove)

A prefix scope is filed under its *directory*: its path without a trailing "/" (``/v1`` and
``/v1/`` are both filed under ``"/v1"``, ``/`` under ``""``). The value is the ids of the plain
scope (``/v1``), or a ``_Dir`` holding both the plain and the slash (``/v1/``) scope's ids when a
slash scope exists there. ``ids`` is a bare ``str`` for the usual single session and a tuple
(oldest first) when several sessions share a scope. An origin with only one prefix path holds a
``(path, ids)`` pair instead of a dict (a dict costs ~200 bytes: with sessions spread over many
origins that doubled the index's share of a session). Plain scopes are filed under their own
``scope.path`` string and ids are the caller's ``session.id``: the index adds slots, not copies.

Lookup, for a normalised request path such as ``/a/b/c``: every prefix scope that can cover it is
filed under one of ``"/a/b/c"`` (plain only: ``/a/b/c/`` covers what lies strictly below),
``"/a/b"``, ``"/a"``, ``""`` (plain and slash): segments only ever split at a literal "/". So one
dict probe per path level, O(depth), whatever the number of sessions.

Order of preference: an exact scope beats any prefix scope; a longer prefix beats a shorter one
(``/v1/`` beats ``/v1``: it covers a subset); among sessions with the same scope the one added
last wins. Several sessions may share a scope - typically a renewed session next to the one it
replaces, or a session started explicitly on a scope an automatic one already has - and the
index keeps them all: ``lookup`` returns the newest, ``candidates`` yields every covering session
in preference order so the caller can skip ones it finds expired or ended (and remove them).
The index knows nothing about time: liveness is the caller's check. Re-adding an id moves it to
newest; when loading from the store, add sessions in ``created_at`` order.

``generation`` changes whenever an add or remove changes what some URL resolves to. A caller may
memoise a URL's answer and reuse it while the generation is unchanged (the session stage does, so
a request in a known scope skips the walk).
"""

from __future__ import annotations

from collections.abc import Iterator

from proxy.sessions.scope import NormalizedURL, Scope, ScopeError, normalize_url, path_covers

_Ids = str | tuple[str, ...]


class _Dir:
    """Both scopes filed under one directory: ``plain`` (``/v1``) and ``slash`` (``/v1/``)."""

    __slots__ = ("plain", "slash")

    def __init__(self, plain: _Ids | None, slash: _Ids | None) -> None:
        self.plain = plain
        self.slash = slash


_Entry = _Ids | _Dir
_Paths = dict[str, _Entry] | tuple[str, _Ids]


def _with(ids: _Ids | None, session_id: str) -> _Ids:
    if ids is None:
        return session_id
    if isinstance(ids, str):
        return (ids, session_id)
    return (*ids, session_id)


def _without(ids: _Ids | None, session_id: str) -> _Ids | None:
    if ids is None or isinstance(ids, str):
        return None if ids == session_id else ids
    rest = tuple(i for i in ids if i != session_id)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _newest(ids: _Ids) -> str:
    return ids if isinstance(ids, str) else ids[-1]


def _newest_first(ids: _Ids | None) -> Iterator[str]:
    if ids is None:
        return
    if isinstance(ids, str):
        yield ids
    else:
        yield from reversed(ids)


def _directory(path: str) -> tuple[str, bool]:
    """Scope path -> (directory key, is a slash scope)."""
    return (path[:-1], True) if path.endswith("/") else (path, False)


def _entry_with(entry: _Entry | None, slash: bool, session_id: str) -> _Entry:
    if isinstance(entry, _Dir):
        if slash:
            entry.slash = _with(entry.slash, session_id)
        else:
            entry.plain = _with(entry.plain, session_id)
        return entry
    if slash:
        return _Dir(entry, session_id)
    return _with(entry, session_id)


def _entry_without(entry: _Entry, slash: bool, session_id: str) -> _Entry | None:
    if not isinstance(entry, _Dir):
        return entry if slash else _without(entry, session_id)
    if slash:
        entry.slash = _without(entry.slash, session_id)
    else:
        entry.plain = _without(entry.plain, session_id)
    if entry.slash is None:
        return entry.plain  # back to the compact form (None if both are gone)
    return entry


class SessionIndex:
    __slots__ = ("_exact", "_origins", "_scopes", "generation")

    def __init__(self) -> None:
        self.generation = 0
        self._exact: dict[NormalizedURL, _Ids] = {}
        self._origins: dict[tuple[str, str, int], _Paths] = {}
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
        self.generation += 1
        self._scopes[session_id] = scope
        if scope.kind == "exact":
            key = scope.normalized()
            self._exact[key] = _with(self._exact.get(key), session_id)
            return
        current = self._origins.get(scope.origin)
        if current is None:
            self._origins[scope.origin] = (scope.path, session_id)
            return
        if isinstance(current, tuple):
            path, ids = current
            if path == scope.path:
                self._origins[scope.origin] = (path, _with(ids, session_id))
                return
            directory, slash = _directory(path)
            current = self._origins[scope.origin] = {directory: _Dir(None, ids) if slash else ids}
        directory, slash = _directory(scope.path)
        current[directory] = _entry_with(current.get(directory), slash, session_id)

    def remove(self, session_id: str) -> bool:
        scope = self._scopes.pop(session_id, None)
        if scope is None:
            return False
        self.generation += 1
        if scope.kind == "exact":
            key = scope.normalized()
            rest = _without(self._exact[key], session_id)
            if rest is None:
                del self._exact[key]
            else:
                self._exact[key] = rest
            return True
        current = self._origins[scope.origin]
        if isinstance(current, tuple):
            rest = _without(current[1], session_id)
            if rest is None:
                del self._origins[scope.origin]
            else:
                self._origins[scope.origin] = (current[0], rest)
            return True
        directory, slash = _directory(scope.path)
        entry = _entry_without(current[directory], slash, session_id)
        if entry is None:
            del current[directory]
        else:
            current[directory] = entry
        if not current:
            del self._origins[scope.origin]
        return True

    def lookup(self, url: str | NormalizedURL) -> str | None:
        """The preferred session id for ``url`` (see module doc), or None. Bad URL -> None."""
        if isinstance(url, NormalizedURL):
            n = url
        else:
            try:
                n = normalize_url(url)
            except ScopeError:
                return None
        # The same walk as ``candidates``, unrolled: this runs on every proxied request.
        if self._exact:
            ids = self._exact.get(n)
            if ids is not None:
                return _newest(ids)
        current = self._origins.get((n.scheme, n.host, n.port))
        if current is None:
            return None
        path = n.path
        if isinstance(current, tuple):
            return _newest(current[1]) if path_covers(current[0], path) else None
        end = len(path)
        if path[-1] != "/":  # the path itself: only a plain scope can cover it there
            entry = current.get(path)
            if entry is not None:
                plain = entry.plain if isinstance(entry, _Dir) else entry
                if plain is not None:
                    return _newest(plain)
        while end > 0:
            end = path.rfind("/", 0, end)
            entry = current.get(path[:end])
            if entry is not None:
                if not isinstance(entry, _Dir):
                    return _newest(entry)
                found = entry.slash or entry.plain
                if found is not None:
                    return _newest(found)
        return None

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
            yield from _newest_first(self._exact.get(n))
        current = self._origins.get((n.scheme, n.host, n.port))
        if current is None:
            return
        path = n.path
        if isinstance(current, tuple):
            if path_covers(current[0], path):
                yield from _newest_first(current[1])
            return
        end = len(path)
        if path[-1] != "/":
            entry = current.get(path)
            yield from _newest_first(entry.plain if isinstance(entry, _Dir) else entry)
        while end > 0:
            end = path.rfind("/", 0, end)
            entry = current.get(path[:end])
            if isinstance(entry, _Dir):
                yield from _newest_first(entry.slash)  # "/a/" is more specific than "/a"
                yield from _newest_first(entry.plain)
            else:
                yield from _newest_first(entry)
