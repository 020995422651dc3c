"""PostgreSQL task store (psycopg 3): `postgresql://user@host:port/db`.

Claims lock rows with `FOR UPDATE SKIP LOCKED` inside the one UPDATE statement, so concurrent
claimers never wait on each other nor take the same row. A trigger NOTIFYs `hwgp_tasks` whenever a
task may have become claimable, and `wait_for_work` LISTENs for it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from db.sql_store import SqlTaskStore

NOTIFY_CHANNEL = "hwgp_tasks"
_NAMED_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@lru_cache(maxsize=256)
def to_psycopg(sql: str) -> str:
    """`:name` → `%(name)s` (and literal `%` → `%%`), leaving `::type` casts alone."""
    return _NAMED_PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))


class PostgresTaskStore(SqlTaskStore):
    now_sql = "clock_timestamp()"
    lock_sql = "FOR UPDATE OF t SKIP LOCKED"
    insertion_order_sql = "seq"
    migrations_dir = "postgres"

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.RLock()
        self._conn = self._connect()
        self._listener: psycopg.Connection | None = None

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row)

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor]:
        with self._lock:
            if self._conn.closed or self._conn.broken:
                self._conn = self._connect()
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield cur

    def _execute(self, cur: psycopg.Cursor, sql: str, params: Mapping[str, Any] | None = None) -> list[dict]:
        cur.execute(to_psycopg(sql), dict(params or {}))
        return cur.fetchall() if cur.description else []

    def _types_filter(self, column: str) -> str:
        return f"{column} = ANY(:task_types)"

    def _encode_types(self, task_types: list[str]) -> list[str]:
        return task_types

    def _encode_params(self, params: dict[str, Any]) -> Jsonb:
        return Jsonb(params)

    def _cutoff_sql(self) -> str:
        return "clock_timestamp() - make_interval(secs => :older_than_s)"

    def _apply_migration(self, cur: psycopg.Cursor, sql: str) -> None:
        cur.execute(sql.encode())  # no parameters: sent as one multi-statement script

    def _migration_lock(self, cur: psycopg.Cursor) -> None:
        # Several processes may open a fresh database at once; one migrates, the others wait.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('hwgp_migrate:' || current_schema()))")

    def wait_for_work(self, timeout_s: float) -> bool:
        with self._lock:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(self.url, autocommit=True)
                self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            listener = self._listener
        woke = False
        for _ in listener.notifies(timeout=timeout_s, stop_after=1):
            woke = True
        return woke

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._listener is not None:
                self._listener.close()
