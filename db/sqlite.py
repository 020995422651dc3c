"""SQLite task store: the embedded default (`sqlite:///tasks.db`).

WAL mode so readers never block the writer, a busy timeout so several processes can share one file,
and `BEGIN IMMEDIATE` so every write transaction (a claim included) takes the write lock up front.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from db.sql_store import SqlTaskStore
from db.store import InvalidTask

BUSY_TIMEOUT_S = 30.0


def sqlite_path(url: str) -> str:
    """`sqlite:///tasks.db` → `tasks.db`; `sqlite:////abs/tasks.db` → `/abs/tasks.db`."""
    if not url.startswith("sqlite:///"):
        raise InvalidTask(
            "db", f"SQLite URLs look like sqlite:///FILE (relative) or sqlite:////FILE, not {url!r}"
        )
    path = url.removeprefix("sqlite:///")
    if not path:
        raise InvalidTask("db", "the SQLite URL names no file")
    return path


class SqliteTaskStore(SqlTaskStore):
    now_sql = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    lock_sql = ""  # BEGIN IMMEDIATE already serialises writers
    insertion_order_sql = "rowid"
    migrations_dir = "sqlite"

    def __init__(self, url: str):
        self.url = url
        self.path = sqlite_path(url)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: the store may be called from worker threads.
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._data_version = self._read_data_version()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _execute(self, cur: sqlite3.Cursor, sql: str, params: Mapping[str, Any] | None = None) -> list[dict]:
        cur.execute(sql, dict(params or {}))
        return [dict(row) for row in cur.fetchall()] if cur.description else []

    def _types_filter(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(:task_types))"

    def _encode_types(self, task_types: list[str]) -> str:
        return json.dumps(task_types)

    def _encode_params(self, params: dict[str, Any]) -> str:
        return json.dumps(params)

    def _cutoff_sql(self) -> str:
        return "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || :older_than_s || ' seconds')"

    def _apply_migration(self, cur: sqlite3.Cursor, sql: str) -> None:
        # executescript would COMMIT our transaction; run the statements one by one instead.
        statement = ""
        for line in sql.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                cur.execute(statement)
                statement = ""

    def _migration_lock(self, cur: sqlite3.Cursor) -> None:
        pass  # BEGIN IMMEDIATE holds the write lock

    def _read_data_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def wait_for_work(self, timeout_s: float) -> bool:
        # data_version changes whenever another connection commits: cheap to poll, no daemon needed.
        deadline = time.monotonic() + timeout_s
        while True:
            version = self._read_data_version()
            if version != self._data_version:
                self._data_version = version
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.05, remaining))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
