"""Loopback servers for the storage tests: a real S3-compatible server (moto) and a plain HTTP file server.

``S3Server`` runs moto's S3 implementation in a thread on 127.0.0.1 and also answers the two URL
shapes of Supabase Storage in front of it: the S3 endpoint under ``/storage/v1/s3`` and public object
URLs ``/storage/v1/object/public/{bucket}/{key}``, so the same server stands in for AWS S3, MinIO and a
Supabase project. ``MediaServer`` serves in-memory files with chosen content types and counts requests.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from pyarrow import fs as pafs
from werkzeug.serving import make_server

SUPABASE_S3_PATH = "/storage/v1/s3"
SUPABASE_PUBLIC_PATH = "/storage/v1/object/public"


class _SupabaseGateway:
    """WSGI middleware: maps Supabase Storage's paths onto moto's path-style S3 API."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app
        self.s3_app = create_backend_app("s3")  # moto's backends are process-global: same buckets
        self.paths: list[str] = []  # every request path, to check which endpoint clients used

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        self.paths.append(path)
        app = self.app
        for prefix in (SUPABASE_S3_PATH, SUPABASE_PUBLIC_PATH):
            if path.startswith(prefix + "/"):
                if prefix == SUPABASE_PUBLIC_PATH:
                    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
                        start_response("405 Method Not Allowed", [("Content-Length", "0")])
                        return [b""]
                    # Public objects are read without credentials, as anyone on the internet would.
                    environ.pop("HTTP_AUTHORIZATION", None)
                    app = self.s3_app  # an unsigned request names no service: go to moto's S3 directly
                environ["PATH_INFO"] = path[len(prefix) :]
                # moto parses the bucket and key from the raw request URI, so rewrite that too.
                for name in ("RAW_URI", "REQUEST_URI"):
                    if name in environ:
                        environ[name] = environ[name].replace(prefix, "", 1)
                break
        return app(environ, start_response)


class S3Server:
    """moto S3 on a free loopback port (like ``moto.server.ThreadedMotoServer``, plus the Supabase paths)."""

    def __init__(self) -> None:
        self.gateway = _SupabaseGateway(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", 0, self.gateway, threaded=True, request_handler=MotoRequestHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """``host:port`` for ``endpoint_override`` (scheme http)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL; as a ``SUPABASE_URL`` it makes ``{url}/storage/v1/s3`` the S3 endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class MediaServer:
    """Serves ``files[path] = (content_type, body)`` on 127.0.0.1 and counts GET requests per path.

    Paths in ``no_length`` are sent without Content-Length (the body ends when the connection closes),
    so only a limit enforced while reading can stop them.
    """

    def __init__(self) -> None:
        self.files: dict[str, tuple[str | None, bytes]] = {}
        self.no_length: set[str] = set()
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests[self.path] += 1
                entry = server.files.get(self.path)
                if entry is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                content_type, body = entry
                self.send_response(200)
                if content_type is not None:
                    self.send_header("Content-Type", content_type)
                if self.path not in server.no_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # The client may stop reading (size cap): expected.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def start(self) -> MediaServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def admin_fs(server: S3Server) -> pafs.S3FileSystem:
    """A filesystem on ``server`` with the tests' credentials, allowed to create buckets (test set-up)."""
    return pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        scheme="http",
        endpoint_override=server.endpoint,
        allow_bucket_creation=True,
    )
