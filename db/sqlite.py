"""SQLite task store: the embedded default (`sqlite:///tasks.db`, `sqlite:////abs/tasks.db?busy_timeout_s=30`).

WAL mode, so readers never wait for the writer. Writes run in `BEGIN IMMEDIATE` transactions (a claim
takes the write lock up front) on one connection; reads run in deferred transactions on a second
connection, so a write lock held elsewhere, even for minutes, never delays `get`, `list` or
`count_by_status`. A write that cannot get the lock within the busy timeout raises `StoreUnavailable`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from db.errors import InvalidTask, StoreUnavailable
from db.sql_store import SqlTaskStore

DEFAULT_BUSY_TIMEOUT_S = 30.0
# SQLite's messages for "cannot answer now": another process holds the lock, the file is unreachable,
# the disk is full.
_UNAVAILABLE = (
    "database is locked",
    "database table is locked",
    "unable to open database file",
    "disk i/o error",
    "database or disk is full",
)


def sqlite_path(url: str) -> str:
    """`sqlite:///tasks.db` → `tasks.db`; `sqlite:////abs/tasks.db` → `/abs/tasks.db` (query removed)."""
    if not url.startswith("sqlite:///"):
        raise InvalidTask(
            "db", f"SQLite URLs look like sqlite:///FILE (relative) or sqlite:////FILE, not {url!r}"
        )
    path = url.removeprefix("sqlite:///").partition("?")[0]
    if not path:
        raise InvalidTask("db", "the SQLite URL names no file")
    return path


def _busy_timeout_from_url(url: str) -> float | None:
    for key, value in parse_qsl(url.partition("?")[2]):
        if key != "busy_timeout_s":
            raise InvalidTask("db", f"unknown SQLite URL setting {key!r}; the one setting is busy_timeout_s")
        try:
            return float(value)
        except ValueError:
            raise InvalidTask("busy_timeout_s", f"must be a number, got {value!r}") from None
    return None


class SqliteTaskStore(SqlTaskStore):
    def __init__(self, url: str, *, busy_timeout_s: float | None = None):
        self.url = url
        self.path = sqlite_path(url)
        self.busy_timeout_s = busy_timeout_s or _busy_timeout_from_url(url) or DEFAULT_BUSY_TIMEOUT_S
        if self.busy_timeout_s <= 0:
            raise InvalidTask("busy_timeout_s", f"must be more than 0, got {self.busy_timeout_s}")
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Two connections, each guarded by a lock (the store may be called from worker threads): a write
        # waiting for the database's lock must not hold up reads.
        self._write_lock = threading.Lock()
        self._writer = self._connect(wal=True)
        if self.path == ":memory:":  # a second connection would open a second, empty database
            self._read_lock, self._reader = self._write_lock, self._writer
        else:
            self._read_lock, self._reader = threading.Lock(), self._connect(wal=False)
        self._data_version = self._read_data_version()

    def _connect(self, *, wal: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            if wal:
                conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.OperationalError as error:
            raise self._unavailable(error) from None
        return conn

    def _unavailable(self, error: sqlite3.OperationalError) -> Exception:
        if str(error).lower().startswith(_UNAVAILABLE):
            return StoreUnavailable(f"{self.path}: {error} (busy timeout {self.busy_timeout_s:g} s)")
        return error

    @contextmanager
    def _transaction(
        self, conn: sqlite3.Connection, lock: threading.Lock, begin: str
    ) -> Iterator[sqlite3.Cursor]:
        with lock:
            cur = conn.cursor()
            try:
                cur.execute(begin)
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            except sqlite3.OperationalError as error:
                if conn.in_transaction:
                    conn.rollback()
                translated = self._unavailable(error)
                if translated is error:
                    raise
                raise translated from None
            finally:
                cur.close()

    def _write(self) -> AbstractContextManager[sqlite3.Cursor]:
        return self._transaction(self._writer, self._write_lock, "BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Cursor]:
        return self._transaction(self._reader, self._read_lock, "BEGIN DEFERRED")

    def _execute(self, cur: sqlite3.Cursor, sql: str, params: Mapping[str, Any] | None = None) -> list[dict]:
        cur.execute(sql, dict(params or {}))
        return [dict(row) for row in cur.fetchall()] if cur.description else []

    def _apply_migration(self, cur: sqlite3.Cursor, sql: str) -> None:
        # executescript would COMMIT our transaction; run the statements one by one instead.
        statement = ""
        for line in sql.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                cur.execute(statement)
                statement = ""

    def _read_data_version(self) -> int:
        with self._read_lock:
            return int(self._reader.execute("PRAGMA data_version").fetchone()[0])

    def wait_for_work(self, timeout_s: float) -> bool:
        # data_version changes whenever another connection (our writer included) commits: cheap to poll.
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
        with self._write_lock:
            self._writer.close()
        with self._read_lock:
            self._reader.close()
