"""Shared fixtures: a task store on each backend (SQLite file, PostgreSQL schema, Supabase direct and
over its edge functions; the Supabase fixtures live in tests/supabase_fixtures.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from db.store import TaskStore, open_store

pytest_plugins = ["supabase_fixtures", "disk_fixtures"]

# Tests never reach a hub: every model they use is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every test's ray.init() starts a cluster of its own, never joins one a developer left running.
os.environ.setdefault("RAY_ADDRESS", "local")

PG_URL = os.environ.get("HWGP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema, dropped afterwards."""
    schema = f"hwgp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres", "supabase-direct", "supabase-http"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    if request.param == "supabase-direct":
        return "supabase+" + request.getfixturevalue("clean_supabase")
    if request.param == "supabase-http":
        from supabase_fixtures import DATABASE_FOR_URL

        request.getfixturevalue("clean_supabase")
        functions = request.getfixturevalue("edge_functions")
        url = functions.store_url()
        DATABASE_FOR_URL[url.split("?")[0]] = functions.db_url
        return url
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def store(store_url: str) -> Iterator[TaskStore]:
    with open_store(store_url) as s:
        yield s


def raw_execute(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Run SQL straight against the database, as another system writing the tasks table would."""
    if url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            rows = conn.execute(sql.replace("%s", "?"), params).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()
    if url.startswith("supabase+"):
        from supabase_fixtures import database_url_for

        url = database_url_for(url)
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []
