"""The store through outages: SQLite locked by another connection, PostgreSQL connections killed, a
statement stuck behind a lock, a database that is not there; and a `complete` retried after a lost reply.

Real databases throughout: a second SQLite connection holds the write lock; PostgreSQL backends are
killed with `pg_terminate_backend` (the shared server itself keeps running).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from conftest import PG_URL

from db.http_client import HttpTasks
from db.models import TaskStatus
from db.postgres import PostgresTaskStore
from db.sqlite import SqliteTaskStore
from db.store import InvalidTask, StoreUnavailable, TaskConflict, TaskStore, open_store
from db.supabase_store import SupabaseTaskStore
from hwgp_testing import TcpProxy

# --- completing after a lost reply (every backend) ---------------------------------------------------


def test_a_retried_complete_returns_the_task_it_completed(store: TaskStore):
    first, second, cancelled = store.add("t2v", {}), store.add("flux", {}), store.add("vace", {})
    store.claim_next("w", task_types=["t2v"])
    done = store.complete(first.id, "files/a.mp4", worker_id="w")
    # The reply of that call was lost; the worker calls again with the same output.
    assert store.complete_idempotent(first.id, "files/a.mp4", worker_id="w") == done
    assert store.complete_idempotent(first.id, "files/a.mp4") == done
    # Another output, or another worker's claim, is still a conflict, and the stored output stays.
    with pytest.raises(TaskConflict, match="Complete"):
        store.complete_idempotent(first.id, "files/other.mp4", worker_id="w")
    with pytest.raises(TaskConflict, match="Complete"):
        store.complete_idempotent(first.id, "files/a.mp4", worker_id="w2")
    assert store.get(first.id).output_location == "files/a.mp4"
    # A first call completes as `complete` does.
    store.claim_next("w", task_types=["flux"])
    completed = store.complete_idempotent(second.id, "files/b.png", worker_id="w")
    assert completed.status == TaskStatus.COMPLETE and completed.output_location == "files/b.png"
    # A task cancelled meanwhile never records the output.
    store.claim_next("w", task_types=["vace"])
    store.cancel(cancelled.id)
    with pytest.raises(TaskConflict, match="Cancelled"):
        store.complete_idempotent(cancelled.id, "files/c.mp4", worker_id="w")
    assert store.get(cancelled.id).output_location is None


# --- SQLite: reads never wait for the write lock ----------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path) -> SqliteTaskStore:
    store = SqliteTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", busy_timeout_s=1.5)
    store.migrate()
    yield store
    store.close()


def test_sqlite_reads_answer_while_another_connection_holds_the_write_lock(sqlite_store: SqliteTaskStore):
    task = sqlite_store.add("t2v", {"n": 1})
    holder = sqlite3.connect(sqlite_store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE tasks SET priority = 9")  # not committed: readers see the old row
    try:
        started = time.monotonic()
        assert sqlite_store.get(task.id).priority == 0
        assert [t.id for t in sqlite_store.list()] == [task.id]
        assert sqlite_store.count_by_status()[TaskStatus.QUEUED] == 1
        assert time.monotonic() - started < 0.75  # well inside the 1.5 s busy timeout
        # A write waits for the lock up to the busy timeout, then says the database is unavailable.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="database is locked"):
            sqlite_store.claim_next("w")
        assert 1.4 <= time.monotonic() - started < 5.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    [claimed] = sqlite_store.claim_next("w")  # nothing was half-written by the refused claim
    assert claimed.id == task.id and claimed.attempts == 1


def test_sqlite_write_waiting_for_the_lock_does_not_hold_up_reads_of_the_same_store(
    sqlite_store: SqliteTaskStore,
):
    task = sqlite_store.add("t2v", {})
    holder = sqlite3.connect(sqlite_store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outcome: list[BaseException] = []

    def blocked_write() -> None:
        try:
            sqlite_store.add("t2v", {"waits": True})
        except BaseException as error:  # noqa: BLE001 (the test inspects it)
            outcome.append(error)

    writer = threading.Thread(target=blocked_write)
    try:
        writer.start()
        time.sleep(0.3)  # the writer now waits inside SQLite's busy handler
        started = time.monotonic()
        assert sqlite_store.get(task.id).id == task.id
        assert time.monotonic() - started < 0.5
        writer.join(10)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable)
    assert sqlite_store.count_by_status()[TaskStatus.QUEUED] == 1


# --- PostgreSQL: pool, deadlines, reconnecting ---------------------------------------------------------


def _terminate_backends(application_name: str) -> int:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()[0]


def test_postgres_store_recovers_when_its_connections_are_killed(pg_schema_url: str):
    name = f"hwgp_kill_{uuid.uuid4().hex[:8]}"
    with open_store(f"{pg_schema_url}&application_name={name}") as store:
        task = store.add("t2v", {})
        assert store.wait_for_work(0.05) in (True, False)  # opens the LISTEN connection
        assert _terminate_backends(name) >= 2  # the pooled connection(s) and the listener

        assert store.get(task.id).id == task.id  # the next call gets a fresh connection
        # The listener's loss is noticed and it reconnects; notifications may have been missed, so it
        # reports a possible wake at once.
        started = time.monotonic()
        assert store.wait_for_work(10.0) is True
        assert time.monotonic() - started < 5.0

        def insert_later() -> None:
            time.sleep(0.3)
            with open_store(pg_schema_url, migrate=False) as other:
                other.add("t2v", {})

        inserter = threading.Thread(target=insert_later)
        inserter.start()
        started = time.monotonic()
        assert store.wait_for_work(10.0) is True  # listening again: woken by the insert
        assert time.monotonic() - started < 5.0
        inserter.join()
        assert len(store.claim_next("w", limit=5)) == 2


def test_postgres_statement_stuck_behind_a_lock_raises_store_unavailable(pg_schema_url: str):
    with open_store(f"{pg_schema_url}&statement_timeout_s=0.5") as store:
        assert store.settings.statement_timeout_s == 0.5
        task = store.add("t2v", {})
        with psycopg.connect(pg_schema_url) as locker:
            locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="statement timeout"):
                store.claim_next("w")
            assert time.monotonic() - started < 3.0
            locker.rollback()
        [claimed] = store.claim_next("w")
        assert claimed.id == task.id and claimed.attempts == 1


def test_postgres_not_there_raises_store_unavailable_within_the_connect_timeout():
    store = PostgresTaskStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=1)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no database connection within 1 s"):
            store.get(str(uuid.uuid4()))
        assert time.monotonic() - started < 4.0
    finally:
        store.close()


@pytest.mark.parametrize(
    ("query", "field"),
    [("statement_timeout_s=soon", "statement_timeout_s"), ("pool_size=0", "pool_size")],
)
def test_postgres_bad_pool_settings_name_the_setting(query: str, field: str):
    with pytest.raises(InvalidTask) as info:
        PostgresTaskStore(f"{PG_URL}?{query}")
    assert info.value.field == field


# --- HTTP transports -------------------------------------------------------------------------------------


def test_http_stores_raise_store_unavailable_when_nothing_answers():
    supabase = SupabaseTaskStore("supabase+http://127.0.0.1:1?service_key=key", timeout=2.0)
    api = HttpTasks("http://127.0.0.1:1", timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable, match="cannot reach"):
            supabase.get(str(uuid.uuid4()))
        with pytest.raises(StoreUnavailable, match="cannot reach"):
            api.get(str(uuid.uuid4()))
    finally:
        supabase.close()
        api.close()


def test_postgres_store_survives_a_server_restart(pg_schema_url: str):
    parts = urlsplit(pg_schema_url)
    proxy = TcpProxy((parts.hostname, parts.port))
    via_proxy = urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
    try:
        with open_store(f"{via_proxy}&connect_timeout_s=1") as store:
            task = store.add("t2v", {})
            store.wait_for_work(0.05)
            proxy.stop()  # the server goes away
            for _ in range(3):  # every call fails fast with StoreUnavailable while it is away
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    store.get(task.id)
                assert time.monotonic() - started < 3.0
            with pytest.raises(StoreUnavailable):
                store.wait_for_work(1.0)
            time.sleep(6.0)  # longer than the pool keeps retrying in the background
            proxy.start()  # and comes back
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    claimed = store.claim_next("w")
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the store did not reconnect within 10 s"
                    time.sleep(0.2)
            assert [t.id for t in claimed] == [task.id]
            assert store.wait_for_work(5.0) is True  # the listener reconnects too
            assert store.wait_for_work(0.2) is False  # and is quiet again, listening
    finally:
        proxy.stop()
