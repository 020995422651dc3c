"""One bounded, SSRF-checked HTTP GET: every hop checked, connections only to checked addresses.

httpcore does the HTTP/1.1 work (h11 parsing, chunked bodies, TLS with the URL's host as server name and
certificate check). What it connects to is decided here: :class:`_PinnedBackend` opens TCP connections
only to the addresses :func:`storage.url_guard.check_target` approved for that host and port, so the
host is resolved once and DNS rebinding has nothing to swap. Redirects are followed by hand, each hop
parsed and checked like the first URL.

Every socket wait goes through a :class:`Budget`: non-blocking sockets polled in short slices, so a
total deadline (not a per-read timeout a trickling server can stretch forever) and a cancel event both
stop a download within a fraction of a second, whatever phase it is in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urljoin

import certifi
import httpcore

from .url_guard import (
    CANCELLED,
    FAILED,
    NOT_ALLOWED,
    TIMED_OUT,
    Allowlist,
    FetchProblem,
    IPAddress,
    Resolver,
    check_target,
    host_key,
    parse_url,
    redact_url,
)

MAX_REDIRECTS = 3
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
CONNECT_TIMEOUT_S = 10.0  # per address tried, within the total deadline
_POLL_S = 0.1  # how often a wait looks at the cancel events and the deadline


def default_ssl_context(env: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """Certificates and host names checked against certifi's CA bundle, or against ``$SSL_CERT_FILE`` /
    ``$SSL_CERT_DIR`` when set (an intranet CA), as httpx and OpenSSL tools read them."""
    env = os.environ if env is None else env
    cafile, capath = env.get("SSL_CERT_FILE") or None, env.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        cafile = certifi.where()
    return ssl.create_default_context(cafile=cafile, capath=capath)


class CancelSignal(Protocol):
    """What cancels a download: a ``threading.Event``, or anything else that says when it is set."""

    def is_set(self) -> bool: ...


class Budget:
    """The deadline of one download and the events that cancel it; every network wait asks it."""

    def __init__(self, timeout_s: float, cancel: Iterable[CancelSignal | None] = ()):
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.cancel = [event for event in cancel if event is not None]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise FetchProblem if the download was cancelled or its time is up."""
        if any(event.is_set() for event in self.cancel):
            raise FetchProblem(CANCELLED, "cancelled")
        if self.remaining() <= 0:
            raise FetchProblem(TIMED_OUT, f"no complete answer within {self.timeout_s:g} s")

    def wait(self, sock: socket.socket, *, write: bool, limit: float | None = None) -> bool:
        """Wait until ``sock`` is readable (writable); False when ``limit`` seconds passed first."""
        until = time.monotonic() + limit if limit is not None else None
        while True:
            self.check()
            step = min(_POLL_S, self.remaining())
            if until is not None:
                step = min(step, until - time.monotonic())
                if step <= 0:
                    return False
            if _ready(sock, write=write, timeout=step):
                return True

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.check()
            time.sleep(min(_POLL_S, left))


def _ready(sock: socket.socket, *, write: bool, timeout: float) -> bool:
    """Whether ``sock`` becomes readable (writable) within ``timeout`` s. poll, not select: a busy
    process (Ray, many connections) has descriptors above select's limit of 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class _BudgetStream(httpcore.NetworkStream):
    """A non-blocking socket (plain or TLS) whose every wait is bounded by the download's budget."""

    def __init__(self, sock: socket.socket, budget: Budget):
        self._sock = sock
        self._budget = budget

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        while True:
            try:
                return self._sock.recv(max_bytes)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._budget.wait(self._sock, write=False)
            except ssl.SSLWantWriteError:
                self._budget.wait(self._sock, write=True)
            except OSError as error:
                raise httpcore.ReadError(str(error)) from error

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            try:
                view = view[self._sock.send(view) :]
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._budget.wait(self._sock, write=True)
            except ssl.SSLWantReadError:
                self._budget.wait(self._sock, write=False)
            except OSError as error:
                raise httpcore.WriteError(str(error)) from error

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        try:
            tls = ssl_context.wrap_socket(
                self._sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as error:
            self._sock.close()
            raise httpcore.ConnectError(str(error)) from error
        tls_stream = _BudgetStream(tls, self._budget)
        try:
            while True:
                try:
                    tls.do_handshake()
                    return tls_stream
                except ssl.SSLWantReadError:
                    self._budget.wait(tls, write=False)
                except ssl.SSLWantWriteError:
                    self._budget.wait(tls, write=True)
        except OSError as error:  # includes certificate failures (ssl.SSLCertVerificationError)
            tls_stream.close()
            raise httpcore.ConnectError(str(error)) from error
        except BaseException:
            tls_stream.close()
            raise

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _ready(self._sock, write=False, timeout=0)
        return None


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects only to addresses pinned for a (host, port) after they were checked."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.pins: dict[tuple[str, int], tuple[IPAddress, ...]] = {}

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self.pins.get((host, port))
        if not addresses:
            raise FetchProblem(NOT_ALLOWED, f"connection to unchecked origin {host}:{port}")
        failures: list[str] = []
        for address in addresses:
            sock = socket.socket(
                socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM
            )
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                code = sock.connect_ex((str(address), port))
                if code in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                    if not self.budget.wait(sock, write=True, limit=CONNECT_TIMEOUT_S):
                        raise OSError(errno.ETIMEDOUT, "connect timed out")
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, errno.errorcode.get(code, str(code)))
                return _BudgetStream(sock, self.budget)
            except OSError as error:
                sock.close()
                failures.append(f"{address}: {error}")
            except BaseException:
                sock.close()
                raise
        raise FetchProblem(FAILED, f"could not connect to {host}:{port}: {'; '.join(failures)}")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise FetchProblem(NOT_ALLOWED, "unix sockets are never used for inputs")

    def sleep(self, seconds: float) -> None:
        self.budget.sleep(seconds)


@dataclass
class Answer:
    """The final (non-redirect) response of a download: its status, headers and body chunks."""

    url: str
    status: int
    headers: dict[str, str]
    body: Iterator[bytes]
    hops: int


@contextlib.contextmanager
def open_url(
    url: str,
    *,
    allow: Allowlist,
    resolve: Resolver,
    budget: Budget,
    ssl_context: ssl.SSLContext,
    user_agent: str = "hwgp-serve",
    max_redirects: int = MAX_REDIRECTS,
    method: str = "GET",
    content: bytes | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> Iterator[Answer]:
    """GET ``url`` (or send ``method`` with ``content``), following at most ``max_redirects``
    redirects, each hop parsed and checked.

    Raises :class:`FetchProblem` when a hop is refused, the budget runs out, or there are too many
    redirects; httpcore errors (connection, TLS, protocol) propagate for the caller to log and hide.
    """
    backend = _PinnedBackend(budget)
    with httpcore.ConnectionPool(
        ssl_context=ssl_context, network_backend=backend, max_connections=2, retries=0
    ) as pool:
        hop = 0
        while True:
            budget.check()
            checked = check_target(parse_url(url), allow, resolve, budget.remaining())
            target = checked.target
            backend.pins[(host_key(target.host), target.port)] = checked.addresses
            request_url = httpcore.URL(
                scheme=target.scheme, host=host_key(target.host), port=target.port, target=target.target
            )
            headers = [
                ("Host", target.host_header),
                ("User-Agent", user_agent),
                ("Accept", "*/*"),
                ("Accept-Encoding", "identity"),
                *(extra_headers or {}).items(),
            ]
            extensions = {"sni_hostname": host_key(target.host)}
            with pool.stream(
                method, request_url, headers=headers, content=content, extensions=extensions
            ) as response:
                answer_headers = {
                    name.decode("latin-1").lower(): value.decode("latin-1")
                    for name, value in response.headers
                }
                location = answer_headers.get("location")
                if response.status in REDIRECT_STATUSES and location:
                    if hop == max_redirects:
                        raise FetchProblem(
                            FAILED, f"more than {max_redirects} redirects (last {redact_url(url)})"
                        )
                    url = urljoin(url, location.strip())
                    hop += 1
                    continue
                yield Answer(url, response.status, answer_headers, response.iter_stream(), hop)
                return


__all__ = ["CONNECT_TIMEOUT_S", "MAX_REDIRECTS", "Answer", "Budget", "default_ssl_context", "open_url"]
