"""Which URLs the service may fetch: http(s) to public addresses, or to hosts the operator allowlisted.

Nothing here sends traffic. The pieces, in the order a download uses them:

* :func:`parse_url` splits a URL into scheme, host, port and request target, refusing what is ambiguous
  (credentials in the URL, zone ids, hosts that are neither a DNS name nor an address). Numeric IPv4
  hosts are read the way libc's ``inet_aton`` reads them (``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
  ``127.1`` are all 127.0.0.1), so no spelling of an address slips past the check under a disguise.
* :func:`address_problem` says why an address must not be contacted (loopback, private, link-local, CGNAT,
  reserved, multicast, documentation, ...), or None for a public address. IPv6 forms that carry an IPv4
  address (mapped, compatible, NAT64, 6to4, Teredo) are judged by the address they carry.
* :func:`check_target` resolves the host once and requires every address to be public unless the host is
  on the allowlist (``host`` or ``host:port`` entries, see :func:`parse_allowlist`). The download then
  connects to exactly those addresses, so a second DNS answer cannot swap in an internal one.

Refusals raise :class:`FetchProblem`: ``public`` is the generic sentence users see, ``detail`` is for logs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_ENV = "HWGP_INPUT_URL_ALLOW"

# What a user is told. Deliberately coarse: a refused connection, a protocol error and an HTTP status all
# read "the download failed", so error messages cannot be used to map what answers where.
NOT_ALLOWED = "the address is not allowed"
TIMED_OUT = "the server did not answer in time"
FAILED = "the download failed"
CANCELLED = "the download was cancelled"


class FetchProblem(Exception):
    """A URL that must not or could not be fetched. ``public`` is safe to show; ``detail`` goes to logs."""

    def __init__(self, public: str, detail: str):
        super().__init__(f"{public} ({detail})")
        self.public = public
        self.detail = detail


# --- the address classifier ------------------------------------------------------------------------------

_V4_SPECIAL: list[tuple[ipaddress.IPv4Network, str]] = [
    (ipaddress.IPv4Network("0.0.0.0/8"), "unspecified ('this network', 0.0.0.0/8)"),
    (ipaddress.IPv4Network("10.0.0.0/8"), "private (10.0.0.0/8)"),
    (ipaddress.IPv4Network("100.64.0.0/10"), "shared address space / CGNAT (100.64.0.0/10)"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (ipaddress.IPv4Network("172.16.0.0/12"), "private (172.16.0.0/12)"),
    (ipaddress.IPv4Network("192.0.0.0/24"), "IETF protocol assignments (192.0.0.0/24)"),
    (ipaddress.IPv4Network("192.0.2.0/24"), "documentation (192.0.2.0/24)"),
    (ipaddress.IPv4Network("192.88.99.0/24"), "6to4 relay anycast (192.88.99.0/24)"),
    (ipaddress.IPv4Network("192.168.0.0/16"), "private (192.168.0.0/16)"),
    (ipaddress.IPv4Network("198.18.0.0/15"), "benchmarking (198.18.0.0/15)"),
    (ipaddress.IPv4Network("198.51.100.0/24"), "documentation (198.51.100.0/24)"),
    (ipaddress.IPv4Network("203.0.113.0/24"), "documentation (203.0.113.0/24)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved / broadcast (240.0.0.0/4)"),
]

_V6_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V6_COMPATIBLE = ipaddress.IPv6Network("::/96")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_SPECIAL: list[tuple[ipaddress.IPv6Network, str]] = [
    (ipaddress.IPv6Network("64:ff9b:1::/48"), "local-use NAT64 (64:ff9b:1::/48)"),
    (ipaddress.IPv6Network("100::/64"), "discard-only (100::/64)"),
    (ipaddress.IPv6Network("2001:2::/48"), "benchmarking (2001:2::/48)"),
    (ipaddress.IPv6Network("2001:db8::/32"), "documentation (2001:db8::/32)"),
    (ipaddress.IPv6Network("2001::/23"), "IETF protocol assignments (2001::/23)"),
    (ipaddress.IPv6Network("3fff::/20"), "documentation (3fff::/20)"),
    (ipaddress.IPv6Network("fc00::/7"), "unique local / private (fc00::/7)"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local (fe80::/10)"),
    (ipaddress.IPv6Network("fec0::/10"), "site-local (fec0::/10)"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast (ff00::/8)"),
]


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` must not be contacted, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_problem(address)
    if address.scope_id:
        return "IPv6 address with a zone id"
    if address == ipaddress.IPv6Address("::"):
        return "unspecified (::)"
    if address == ipaddress.IPv6Address("::1"):
        return "loopback (::1)"
    # Forms that carry an IPv4 address. Mapped and compatible ones reach the IPv4 address itself through a
    # dual-stack socket and never come from a real AAAA record: refused whatever they carry.
    if address in _V6_MAPPED:
        return f"IPv4-mapped IPv6 address (of {address.ipv4_mapped})"
    if address in _V6_COMPATIBLE:
        return f"IPv4-compatible IPv6 address (of {ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)})"
    # NAT64, 6to4 and Teredo are real routes to an IPv4 host: judged by the host they lead to.
    if address in _V6_NAT64:
        return _embedded_problem("NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        return _embedded_problem("6to4", address.sixtofour)
    if address.teredo is not None:
        server, client = address.teredo
        return _embedded_problem("Teredo server", server) or _embedded_problem("Teredo client", client)
    for network, name in _V6_SPECIAL:
        if address in network:
            return name
    if address not in _V6_GLOBAL_UNICAST:
        return "reserved (outside the global unicast range 2000::/3)"
    if not address.is_global:  # a safety net for ranges IANA adds later (Python's registry)
        return "special-purpose (not globally routable)"
    return None


def _ipv4_problem(address: ipaddress.IPv4Address) -> str | None:
    for network, name in _V4_SPECIAL:
        if address in network:
            return name
    if not address.is_global:  # a safety net for ranges IANA adds later (Python's registry)
        return "special-purpose (not globally routable)"
    return None


def _embedded_problem(form: str, embedded: ipaddress.IPv4Address) -> str | None:
    problem = _ipv4_problem(embedded)
    return f"{form} address embedding {embedded}: {problem}" if problem else None


# --- host parsing --------------------------------------------------------------------------------------------

_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_NUMERIC_LABEL = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")
_DNS_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address libc's ``inet_aton`` reads from ``text``, or None where it reads none.

    One to four dot-separated parts, each decimal, octal (leading ``0``) or hex (``0x``); the last part
    fills the remaining bytes: ``a`` (32 bits), ``a.b`` (8.24), ``a.b.c`` (8.8.16), ``a.b.c.d``.
    Unlike glibc, trailing whitespace and what follows it are not ignored.
    """
    parts = text.split(".")
    if len(parts) > 4:
        return None
    values: list[int] = []
    for part in parts:
        if not _INET_ATON_PART.fullmatch(part):
            return None
        if part[:2] in ("0x", "0X"):
            value = int(part[2:], 16)
        elif part.startswith("0"):
            value = int(part, 8)
        else:
            value = int(part)
        if value > 0xFFFFFFFF:
            return None
        values.append(value)
    *leading, last = values
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    number = last
    for i, value in enumerate(leading):
        number += value << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def parse_host(host: str) -> IPAddress | str:
    """An address, or a lowercased DNS name without a trailing dot; raises FetchProblem for anything else.

    ``host`` is a URL's host without brackets. A name whose last label is numeric must be an IPv4
    address (as browsers read URLs): ``1.2.3.4.5`` or ``0x1g`` are refused rather than handed to a
    resolver that might read them some other way.
    """
    if not host:
        raise _invalid("the URL has no host")
    if ":" in host:
        if "%" in host:
            raise _invalid("IPv6 zone ids are not allowed in URLs")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise _invalid(f"{host!r} is not a valid IPv6 address") from None
    name = host[:-1] if host.endswith(".") else host
    address = inet_aton(name)
    if address is not None:
        return address
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _invalid(f"{host!r} is not a valid host name") from None
    name = name.lower()
    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise _invalid(f"{host!r} is not a valid IPv4 address")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise _invalid(f"{host!r} is not a valid host name")
    return name


def host_key(host: IPAddress | str) -> str:
    """How a parsed host is written in the allowlist and in logs: ``127.0.0.1``, ``::1``, ``example.com``."""
    return str(host)


@dataclass(frozen=True)
class Target:
    """A parsed http(s) URL: what to connect to and what to ask for."""

    url: str
    scheme: str
    host: IPAddress | str
    port: int
    target: str  # path and query, as sent on the request line

    @property
    def host_header(self) -> str:
        """The Host header (and TLS server name, without the port): the URL's host, canonical."""
        host = f"[{self.host}]" if isinstance(self.host, ipaddress.IPv6Address) else str(self.host)
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """Split an http(s) URL; raises FetchProblem (public message: what is wrong with it) when refused."""
    if not isinstance(url, str) or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise _invalid("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise _invalid(f"not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchProblem(NOT_ALLOWED, f"scheme {scheme!r} is not http(s)")
    if "@" in parts.netloc:
        raise _invalid("URLs with credentials (user@host) are not allowed")
    if "\\" in parts.netloc:
        raise _invalid("the URL's host contains a backslash")
    if port == 0:
        raise _invalid("port 0 is not a valid port")
    host = parse_host(parts.hostname or "")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, scheme, host, port or (443 if scheme == "https" else 80), target)


def redact_url(url: str) -> str:
    """``url`` without its query, fragment and credentials, for logs (presigned URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparsable URL>"
    return f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else "")


def _invalid(problem: str) -> FetchProblem:
    # Only about the text the user sent, so the specific problem is safe to show.
    return FetchProblem(problem, problem)


# --- the allowlist ---------------------------------------------------------------------------------------------

Allowlist = frozenset[tuple[str, int | None]]


def parse_allowlist(entries: Iterable[str]) -> Allowlist:
    """``["cdn.internal", "127.0.0.1:9000", "[::1]:8080"]`` → {(host, port or None)}; ValueError if malformed."""
    allowed: set[tuple[str, int | None]] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        host, port = entry, None
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"allowlist entry {raw!r} is not host, host:port or [ipv6]:port")
                port = _allow_port(rest[1:], raw)
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
            port = _allow_port(port_text, raw)
        try:
            parsed = parse_host(host)
        except FetchProblem as problem:
            raise ValueError(f"allowlist entry {raw!r}: {problem.public}") from None
        allowed.add((host_key(parsed), port))
    return frozenset(allowed)


def _allow_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"allowlist entry {entry!r} has an invalid port {text!r}")
    return int(text)


def allowlist_from(
    configured: Iterable[str] | None, env: Mapping[str, str], variable: str = ALLOW_ENV
) -> Allowlist:
    """``$variable`` (default ``$HWGP_INPUT_URL_ALLOW``; comma-separated; when set, even empty, it wins)
    or the configured list."""
    if variable in env:
        try:
            return parse_allowlist(env[variable].split(","))
        except ValueError as error:
            raise ValueError(f"{variable}: {error}") from None
    return parse_allowlist(configured or ())


def is_allowlisted(target: Target, allow: Allowlist) -> bool:
    key = host_key(target.host)
    return (key, None) in allow or (key, target.port) in allow


# --- resolving and checking -------------------------------------------------------------------------------------

Resolver = Callable[[str, int, float], list[IPAddress]]


class SystemResolver:
    """``getaddrinfo`` on its own executor, so a hung DNS lookup costs a wait, not the caller's thread.

    ``getaddrinfo`` cannot be interrupted; the wait on it is bounded by ``timeout`` (the lookup itself
    holds an executor thread until the system resolver gives up). Call it (blocking) or await
    :meth:`aresolve` (from an event loop).
    """

    def __init__(self, executor: Executor):
        self.executor = executor

    def __call__(self, host: str, port: int, timeout: float) -> list[IPAddress]:
        future = self._lookup(host, port)
        try:
            return _addresses(future.result(timeout=max(timeout, 0.0)))
        except FutureTimeout:
            future.cancel()
            raise _slow_lookup(host, timeout) from None
        except OSError as error:
            raise _failed_lookup(host, error) from None

    async def aresolve(self, host: str, port: int, timeout: float) -> list[IPAddress]:
        future = self._lookup(host, port)
        try:
            return _addresses(await asyncio.wait_for(asyncio.wrap_future(future), max(timeout, 0.0)))
        except TimeoutError:
            raise _slow_lookup(host, timeout) from None
        except OSError as error:
            raise _failed_lookup(host, error) from None

    def _lookup(self, host: str, port: int) -> Future[list[Any]]:
        return self.executor.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def _addresses(infos: list[Any]) -> list[IPAddress]:
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _slow_lookup(host: str, timeout: float) -> FetchProblem:
    return FetchProblem(TIMED_OUT, f"resolving {host} took more than {timeout:.1f} s")


def _failed_lookup(host: str, error: OSError) -> FetchProblem:
    # Same words as a refused address: whether an internal name exists is not for users to learn.
    return FetchProblem(NOT_ALLOWED, f"resolving {host} failed: {error}")


@dataclass(frozen=True)
class CheckedTarget:
    """A target whose addresses were resolved once and checked: connect to these and no others."""

    target: Target
    addresses: tuple[IPAddress, ...]
    allowlisted: bool


def check_target(target: Target, allow: Allowlist, resolve: Resolver, timeout: float) -> CheckedTarget:
    """Resolve ``target``'s host once and require every address to be public (unless allowlisted)."""
    addresses = resolve(target.host, target.port, timeout) if isinstance(target.host, str) else [target.host]
    return check_addresses(target, addresses, allow)


async def check_target_async(
    target: Target, allow: Allowlist, resolver: SystemResolver, timeout: float
) -> CheckedTarget:
    """:func:`check_target` for an event loop: the DNS wait does not hold a thread."""
    if isinstance(target.host, str):
        addresses = await resolver.aresolve(target.host, target.port, timeout)
    else:
        addresses = [target.host]
    return check_addresses(target, addresses, allow)


def check_addresses(target: Target, addresses: list[IPAddress], allow: Allowlist) -> CheckedTarget:
    """Require every address ``target``'s host resolved to be public, unless the host is allowlisted."""
    if not addresses:
        raise FetchProblem(NOT_ALLOWED, f"{host_key(target.host)} resolved to no address")
    allowlisted = is_allowlisted(target, allow)
    if not allowlisted:
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                raise FetchProblem(NOT_ALLOWED, f"{host_key(target.host)} is {address}: {problem}")
    return CheckedTarget(target, tuple(addresses), allowlisted)


__all__ = [
    "ALLOW_ENV",
    "CANCELLED",
    "FAILED",
    "NOT_ALLOWED",
    "TIMED_OUT",
    "Allowlist",
    "CheckedTarget",
    "FetchProblem",
    "IPAddress",
    "Resolver",
    "Target",
    "address_problem",
    "allowlist_from",
    "check_target",
    "host_key",
    "inet_aton",
    "is_allowlisted",
    "parse_allowlist",
    "parse_host",
    "parse_url",
    "redact_url",
    "SystemResolver",
    "check_addresses",
    "check_target_async",
]
