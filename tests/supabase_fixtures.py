"""Supabase test fixtures: a fresh database set up as Supabase sets one up, and the edge functions under Deno.

`supabase_db` creates a database per test session with Supabase's roles (`anon`, `authenticated`,
`service_role`), its `auth` schema and `auth.uid()` (reading `request.jwt.claims`), exactly as
Supabase defines them (`db/supabase/supabase_roles.sql`), then applies our migrations (Postgres +
Supabase). `edge_functions` serves every function of `db/supabase/functions/` from one Deno process
on a loopback port (`tests/supabase_local.py`). Tests start each from an empty tasks table
(`clean_supabase`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import psycopg
import pytest
from supabase_local import EdgeFunctions, make_jwt, prepare_database, start_edge_functions

PG_URL = os.environ.get("HWGP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
JWT_SECRET = "test-jwt-secret-with-at-least-32-characters"
CORS_ORIGIN = "https://app.example"  # the one web origin the test functions accept
# As Supabase issues its API keys: HS256, ten-year expiry.
SERVICE_KEY = make_jwt(
    {"role": "service_role", "iss": "supabase", "iat": 1_700_000_000, "exp": 2_015_000_000}, JWT_SECRET
)
ANON_KEY = make_jwt(
    {"role": "anon", "iss": "supabase", "iat": 1_700_000_000, "exp": 2_015_000_000}, JWT_SECRET
)


def user_jwt(user_id: str) -> str:
    claims = {"sub": user_id, "role": "authenticated", "aud": "authenticated", "exp": int(time.time()) + 3600}
    return make_jwt(claims, JWT_SECRET)


@dataclass
class SupabaseUser:
    user_id: str
    project_id: str
    access_token: str  # personal access token (user_api_tokens)

    @property
    def jwt(self) -> str:
        return user_jwt(self.user_id)


def add_user(db_url: str, name: str) -> SupabaseUser:
    """A user owning one project, with a personal access token."""
    user = SupabaseUser(
        str(uuid.uuid4()), f"project-{name}-{uuid.uuid4().hex[:6]}", f"pat_{uuid.uuid4().hex}"
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projects (id, user_id, name) VALUES (%s, %s, %s)",
            (user.project_id, user.user_id, name),
        )
        conn.execute(
            "INSERT INTO user_api_tokens (token_sha256, user_id) VALUES (%s, %s)",
            (hashlib.sha256(user.access_token.encode()).hexdigest(), user.user_id),
        )
    return user


@pytest.fixture(scope="session")
def supabase_db() -> Iterator[str]:
    """The URL of a fresh database set up like a Supabase project, with our migrations applied."""
    name = f"hwgp_supabase_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        prepare_database(url)
        yield url
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def truncate(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE tasks, projects, user_api_tokens")


@pytest.fixture
def clean_supabase(supabase_db: str) -> str:
    """The session's Supabase database with no tasks, projects or tokens left by earlier tests."""
    truncate(supabase_db)
    return supabase_db


class StorageObjects(ThreadingHTTPServer):
    """Supabase Storage's object API on a loopback port, for complete-task's `file_data` uploads.

    Answers `POST /storage/v1/object/{bucket}/{path}` (service key required, as Storage requires it for
    a bucket without user policies) and `GET /storage/v1/object/public/{bucket}/{path}`. Supabase's
    storage server cannot run here; this keeps the objects in memory so tests can read them back.
    `fail_next` makes the next uploads answer 503, to test what a failed upload does.
    """

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StorageHandler)
        self.objects: dict[str, tuple[str, bytes]] = {}  # "bucket/path" → (content type, bytes)
        self.fail_next = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/storage/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _StorageHandler(BaseHTTPRequestHandler):
    server: StorageObjects

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        prefix = "/storage/v1/object/"
        if not self.path.startswith(prefix) or self.path.startswith(prefix + "public/"):
            return self._answer(404, b'{"error": "not found"}')
        if self.headers.get("Authorization") != f"Bearer {SERVICE_KEY}":
            return self._answer(403, b'{"error": "Unauthorized"}')
        if self.server.fail_next > 0:
            self.server.fail_next -= 1
            return self._answer(503, b'{"error": "storage unavailable"}')
        key = unquote(self.path.removeprefix(prefix))
        self.server.objects[key] = (self.headers.get("Content-Type", ""), data)
        self._answer(200, json.dumps({"Key": key}).encode())

    def do_GET(self) -> None:  # noqa: N802
        key = unquote(self.path.removeprefix("/storage/v1/object/public/"))
        if key not in self.server.objects:
            return self._answer(404, b'{"error": "not found"}')
        content_type, data = self.server.objects[key]
        self._answer(200, data, content_type)


@pytest.fixture(scope="session")
def storage_objects() -> Iterator[StorageObjects]:
    server = StorageObjects()
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def edge_functions(
    supabase_db: str, storage_objects: StorageObjects, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EdgeFunctions]:
    functions = start_edge_functions(
        supabase_db,
        service_key=SERVICE_KEY,
        jwt_secret=JWT_SECRET,
        log_path=tmp_path_factory.mktemp("deno") / "edge-functions.log",
        extra_env={
            "SUPABASE_ANON_KEY": ANON_KEY,
            "HWGP_STORAGE_URL": storage_objects.url,
            "HWGP_CORS_ORIGINS": CORS_ORIGIN,
        },
    )
    try:
        yield functions
    finally:
        functions.stop()


# The database behind each HTTP store URL handed out, for tests that write rows directly.
DATABASE_FOR_URL: dict[str, str] = {}


def database_url_for(store_url: str) -> str:
    """The PostgreSQL URL behind a Supabase store URL (direct or edge functions)."""
    if store_url.startswith("supabase+postgres"):
        return store_url.removeprefix("supabase+")
    return DATABASE_FOR_URL[store_url.split("?")[0]]
