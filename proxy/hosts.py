"""The one canonical form of a host, for every decision the proxy makes about one.

The policy (``host_allow``/``host_deny``), the per-host budgets and the ledger, session scopes, the
front door and the access log all compare hosts in this form, never as the text a client wrote:

- a name: lower-case ASCII; a non-ASCII name mapped with UTS #46 and IDNA-encoded (``bücher.example``
  is ``xn--bcher-kva.example``); one trailing dot removed;
- IPv4: the dotted quad without leading zeros (``127.0.0.6``). Nothing else is accepted as IPv4:
  ``2130706438``, ``0x7f000006``, ``127.6``, ``0177.0.0.6``, ``127.0.0.06`` all reach 127.0.0.6 through
  the C library (and curl rewrites them), but Python clients send them as written, and a proxy that
  compared text would let each escape a deny list and open a budget of its own. They raise
  ``NonCanonicalHost``, which names the address meant (``canonical``); the front door refuses them
  with ``400 non_canonical_host``. So does any name whose last label is numeric (``1.2.3.4.5``,
  ``x.08``): WHATWG URL parsers read those as IPv4 too, or fail;
- IPv4-mapped IPv6 (``[::ffff:127.0.0.6]``, in any spelling): the kernel connects it over IPv4 to
  127.0.0.6, so it is one more spelling of that IPv4 address and is refused the same way
  (``canonical`` = ``127.0.0.6``). We do not rewrite it: the server would then read another Host
  than the client sent, and the leaf certificate we present inside a tunnel must name what the
  client wrote;
- other IPv6: compressed, lower-case (RFC 5952), bare here (``::1``); URLs bracket it. Zone ids are
  refused.

``canonical_host`` is strict (raises ``HostError``); ``normalize_host`` never raises and also takes
``host:port``: it is the key of the policy, the budgets, the ledger and the log.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

_HOST_ASCII_RE = re.compile(r"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$")
_NUMERIC_LABEL_RE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")


class HostError(ValueError):
    """Not a host we can put in canonical form."""


class NonCanonicalHost(HostError):
    """An IPv4 address written in another form than its dotted quad.

    ``canonical`` is the address it denotes (as the C library and WHATWG URL parsers read it), or
    None when it denotes none (``1.2.3.4.5``).
    """

    def __init__(self, written: str, canonical: str | None) -> None:
        if canonical is None:
            message = (
                f"host {written[:100]!r} ends in a number but is not an IPv4 address in dotted-quad form"
            )
        else:
            message = (
                f"host {written[:100]!r} is {canonical} written in a non-canonical form; write {canonical}"
            )
        super().__init__(message)
        self.written = written
        self.canonical = canonical


@functools.lru_cache(maxsize=4096)
def canonical_host(text: str) -> str:
    """The canonical form of a bare host (IPv6 with or without brackets, never a port).

    Raises ``NonCanonicalHost`` for another spelling of an IPv4 address, ``HostError`` for anything
    else that is not a host. Cached: hosts repeat constantly and UTS #46 mapping is slow.
    """
    if not text:
        raise HostError("empty host")
    if text.startswith("[") or ":" in text:
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        return _ipv6(inner, text)
    if text.isascii():
        host = text.lower()
    else:
        try:
            # UTS #46 maps case, width and the ideographic full stop ("。" -> "."), so the result is
            # the name DNS would actually be asked for.
            host = idna.encode(text, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise HostError(f"bad internationalised host: {exc}") from None
    if host.endswith("."):
        host = host[:-1]
    if not _HOST_ASCII_RE.match(host):
        raise HostError(f"bad host {text[:100]!r}")
    if _NUMERIC_LABEL_RE.match(host.rsplit(".", 1)[-1]):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            meant = ipv4_meaning(host)
            raise NonCanonicalHost(text, None if meant is None else str(meant)) from None
    return host


def _ipv6(inner: str, written: str) -> str:
    if "%" in inner:
        raise HostError("IPv6 zone ids are not supported")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        raise HostError(f"bad IPv6 literal {written[:100]!r}") from None
    if address.ipv4_mapped is not None:
        raise NonCanonicalHost(written, str(address.ipv4_mapped))
    return address.compressed


def ipv4_meaning(text: str) -> ipaddress.IPv4Address | None:
    """The address a host in one of the legacy IPv4 notations denotes (WHATWG URL's IPv4 parser,
    which is also what inet_aton(3) accepts): 1 to 4 parts, each decimal, 0x-hex or 0-octal, the last
    filling the remaining bytes. None if it is not one."""
    parts = text.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4:
        return None
    numbers: list[int] = []
    for part in parts:
        number = _ipv4_part(part)
        if number is None:
            return None
        numbers.append(number)
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _ipv4_part(part: str) -> int | None:
    base = 10
    digits = part
    if part[:2] in ("0x", "0X"):
        base, digits = 16, part[2:]
        if digits == "":
            return 0
    elif len(part) > 1 and part[0] == "0":
        base, digits = 8, part[1:]
    if digits == "" or not digits.isascii():
        return None
    try:
        return int(digits, base)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def normalize_host(text: str) -> str:
    """The host's key for the policy, the budgets, the ledger and the log. Never raises.

    Takes ``host``, ``host:port`` or ``[v6]:port`` ("[::1]:8080" -> "::1", "API.x.com.:443" ->
    "api.x.com"). A non-canonical IPv4 spelling gives the address it denotes ("127.6" ->
    "127.0.0.6"), so a deny list matches it even where nothing refused it; text that is no host at
    all is lower-cased with trailing dots removed.
    """
    host = text.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end != -1 else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        return canonical_host(host)
    except NonCanonicalHost as exc:
        if exc.canonical is not None:
            return exc.canonical
    except HostError:
        pass
    return host.lower().rstrip(".")


def normalize_host_pattern(pattern: str) -> str:
    """A ``host_allow``/``host_deny`` entry: a literal host in canonical form (so ``[::1]``, ``::1``
    and ``0:0::1`` are one entry, and ``Bücher.example`` is its ``xn--`` form), a glob (``*`` or ``?``)
    lower-cased and matched against canonical hosts."""
    text = pattern.strip()
    if "*" in text or "?" in text:
        return text.lower()
    return normalize_host(text)
