"""Running Supabase mode on a plain PostgreSQL: what tests, benchmarks and local development need.

`prepare_database` gives a database what every Supabase project has (roles, `auth.uid()`; see
`db/supabase/supabase_roles.sql`), then applies the Supabase CLI project's migrations as `supabase db push`
does (`push_migrations`: every `db/supabase/migrations/<timestamp>_<name>.sql` in filename order, each in
one transaction, recorded in `supabase_migrations.schema_migrations`) — straight from the files, not
through hwgp. `start_edge_functions` serves every function of `functions/` from one Deno process on a
loopback port (`main.ts`), with the environment Supabase gives functions (`SUPABASE_URL`,
`SUPABASE_DB_URL`, `SUPABASE_SERVICE_ROLE_KEY`) and the JWT secret; with `function=NAME` it runs one
function's own `index.ts`, as `supabase functions serve` / the edge runtime does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import psycopg

SUPABASE_DIR = Path(__file__).resolve().parent.parent / "db" / "supabase"  # the Supabase CLI project
FUNCTIONS_DIR = SUPABASE_DIR / "functions"
MIGRATIONS_DIR = SUPABASE_DIR / "migrations"
ROLES_SQL = SUPABASE_DIR / "supabase_roles.sql"
# The Supabase CLI's rule for migration files (supabase/cli, pkg/migration): others are skipped.
CLI_MIGRATION_FILE = re.compile(r"^([0-9]+)_(.*)\.sql$")


def make_jwt(claims: dict, secret: str) -> str:
    """An HS256 JWT, as Supabase signs its API keys and user sessions."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def prepare_database(db_url: str) -> list[str]:
    """Create Supabase's roles and auth functions in `db_url`, then push every migration."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(ROLES_SQL.read_text().encode())
    return push_migrations(db_url)


def push_migrations(db_url: str) -> list[str]:
    """What `supabase db push` does: its history table, then each pending migration file in filename
    order, in its own transaction, recorded by version. Returns the file names applied."""
    applied = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS supabase_migrations")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS supabase_migrations.schema_migrations (version text NOT NULL PRIMARY KEY)"
        )
        conn.execute(
            "ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS statements text[]"
        )
        conn.execute("ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS name text")
        done = {r[0] for r in conn.execute("SELECT version FROM supabase_migrations.schema_migrations")}
        for path in sorted(MIGRATIONS_DIR.iterdir()):
            match = CLI_MIGRATION_FILE.match(path.name)
            if not match or match[1] in done:
                continue
            sql = path.read_text()
            with conn.transaction():
                conn.execute(sql.encode())
                conn.execute(
                    "INSERT INTO supabase_migrations.schema_migrations (version, name, statements)"
                    " VALUES (%s, %s, ARRAY[%s])",
                    (match[1], match[2], sql),
                )
            applied.append(path.name)
    return applied


def deno_binary() -> str:
    """Deno from the `deno` PyPI package (a dev dependency), else from PATH."""
    try:
        import deno

        return deno.find_deno_bin()
    except ImportError:
        found = shutil.which("deno")
        if not found:
            raise RuntimeError("Deno is not installed: pip install deno (a dev dependency)") from None
        return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EdgeFunctions:
    """A running Deno process serving the functions at `{url}/functions/v1/<name>`."""

    url: str  # what SUPABASE_URL would be
    db_url: str
    service_key: str
    process: subprocess.Popen

    def post(self, name: str, body: object = None, token: str | None = "", **kwargs) -> httpx.Response:
        """POST to one function; `token=""` means the service key, None means no Authorization header."""
        token = self.service_key if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.post(f"{self.url}/functions/v1/{name}", json=body, headers=headers, timeout=60, **kwargs)

    def store_url(self, *, service_key: str | None = None, access_token: str | None = None) -> str:
        """A `supabase+http://…` store URL carrying the service key or a user's access token."""
        credential = (
            {"access_token": access_token}
            if access_token
            else {"service_key": service_key or self.service_key}
        )
        return f"supabase+{self.url}?{urlencode(credential)}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_edge_functions(
    db_url: str,
    *,
    service_key: str,
    jwt_secret: str,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    function: str | None = None,
    startup_timeout_s: float = 180.0,
) -> EdgeFunctions:
    """Start Deno on a free loopback port and wait until it answers: `main.ts` (every function, routed by
    name), or with `function` that function's own `index.ts` alone, as the edge runtime runs it (its
    `Deno.serve` listens where `DENO_SERVE_ADDRESS` says)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update(
        SUPABASE_URL=url,
        SUPABASE_DB_URL=db_url,
        SUPABASE_SERVICE_ROLE_KEY=service_key,
        HWGP_JWT_SECRET=jwt_secret,
        NO_COLOR="1",
    )
    env.update(extra_env or {})
    permissions = ["--allow-net", "--allow-env", "--allow-read", "--allow-sys"]
    permissions.append(f"--allow-write={FUNCTIONS_DIR / 'node_modules'}")
    if function is None:
        cwd, command = FUNCTIONS_DIR, [deno_binary(), "run", *permissions, "main.ts", "--port", str(port)]
    else:
        cwd, command = FUNCTIONS_DIR / function, [deno_binary(), "run", *permissions, "index.ts"]
        env["DENO_SERVE_ADDRESS"] = f"tcp:127.0.0.1:{port}"
    log = log_path.open("w")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child keeps its own descriptor
    deadline = time.monotonic() + startup_timeout_s  # a first start downloads npm:postgres
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"deno exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            httpx.get(f"{url}/functions/v1/", timeout=1)
            return EdgeFunctions(url, db_url, service_key, process)
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    process.wait()
    raise RuntimeError(
        f"edge functions did not start within {startup_timeout_s:.0f} s:\n{log_path.read_text()}"
    )
