"""PostgreSQL task store (psycopg 3 + psycopg_pool): `postgresql://user@host:port/db`.

Every operation is one call of a SQL function from `db/migrations/postgres/0002_task_functions.sql`
(as procrastinate's manager calls its functions), so the rules live once, in SQL, for this store and
for the Supabase edge functions. Claims lock rows with `FOR UPDATE SKIP LOCKED` inside one statement:
concurrent claimers never wait on each other nor take the same row. A trigger NOTIFYs `hwgp_tasks`
whenever a task may have become claimable, and `wait_for_work` LISTENs for it.

Connections come from a pool with deadlines, so a hung or restarting server never hangs a caller:

    postgresql://host/db?connect_timeout_s=5&statement_timeout_s=30&pool_size=4

(or the same names as keyword arguments). Each connection is checked before use and replaced when the
server dropped it, so the store recovers on the next call after a restart; a call that cannot get a
connection within the connect timeout, or whose statement runs past the statement timeout (a lock held
elsewhere, say), raises `StoreUnavailable`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from db.base import DEFAULT_MAX_ATTEMPTS, TaskStore
from db.errors import InvalidTask, StoreUnavailable, TaskConflict, TaskForbidden, TaskNotFound
from db.models import NewTask, Task, TaskStatus

NOTIFY_CHANNEL = "hwgp_tasks"


@dataclass(frozen=True)
class PoolSettings:
    """Deadlines and size of the connection pool; read from the URL's query, overridable by keywords."""

    connect_timeout_s: float = 5.0  # to open a connection, and to wait for a free one
    statement_timeout_s: float = 30.0  # server-side limit on every statement
    pool_size: int = 4  # connections at most (one more is used by `wait_for_work`)

    @classmethod
    def split_url(cls, url: str, **overrides: float | int | None) -> tuple[str, PoolSettings]:
        """(the URL without our settings, the settings); `InvalidTask` naming a bad value."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        values: dict[str, Any] = {}
        for key, value in query:
            if key in cls.__dataclass_fields__:
                values[key] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key, value in values.items():
            try:
                number = float(value) if key != "pool_size" else int(value)
            except (TypeError, ValueError):
                raise InvalidTask(key, f"must be a number, got {value!r}") from None
            if not number > 0:
                raise InvalidTask(key, f"must be more than 0, got {value!r}")
            values[key] = number
        kept = [(k, v) for k, v in query if k not in cls.__dataclass_fields__]
        return urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote))), cls(**values)


def store_error(error: psycopg.Error, task_id: str | None = None) -> Exception:
    """The store's exception for a database error: the SQLSTATEs our functions raise, and the ways a
    database can be unavailable (others come back unchanged)."""
    state = error.sqlstate
    message = error.diag.message_primary or str(error)
    if state == "P0002":
        return TaskNotFound(task_id or error.diag.message_detail or "?")
    if state == "55000":
        return TaskConflict(message)
    if state == "22023":
        field = error.diag.message_detail or "request"
        return InvalidTask(field, message.removeprefix(f"{field}: "))
    if state == "42501":
        return TaskForbidden(message)
    if state == "57014":
        return StoreUnavailable(f"the database did not answer within the statement timeout: {message}")
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        # Connection refused or lost, server shutting down or starting, too many connections.
        return StoreUnavailable(f"the database is unavailable: {message.strip()}")
    return error


class PostgresTaskStore(TaskStore):
    migration_folders: tuple[str, ...] = ("postgres",)  # under db/migrations/, applied in this order

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float | None = None,
        statement_timeout_s: float | None = None,
        pool_size: int | None = None,
    ):
        self.url = url
        self._conninfo, self.settings = PoolSettings.split_url(
            url.removeprefix("supabase+"),
            connect_timeout_s=connect_timeout_s,
            statement_timeout_s=statement_timeout_s,
            pool_size=pool_size,
        )
        self._pool = ConnectionPool(
            self._conninfo,
            kwargs=self._connect_kwargs() | {"row_factory": dict_row},
            min_size=1,
            max_size=self.settings.pool_size,
            timeout=self.settings.connect_timeout_s,
            configure=self._configure,
            check=ConnectionPool.check_connection,  # a dropped connection is replaced, not handed out
            # While the server is away the pool retries in the background with growing pauses; giving up
            # soon keeps those pauses short, and the next call then tries again at once.
            reconnect_timeout=max(5.0, self.settings.connect_timeout_s),
            num_workers=1,
            name=f"hwgp-tasks-{id(self):x}",
            open=True,
        )
        self._listener: psycopg.Connection | None = None

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self._conninfo:  # libpq's own setting wins when the URL has one
            kwargs["connect_timeout"] = max(1, math.ceil(self.settings.connect_timeout_s))
        return kwargs

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute(f"SET statement_timeout = {int(self.settings.statement_timeout_s * 1000)}")

    # --- calling the SQL functions ----------------------------------------------------------------
    def _call(self, sql: str, args: Any = None, task_id: str | None = None) -> list[dict[str, Any]]:
        """Run one statement on a pooled connection (autocommit: the statement is its transaction)."""
        try:
            with self._pool.connection() as conn:
                cur = conn.execute(sql, args)
                return cur.fetchall() if cur.description else []
        except PoolTimeout:
            raise StoreUnavailable(
                f"no database connection within {self.settings.connect_timeout_s:g} s "
                f"({_where(self._conninfo)} unreachable or every connection busy)"
            ) from None
        except psycopg.Error as error:
            translated = store_error(error, task_id)
            if translated is error:
                raise
            raise translated from None

    def _task(self, sql: str, args: Any, task_id: str | None = None) -> Task:
        return Task.model_validate(self._call(sql, args, task_id)[0])

    def _tasks(self, sql: str, args: Any = None) -> list[Task]:
        return [Task.model_validate(r) for r in self._call(sql, args)]

    # --- TaskStore ----------------------------------------------------------------------------------
    def create(self, new: NewTask) -> Task:
        return self._task(
            "SELECT * FROM create_task(%(task_type)s, %(params)s, %(id)s, %(dependant_on)s, %(project_id)s,"
            " %(priority)s)",
            {
                "task_type": new.task_type,
                "params": Jsonb(new.params),
                "id": new.id,
                "dependant_on": new.dependant_on,
                "project_id": new.project_id,
                "priority": new.priority,
            },
        )

    def get(self, task_id: str) -> Task:
        return self._task("SELECT * FROM get_task(%s)", (task_id,), task_id)

    def _list(
        self,
        *,
        status: TaskStatus | None,
        task_type: str | None,
        project_id: str | None,
        limit: int,
        offset: int,
    ) -> list[Task]:
        return self._tasks(
            "SELECT * FROM list_tasks(%s, %s, %s, %s, %s)",
            (status.value if status is not None else None, task_type, project_id, limit, offset),
        )

    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        rows = self._call(
            "SELECT status, n FROM count_tasks_by_status(%s)",
            (list(task_types) if task_types is not None else None,),
        )
        counts = {TaskStatus(r["status"]): int(r["n"]) for r in rows}
        return {status: counts.get(status, 0) for status in TaskStatus}

    def _claim_next(self, worker_id: str, task_types: list[str] | None, limit: int) -> list[Task]:
        return self._tasks("SELECT * FROM claim_next_task(%s, %s, NULL, %s)", (worker_id, task_types, limit))

    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        return bool(self._call("SELECT heartbeat_task(%s, %s) AS ok", (task_id, worker_id))[0]["ok"])

    def _set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None) -> bool:
        rows = self._call(
            "SELECT set_task_progress(%s, %s, %s, %s) AS ok", (task_id, worker_id, progress, message)
        )
        return bool(rows[0]["ok"])

    def _complete(self, task_id: str, output_location: str, worker_id: str | None) -> Task:
        return self._task(
            "SELECT * FROM complete_task(%s, %s, %s)", (task_id, output_location, worker_id), task_id
        )

    def fail(
        self,
        task_id: str,
        error_message: str,
        *,
        worker_id: str | None = None,
        retryable: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Task:
        return self._task(
            "SELECT * FROM fail_task(%s, %s, %s, %s, %s)",
            (task_id, error_message, worker_id, retryable, max_attempts),
            task_id,
        )

    def _start(self, task_id: str, worker_id: str) -> Task:
        return self._task("SELECT * FROM start_task(%s, %s)", (task_id, worker_id), task_id)

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        rows = self._call("SELECT release_task(%s, %s, %s) AS ok", (task_id, worker_id, reason))
        return bool(rows[0]["ok"])

    def cancel(self, task_id: str) -> Task:
        return self._task("SELECT * FROM cancel_task(%s)", (task_id,), task_id)

    def requeue_stale(self, older_than_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Task]:
        return self._tasks("SELECT * FROM requeue_stale_tasks(%s, %s)", (float(older_than_s), max_attempts))

    def propagate_failures(self) -> list[Task]:
        return self._tasks("SELECT * FROM propagate_task_failures()")

    # --- schema ----------------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply the pending files of each folder in `migration_folders`, in one transaction."""
        applied: list[str] = []
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                # Several processes may open a fresh database at once; one migrates, the others wait.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('hwgp_migrate:' || current_schema()))")
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, applied_at text NOT NULL)"
                )
                done = {r["version"] for r in cur.execute("SELECT version FROM schema_migrations")}
                for version, sql in self.migrations():
                    if version in done:
                        continue
                    self._before_migration(cur, version)
                    cur.execute(sql.encode())  # bytes: sent as one multi-statement script, no parameters
                    cur.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, clock_timestamp()::text)",
                        (version,),
                    )
                    applied.append(version)
        except PoolTimeout:
            raise StoreUnavailable(
                f"no database connection within {self.settings.connect_timeout_s:g} s"
            ) from None
        except psycopg.OperationalError as error:
            raise store_error(error) from None
        return applied

    def migrations(self) -> list[tuple[str, str]]:
        """(version, sql) of every migration this store applies, in order."""
        return [m for folder in self.migration_folders for m in migration_files(folder)]

    def _before_migration(self, cur: psycopg.Cursor, version: str) -> None:
        """A hook to refuse a migration the database is not ready for."""

    # --- waiting for work ---------------------------------------------------------------------------------
    def wait_for_work(self, timeout_s: float) -> bool:
        """LISTEN on a dedicated connection. When there is none yet, or the server dropped it (a restart),
        it is opened and the call returns True at once: notifications sent while nobody listened are lost,
        so the caller should look. `StoreUnavailable` when it cannot be opened."""
        try:
            if self._listener is not None:
                try:
                    return any(True for _ in self._listener.notifies(timeout=timeout_s, stop_after=1))
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    self._close_listener()  # reopened below
            self._listener = psycopg.connect(self._conninfo, **self._connect_kwargs())
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            self._close_listener()
            raise StoreUnavailable(
                f"cannot LISTEN on {_where(self._conninfo)}: {str(error).strip().splitlines()[0]}"
            ) from None
        return True

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        self._pool.close()
        self._close_listener()


def migration_files(folder: str) -> list[tuple[str, str]]:
    """(version, sql) of `db/migrations/<folder>/*.sql` in name order; version is the file's stem."""
    files = resources.files("db").joinpath("migrations", folder).iterdir()
    return sorted((f.name.removesuffix(".sql"), f.read_text()) for f in files if f.name.endswith(".sql"))


def _where(conninfo: str) -> str:
    """host:port/db of a connection string, without credentials (for messages)."""
    return urlsplit(conninfo).netloc.rpartition("@")[2] + urlsplit(conninfo).path
