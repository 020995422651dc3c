"""The Supabase CLI project (`db/supabase/`, `supabase --workdir db …`): its config, its migrations as
`supabase db push` applies them (one source of SQL, shared with `hwgp db init`), and each edge function
served alone from its own `index.ts`, as the edge runtime serves it."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from supabase_fixtures import JWT_SECRET, PG_URL, SERVICE_KEY, StorageObjects, add_user
from supabase_local import (
    FUNCTIONS_DIR,
    MIGRATIONS_DIR,
    ROLES_SQL,
    SUPABASE_DIR,
    EdgeFunctions,
    deno_binary,
    push_migrations,
    start_edge_functions,
)

from db.cli import main
from db.postgres import PostgresTaskStore, migration_files
from db.supabase_store import SupabaseTaskStore

FUNCTION_NAMES = sorted(
    p.parent.name for p in FUNCTIONS_DIR.glob("*/index.ts") if not p.parent.name.startswith("_")
)


def test_config_toml_lists_every_function_with_the_gateway_jwt_check_off():
    config = tomllib.loads((SUPABASE_DIR / "config.toml").read_text())
    assert config["project_id"] and config["db"]["major_version"] >= 15
    assert len(FUNCTION_NAMES) == 18 and sorted(config["functions"]) == FUNCTION_NAMES
    # The functions authenticate callers themselves: personal access tokens are not JWTs.
    assert all(section == {"verify_jwt": False} for section in config["functions"].values())
    assert config["storage"]["buckets"]["image_uploads"]["public"] is True


def test_migrations_are_named_as_the_cli_wants_and_are_the_only_postgres_sql(pg_schema_url: str):
    names = sorted(p.name for p in MIGRATIONS_DIR.iterdir())
    assert names and all(re.fullmatch(r"[0-9]{14}_[a-z0-9_]+\.sql", n) for n in names), names
    assert len({n.split("_")[0] for n in names}) == len(names)  # the CLI keys its history by timestamp
    # Nothing else holds PostgreSQL migrations: the plain store reads the same folder.
    db_dir = SUPABASE_DIR.parent
    assert sorted(p.name for p in (db_dir / "migrations").iterdir()) == ["sqlite"]
    with (
        PostgresTaskStore(pg_schema_url) as postgres,
        SupabaseTaskStore("supabase+" + pg_schema_url) as supabase,
    ):
        plain = [v for v, _ in postgres.migrations()]
        everything = [v for v, _ in supabase.migrations()]
    assert everything == [n.removesuffix(".sql") for n in names] == [v for v, _ in migration_files()]
    assert plain == [v for v in everything if "_supabase_" not in v] and plain[0].endswith("_tasks")


def test_functions_import_only_relative_paths_and_versioned_npm_packages():
    """What `supabase functions deploy NAME` bundles without an import map: `../_shared/…` and `npm:x@v`."""
    imports = re.compile(r'^import .* from "([^"]+)";', re.M)
    for source in FUNCTIONS_DIR.glob("*/*.ts"):
        for target in imports.findall(source.read_text()):
            assert target.startswith(("./", "../")) or re.fullmatch(
                r"npm:[a-z@/.-]+@\d+\.\d+\.\d+", target
            ), (
                source,
                target,
            )
        # Function secrets may not start with SUPABASE_; only the platform's own are read.
        for name in re.findall(r'Deno\.env\.get\("(SUPABASE_[A-Z_]+)"\)', source.read_text()):
            assert name in {"SUPABASE_URL", "SUPABASE_DB_URL", "SUPABASE_SERVICE_ROLE_KEY"}, (source, name)


def test_deno_check_lint_and_fmt_pass_for_every_function_on_its_own():
    entries = [f"{name}/index.ts" for name in FUNCTION_NAMES] + ["main.ts"]
    for command in (["check", *entries], ["lint"], ["fmt", "--check"]):
        done = subprocess.run(
            [deno_binary(), *command],
            cwd=FUNCTIONS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert done.returncode == 0, (command[0], done.stdout + done.stderr)


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """An empty database with only what a new Supabase project has: its roles and `auth` functions."""
    name = f"hwgp_fresh_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(ROLES_SQL.read_bytes())
        yield url
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_db_push_then_hwgp_shares_its_history(fresh_database: str, capsys: pytest.CaptureFixture):
    files = sorted(p.name for p in MIGRATIONS_DIR.iterdir())
    assert push_migrations(fresh_database) == files
    assert push_migrations(fresh_database) == []
    # hwgp sees what the CLI applied: nothing is applied twice.
    assert main(["db", "init", "--db", fresh_database, "--supabase"]) == 0
    assert capsys.readouterr().out.strip().endswith("up to date")
    with SupabaseTaskStore("supabase+" + fresh_database) as store:
        task = store.add("t2v", {"prompt": "a cat"})
        assert [t.id for t in store.claim_next("w")] == [task.id]


def test_hwgp_db_init_then_db_push_applies_nothing(fresh_database: str):
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        # A linked project has the CLI's history table before anything is pushed.
        conn.execute("CREATE SCHEMA supabase_migrations")
        conn.execute(
            "CREATE TABLE supabase_migrations.schema_migrations (version text PRIMARY KEY, statements text[], name text)"
        )
    assert main(["db", "init", "--db", fresh_database, "--supabase"]) == 0
    assert push_migrations(fresh_database) == []
    with psycopg.connect(fresh_database) as conn:
        recorded = conn.execute(
            "SELECT version || '_' || name FROM supabase_migrations.schema_migrations ORDER BY version"
        ).fetchall()
    assert [r[0] for r in recorded] == [v for v, _ in migration_files()]


@pytest.fixture(scope="module")
def standalone_functions(
    supabase_db: str, storage_objects: StorageObjects, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, EdgeFunctions]]:
    """Every function's `index.ts` started on its own (in parallel), each on its own port."""
    logs = tmp_path_factory.mktemp("standalone")

    def start(name: str) -> EdgeFunctions:
        return start_edge_functions(
            supabase_db,
            service_key=SERVICE_KEY,
            jwt_secret=JWT_SECRET,
            log_path=logs / f"{name}.log",
            extra_env={"HWGP_STORAGE_URL": storage_objects.url},
            function=name,
        )

    with ThreadPoolExecutor(6) as pool:
        started = dict(zip(FUNCTION_NAMES, pool.map(start, FUNCTION_NAMES), strict=True))
    try:
        yield started
    finally:
        for functions in started.values():
            functions.stop()


def test_every_function_serves_alone_from_its_index_ts(standalone_functions: dict[str, EdgeFunctions]):
    for name, functions in standalone_functions.items():
        assert functions.post(name, {}, token=None).status_code == 401, name
        assert functions.post(name, {}, token="nope").status_code == 403, name


def test_a_task_runs_through_standalone_functions(
    standalone_functions: dict[str, EdgeFunctions], clean_supabase: str, storage_objects: StorageObjects
):
    alice = add_user(clean_supabase, "alice")

    def call(name: str, body: dict, token: str | None = "") -> dict:
        answer = standalone_functions[name].post(name, body, token=token)
        assert answer.status_code == 200, (name, answer.text)
        return answer.json()

    created = call("create-task", {"task_type": "t2v", "project_id": alice.project_id}, token=alice.jwt)
    claimed = call("claim-next-task", {"worker_id": "gpu-1"}, token=alice.access_token)
    assert claimed["task_id"] == created["task_id"]
    done = call(
        "complete-task",
        {"task_id": created["task_id"], "file_data": "aGVsbG8=", "filename": "out.png", "worker_id": "gpu-1"},
        token=alice.jwt,
    )
    assert done["status"] == "Complete" and done["output_location"].endswith(f"/{created['task_id']}/out.png")
    assert storage_objects.objects[f"image_uploads/{created['task_id']}/out.png"][1] == b"hello"
    assert call("get-task", {"task_id": created["task_id"]})["status"] == "Complete"


def test_the_official_supabase_client_invokes_the_functions(
    edge_functions: EdgeFunctions, clean_supabase: str
):
    """What the original's clients do: `supabase.functions.invoke(name, {"body": …})`."""
    from supabase import create_client
    from supabase_functions.errors import FunctionsHttpError

    alice = add_user(clean_supabase, "alice")
    client = create_client(edge_functions.url, SERVICE_KEY)
    as_alice = {"Authorization": f"Bearer {alice.access_token}"}
    created = client.functions.invoke(
        "create-task",
        {
            "body": {"task_type": "t2v", "project_id": alice.project_id},
            "headers": as_alice,
            "responseType": "json",
        },
    )
    claimed = client.functions.invoke("claim-next-task", {"body": {"worker_id": "w"}, "responseType": "json"})
    assert claimed["task_id"] == created["task_id"] and claimed["project_id"] == alice.project_id
    with pytest.raises(FunctionsHttpError) as refused:
        client.functions.invoke("create-task", {"body": {"task_type": "t2v", "priority": "high"}})
    assert refused.value.status == 400 and "priority" in refused.value.message


def test_migrations_push_as_a_non_superuser_like_a_hosted_projects_postgres(fresh_database: str):
    """On a hosted project `postgres` is no superuser: it has CREATEROLE, owns the database, may use the
    `auth` schema and SET ROLE to anon / authenticated / service_role. The migrations must apply as such."""
    admin = f"hwgp_admin_{uuid.uuid4().hex[:8]}"
    database = fresh_database.rsplit("/", 1)[1]
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {admin} LOGIN CREATEROLE NOSUPERUSER")
        conn.execute(f"GRANT anon, authenticated, service_role TO {admin}")
        conn.execute(f"ALTER DATABASE {database} OWNER TO {admin}")
        conn.execute(f"GRANT USAGE ON SCHEMA auth TO {admin}")
        for what in ("TABLES", "FUNCTIONS", "SEQUENCES"):
            conn.execute(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {admin} IN SCHEMA public"
                f" GRANT ALL ON {what} TO anon, authenticated, service_role"
            )
    as_admin = fresh_database.replace("postgres@", f"{admin}@", 1)
    try:
        assert push_migrations(as_admin) == sorted(p.name for p in MIGRATIONS_DIR.iterdir())
        user = add_user(as_admin, "alice")
        with psycopg.connect(as_admin) as conn, conn.transaction():
            conn.execute(
                "SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                (f'{{"role": "authenticated", "sub": "{user.user_id}"}}',),
            )
            created = conn.execute(
                "SELECT id, project_id FROM create_task('t2v', '{}'::jsonb, NULL, NULL, %s)",
                (user.project_id,),
            ).fetchone()
            claimed = conn.execute("SELECT id FROM claim_next_task('w')").fetchall()
        assert created[1] == user.project_id and claimed == [(created[0],)]
    finally:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {database} OWNER TO postgres")
            conn.execute(f"REASSIGN OWNED BY {admin} TO postgres")
            conn.execute(f"DROP OWNED BY {admin}")
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            conn.execute(f"DROP ROLE {admin}")
