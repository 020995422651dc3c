"""`hwgp` in Supabase mode: `db init --supabase`, and `--db supabase` with the original's flags and env."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from supabase_fixtures import SERVICE_KEY, EdgeFunctions, add_user

from db.cli import EXIT_USAGE, main
from db.supabase_store import supabase_migrations


@pytest.fixture
def no_supabase_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "SUPABASE_URL",
        "SUPABASE_SERVICE_KEY",
        "SUPABASE_ACCESS_TOKEN",
        "POSTGRES_TABLE_NAME",
        "HWGP_DB",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_db_init_supabase_applies_every_migration_once(supabase_db: str, capsys: pytest.CaptureFixture):
    schema = f"hwgp_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(supabase_db, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{supabase_db}?options=-csearch_path%3D{schema}"
    try:
        assert main(["db", "init", "--db", url, "--supabase"]) == 0
        out = capsys.readouterr().out
        assert (
            "applied 0001_tasks, 0002_task_functions, 0003_result, "
            + ", ".join(v for v, _ in supabase_migrations())
            in out
        )
        assert main(["db", "init", "--db", url, "--supabase"]) == 0
        assert "up to date" in capsys.readouterr().out
        with psycopg.connect(url) as conn:
            functions = {
                r[0]
                for r in conn.execute(
                    "SELECT proname FROM pg_proc WHERE pronamespace = %s::regnamespace", (schema,)
                )
            }
        assert {"claim_next_task", "complete_task", "get_completed_segments"} <= functions
    finally:
        with psycopg.connect(supabase_db, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_db_supabase_with_the_service_key_from_the_environment(
    edge_functions: EdgeFunctions, clean_supabase: str, no_supabase_env, capsys: pytest.CaptureFixture
):
    no_supabase_env.setenv("SUPABASE_URL", edge_functions.url)
    no_supabase_env.setenv("SUPABASE_SERVICE_KEY", SERVICE_KEY)
    assert main(["--db", "supabase", "add-task", "--type", "t2v", "--params", '{"prompt": "a cat"}']) == 0
    task_id = capsys.readouterr().out.strip()
    assert main(["--db", "supabase", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["id"] == task_id and listed["params"] == {"prompt": "a cat"}
    assert main(["--db", "supabase", "cancel", task_id]) == 0
    assert capsys.readouterr().out.strip() == f"{task_id} Cancelled"


def test_db_supabase_with_a_users_access_token(
    edge_functions: EdgeFunctions, clean_supabase: str, no_supabase_env, capsys: pytest.CaptureFixture
):
    alice, bob = add_user(clean_supabase, "alice"), add_user(clean_supabase, "bob")
    flags = [
        "--db",
        "supabase",
        "--supabase-url",
        edge_functions.url,
        "--supabase-access-token",
        alice.access_token,
    ]
    assert main([*flags, "add-task", "--type", "flux", "--project-id", alice.project_id]) == 0
    task_id = capsys.readouterr().out.strip()
    assert main([*flags, "add-task", "--type", "flux", "--project-id", bob.project_id]) == EXIT_USAGE
    assert "not one of your projects" in capsys.readouterr().err
    assert main([*flags, "show", task_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["project_id"] == alice.project_id


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({}, ["--db", "supabase", "list"], "--supabase-url"),
        ({"SUPABASE_URL": "https://abc.supabase.co"}, ["--db", "supabase", "list"], "SUPABASE_SERVICE_KEY"),
        ({"SUPABASE_URL": "ftp://abc"}, ["--db", "supabase", "list"], "not an http(s) URL"),
        (
            {
                "SUPABASE_URL": "https://abc.supabase.co",
                "SUPABASE_SERVICE_KEY": "k",
                "POSTGRES_TABLE_NAME": "jobs",
            },
            ["--db", "supabase", "list"],
            "POSTGRES_TABLE_NAME",
        ),
        ({}, ["db", "init", "--db", "supabase"], "--supabase"),
        ({}, ["db", "init", "--db", "sqlite:///x.db", "--supabase"], "postgresql://"),
    ],
)
def test_supabase_configuration_errors_are_one_line_and_exit_2(
    no_supabase_env, capsys: pytest.CaptureFixture, env: dict, argv: list, message: str
):
    for name, value in env.items():
        no_supabase_env.setenv(name, value)
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("hwgp: error:") and message in err and err.count("\n") == 1
