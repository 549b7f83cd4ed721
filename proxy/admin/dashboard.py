"""The dashboard at /ui: static files shipped in the package, served with a strict CSP.

The page and its script carry no data and no secret, so they are served without the bearer token;
every call the page makes to the admin API sends the token the person typed (kept in the tab's
sessionStorage, never in a URL or a cookie). The CSP allows only this origin's own script, style and
API (`connect-src 'self'`), no inline code, no framing; the REST guard already refuses other origins.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

UI_PREFIX = "/ui"
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def is_dashboard_path(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def _read(name: str) -> bytes:
    return resources.files("proxy.admin").joinpath("ui", name).read_bytes()


async def serve(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name") or "index.html"
    if name not in _FILES:
        raise web.HTTPNotFound()
    return web.Response(
        body=_read(name), content_type=None, headers={"Content-Type": _FILES[name], **SECURITY_HEADERS}
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get(UI_PREFIX, serve, allow_head=False),
        web.get(UI_PREFIX + "/", serve, allow_head=False),
        web.get(UI_PREFIX + "/{name}", serve, allow_head=False),
    ]
