"""PostgreSQL task store (psycopg 3 + psycopg_pool): `postgresql://user@host:port/db`.

Every operation is one call of a SQL function from `db/supabase/migrations/*_task_functions.sql`
(as procrastinate's manager calls its functions), so the rules live once, in SQL. The store sends each
call over a transport: `SqlTransport` (a connection pool, here) or, in Supabase mode, the edge functions
over HTTP (`db/supabase_store.py`), which call the same SQL functions. Claims lock rows with
`FOR UPDATE SKIP LOCKED` inside one statement:
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
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from db.base import DEFAULT_MAX_ATTEMPTS, TaskStore
from db.errors import (
    InvalidTask,
    StoreUnavailable,
    TaskConflict,
    TaskForbidden,
    TaskNotFound,
    TaskStoreError,
)
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


@dataclass(frozen=True)
class Call:
    """One task operation: the SQL function call and the edge function that makes it over HTTP.

    Arguments are named as the edge function's JSON body names them, and the SQL uses the same names.
    `returns` says how the SQL rows become the answer the edge function gives (`answer_key`: the key of
    its JSON object that holds it)."""

    sql: str
    edge_function: str
    returns: Literal["row", "rows", "optional row", "ok", "counts"]
    answer_key: str | None = None


CREATE = Call(
    "SELECT * FROM create_task(%(task_type)s, %(params)s, %(task_id)s, %(dependant_on)s, %(project_id)s,"
    " %(priority)s)",
    "create-task",
    "row",
)
GET = Call("SELECT * FROM get_task(%(task_id)s)", "get-task", "row")
LIST = Call(
    "SELECT * FROM list_tasks(%(status)s, %(task_type)s, %(project_id)s, %(limit)s, %(offset)s)",
    "list-tasks",
    "rows",
)
COUNT = Call("SELECT status, n FROM count_tasks_by_status(%(task_types)s)", "count-tasks", "counts")
CLAIM = Call(
    "SELECT * FROM claim_next_task(%(worker_id)s, %(task_types)s, NULL, %(limit)s)",
    "claim-next-task",
    "rows",
    answer_key="tasks",
)
HEARTBEAT = Call("SELECT heartbeat_task(%(task_id)s, %(worker_id)s) AS ok", "heartbeat-task", "ok", "ok")
SET_PROGRESS = Call(
    "SELECT set_task_progress(%(task_id)s, %(worker_id)s, %(progress)s, %(message)s) AS ok",
    "set-task-progress",
    "ok",
    "ok",
)
COMPLETE = Call(
    "SELECT * FROM complete_task(%(task_id)s, %(output_location)s, %(worker_id)s, %(result)s,"
    " %(thumbnail_url)s)",
    "complete-task",
    "row",
)
FAIL = Call(
    "SELECT * FROM fail_task(%(task_id)s, %(error_message)s, %(worker_id)s, %(retryable)s, %(max_attempts)s)",
    "fail-task",
    "row",
)
START = Call("SELECT * FROM start_task(%(task_id)s, %(worker_id)s)", "start-task", "row")
RELEASE = Call(
    "SELECT release_task(%(task_id)s, %(worker_id)s, %(reason)s) AS ok", "release-task", "ok", "ok"
)
CANCEL = Call("SELECT * FROM cancel_task(%(task_id)s)", "cancel-task", "row")
REQUEUE_STALE = Call(
    "SELECT * FROM requeue_stale_tasks(%(older_than_s)s, %(max_attempts)s)", "requeue-stale-tasks", "rows"
)
PROPAGATE = Call("SELECT * FROM propagate_task_failures()", "propagate-failures", "rows")


class Transport(Protocol):
    """How a `PostgresTaskStore` reaches the SQL functions."""

    url: str

    def call(self, call: Call, args: dict[str, Any]) -> Any:
        """The answer of one call (see `Call.returns`), or the store's exceptions."""

    def migrate(self, migrations: list[tuple[str, str]], check: Callable[[Any, str], None]) -> list[str]:
        """Apply the pending (version, sql) migrations, calling `check(cursor, version)` before each."""

    def wait_for_work(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...


class SqlTransport:
    """The SQL functions over a pool of direct connections; see the module docstring for the settings."""

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

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection (autocommit: each statement is its transaction), errors translated."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout:
            raise StoreUnavailable(
                f"no database connection within {self.settings.connect_timeout_s:g} s "
                f"({_where(self._conninfo)} unreachable or every connection busy)"
            ) from None

    def call(self, call: Call, args: dict[str, Any]) -> Any:
        params = {k: Jsonb(v) if isinstance(v, dict) else v for k, v in args.items()}
        try:
            with self._connection() as conn:
                rows = conn.execute(call.sql, params).fetchall()
        except psycopg.Error as error:
            translated = store_error(error, args.get("task_id"))
            if translated is error:
                raise
            raise translated from None
        if call.returns == "row":
            return rows[0]
        if call.returns == "optional row":
            return rows[0] if rows else None
        if call.returns == "ok":
            return rows[0]["ok"]
        if call.returns == "counts":
            return {r["status"]: r["n"] for r in rows}
        return rows

    def migrate(self, migrations: list[tuple[str, str]], check: Callable[[Any, str], None]) -> list[str]:
        applied: list[str] = []
        try:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                # Several processes may open a fresh database at once; one migrates, the others wait.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('hwgp_migrate:' || current_schema()))")
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, applied_at text NOT NULL)"
                )
                done = {r["version"] for r in cur.execute("SELECT version FROM schema_migrations")}
                # A Supabase project records what `supabase db push` applied in its own table (version =
                # the file's timestamp, schema public): those count as applied, and what hwgp applies is recorded there too.
                supabase_cli = cur.execute(
                    "SELECT to_regclass('supabase_migrations.schema_migrations') IS NOT NULL"
                    " AND current_schema() = 'public' AS present"
                ).fetchone()["present"]
                if supabase_cli:
                    done |= {
                        f"{r['version']}_{r['name']}"
                        for r in cur.execute(
                            "SELECT version, name FROM supabase_migrations.schema_migrations"
                        )
                    }
                for version, sql in migrations:
                    if version in done:
                        continue
                    check(cur, version)
                    cur.execute(sql.encode())  # bytes: sent as one multi-statement script, no parameters
                    cur.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, clock_timestamp()::text)",
                        (version,),
                    )
                    if supabase_cli:
                        timestamp, _, name = version.partition("_")
                        cur.execute(
                            "INSERT INTO supabase_migrations.schema_migrations (version, name, statements)"
                            " VALUES (%s, %s, ARRAY[%s]) ON CONFLICT (version) DO NOTHING",
                            (timestamp, name, sql),
                        )
                    applied.append(version)
        except psycopg.OperationalError as error:
            raise store_error(error) from None
        return applied

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


class PostgresTaskStore(TaskStore):
    """Every `TaskStore` operation as one call of a SQL function, over `transport`."""

    def __init__(self, url: str, *, transport: Transport | None = None, **pool_settings: Any):
        """`pool_settings`: `connect_timeout_s`, `statement_timeout_s`, `pool_size` (see `PoolSettings`)."""
        self.transport = transport or SqlTransport(url, **pool_settings)
        self.url = self.transport.url

    @property
    def settings(self) -> PoolSettings:
        """The pool's settings (SQL transport only)."""
        if not isinstance(self.transport, SqlTransport):
            raise AttributeError(f"{type(self.transport).__name__} has no connection pool")
        return self.transport.settings

    def _task(self, call: Call, **args: Any) -> Task:
        return Task.model_validate(self.transport.call(call, args))

    def _tasks(self, call: Call, **args: Any) -> list[Task]:
        return [Task.model_validate(row) for row in self.transport.call(call, args)]

    # --- TaskStore ----------------------------------------------------------------------------------
    def create(self, new: NewTask) -> Task:
        return self._task(
            CREATE,
            task_id=new.id,
            task_type=new.task_type,
            params=new.params,
            dependant_on=new.dependant_on,
            project_id=new.project_id,
            priority=new.priority,
        )

    def get(self, task_id: str) -> Task:
        return self._task(GET, task_id=task_id)

    def _list(
        self,
        *,
        status: TaskStatus | None,
        task_type: str | None,
        project_id: str | None,
        limit: int,
        offset: int,
    ) -> list[Task]:
        status_value = status.value if status is not None else None
        return self._tasks(
            LIST, status=status_value, task_type=task_type, project_id=project_id, limit=limit, offset=offset
        )

    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        types = list(task_types) if task_types is not None else None
        counts = {TaskStatus(k): int(v) for k, v in self.transport.call(COUNT, {"task_types": types}).items()}
        return {status: counts.get(status, 0) for status in TaskStatus}

    def _claim_next(self, worker_id: str, task_types: list[str] | None, limit: int) -> list[Task]:
        return self._tasks(CLAIM, worker_id=worker_id, task_types=task_types, limit=limit)

    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        return bool(self.transport.call(HEARTBEAT, {"task_id": task_id, "worker_id": worker_id}))

    def _set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None) -> bool:
        args = {"task_id": task_id, "worker_id": worker_id, "progress": progress, "message": message}
        return bool(self.transport.call(SET_PROGRESS, args))

    def _complete(
        self,
        task_id: str,
        output_location: str,
        worker_id: str | None,
        result: dict[str, Any] | None,
        thumbnail_url: str | None,
    ) -> Task:
        return self._task(
            COMPLETE,
            task_id=task_id,
            output_location=output_location,
            worker_id=worker_id,
            result=result,
            thumbnail_url=thumbnail_url,
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
            FAIL,
            task_id=task_id,
            error_message=error_message,
            worker_id=worker_id,
            retryable=retryable,
            max_attempts=max_attempts,
        )

    def _start(self, task_id: str, worker_id: str) -> Task:
        return self._task(START, task_id=task_id, worker_id=worker_id)

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        return bool(
            self.transport.call(RELEASE, {"task_id": task_id, "worker_id": worker_id, "reason": reason})
        )

    def cancel(self, task_id: str) -> Task:
        return self._task(CANCEL, task_id=task_id)

    def requeue_stale(self, older_than_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Task]:
        return self._tasks(REQUEUE_STALE, older_than_s=float(older_than_s), max_attempts=max_attempts)

    def propagate_failures(self) -> list[Task]:
        return self._tasks(PROPAGATE)

    def wait_for_work(self, timeout_s: float) -> bool:
        return self.transport.wait_for_work(timeout_s)

    def migrate(self) -> list[str]:
        """Apply the pending migrations of `migrations()`, in one transaction."""
        return self.transport.migrate(self.migrations(), self._before_migration)

    def migrations(self) -> list[tuple[str, str]]:
        """(version, sql) of every migration this store applies, in order: the plain PostgreSQL ones."""
        return [(v, sql) for v, sql in migration_files() if not is_supabase_only(v)]

    def _before_migration(self, cur: psycopg.Cursor, version: str) -> None:
        """A hook to refuse a migration the database is not ready for."""

    def close(self) -> None:
        self.transport.close()


# Every PostgreSQL migration lives once, in the Supabase CLI project's folder, named as the CLI wants
# them (`<timestamp>_<name>.sql`), so `supabase db push` applies the same files in the same order.
# Those named `<timestamp>_supabase_<name>.sql` need Supabase's roles and `auth.uid()`: only the
# Supabase store applies them; the plain PostgreSQL store applies the others.
MIGRATIONS = ("supabase", "migrations")  # under the `db` package
MIGRATION_NAME = re.compile(r"^(?P<version>[0-9]{14})_(?P<name>[a-z0-9_]+)$")


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) of `db/supabase/migrations/*.sql` in name order; version is the file's stem."""
    files = resources.files("db").joinpath(*MIGRATIONS).iterdir()
    found = sorted((f.name.removesuffix(".sql"), f.read_text()) for f in files if f.name.endswith(".sql"))
    for version, _ in found:
        if not MIGRATION_NAME.match(version):
            raise TaskStoreError(
                f"db/supabase/migrations/{version}.sql: migrations are named <14-digit timestamp>_<name>.sql "
                "(what `supabase migration new` creates), so the Supabase CLI applies them in the same order"
            )
    return found


def is_supabase_only(version: str) -> bool:
    """Whether a migration needs a Supabase database (roles, `auth.uid()`)."""
    return MIGRATION_NAME.match(version)["name"].startswith("supabase_")


def _where(conninfo: str) -> str:
    """host:port/db of a connection string, without credentials (for messages)."""
    return urlsplit(conninfo).netloc.rpartition("@")[2] + urlsplit(conninfo).path
