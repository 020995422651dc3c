"""The SQL behind both task stores, written once.

Statements use `:name` parameters and a few `{placeholders}` (the clock, the lock clause, the type
filter) that each dialect fills in. Everything that decides what a task's status may become is here,
so SQLite and PostgreSQL cannot drift apart.
"""

from __future__ import annotations

import abc
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from importlib import resources
from typing import Any

from db.models import NewTask, Task, TaskStatus
from db.store import (
    DEFAULT_MAX_ATTEMPTS,
    InvalidTask,
    TaskConflict,
    TaskNotFound,
    TaskStore,
)

COLUMNS = (
    "id, task_type, params, status, dependant_on, project_id, priority, output_location, error_message, "
    "worker_id, attempts, progress, progress_message, created_at, updated_at, heartbeat_at, "
    "generation_started_at, generation_processed_at"
)
RETURNING = "RETURNING " + ", ".join(f"tasks.{c.strip()}" for c in COLUMNS.split(","))
MAX_MESSAGE = 4000

# Queued tasks whose dependency failed, was cancelled or does not exist, and (transitively) their
# queued dependants. The depth cap stops a cycle written directly into the table from looping.
_DOOMED = """
WITH RECURSIVE doomed(id, task_type, message, depth) AS (
    SELECT t.id, t.task_type,
           CASE WHEN d.id IS NULL THEN 'dependency ' || t.dependant_on || ' does not exist'
                WHEN d.status = 'Cancelled' THEN 'dependency ' || d.id || ' (' || d.task_type || ') was cancelled'
                ELSE 'dependency ' || d.id || ' (' || d.task_type || ') failed: '
                     || coalesce(d.error_message, 'no error message')
           END,
           0
    FROM tasks t LEFT JOIN tasks d ON d.id = t.dependant_on
    WHERE t.status = 'Queued' AND t.dependant_on IS NOT NULL
      AND (d.id IS NULL OR d.status IN ('Failed', 'Cancelled'))
    UNION ALL
    SELECT t.id, t.task_type,
           substr('dependency ' || doomed.id || ' (' || doomed.task_type || ') failed: ' || doomed.message, 1, 4000),
           doomed.depth + 1
    FROM tasks t JOIN doomed ON t.dependant_on = doomed.id
    WHERE t.status = 'Queued' AND doomed.depth < 100
)
UPDATE tasks
SET status = 'Failed', error_message = doomed.message, output_location = doomed.message,
    worker_id = NULL, generation_processed_at = {now}, updated_at = {now}
FROM doomed
WHERE tasks.id = doomed.id AND tasks.status = 'Queued'
"""


class SqlTaskStore(TaskStore):
    """`TaskStore` over a DB-API connection; subclasses supply the connection and the dialect."""

    # Dialect pieces, set by subclasses.
    now_sql: str
    lock_sql: str  # row locking for the claim subquery ("" where the database serialises writers)
    insertion_order_sql: str  # tie-break for equal created_at
    migrations_dir: str  # folder under db/migrations/

    # --- what subclasses provide -------------------------------------------------------------
    @abc.abstractmethod
    def _transaction(self) -> AbstractContextManager[Any]:
        """A context manager yielding a cursor inside one transaction (write-locked where needed)."""

    @abc.abstractmethod
    def _execute(self, cur: Any, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run one statement with `:name` parameters; return the rows as dicts."""

    @abc.abstractmethod
    def _types_filter(self, column: str) -> str:
        """SQL testing `column` against the `:task_types` parameter (a list)."""

    @abc.abstractmethod
    def _encode_types(self, task_types: list[str]) -> Any: ...

    @abc.abstractmethod
    def _encode_params(self, params: dict[str, Any]) -> Any: ...

    @abc.abstractmethod
    def _cutoff_sql(self) -> str:
        """SQL for `now - :older_than_s seconds`."""

    @abc.abstractmethod
    def _apply_migration(self, cur: Any, sql: str) -> None: ...

    @abc.abstractmethod
    def _migration_lock(self, cur: Any) -> None:
        """Serialise concurrent `migrate()` calls from several processes."""

    # --- helpers ---------------------------------------------------------------------------------
    def _sql(self, template: str, **extra: str) -> str:
        return template.format(now=self.now_sql, **extra)

    def _one(self, rows: list[dict[str, Any]]) -> Task | None:
        return task_from_row(rows[0]) if rows else None

    def _get_in(self, cur: Any, task_id: str) -> Task:
        rows = self._execute(cur, f"SELECT {COLUMNS} FROM tasks WHERE id = :id", {"id": task_id})
        if not rows:
            raise TaskNotFound(task_id)
        return task_from_row(rows[0])

    def _propagate_in(self, cur: Any) -> list[Task]:
        rows = self._execute(cur, self._sql(_DOOMED) + RETURNING)
        return [task_from_row(r) for r in rows]

    def _conflict(self, cur: Any, task_id: str, action: str, worker_id: str | None = None) -> TaskConflict:
        task = self._get_in(cur, task_id)
        if worker_id is not None and task.status == TaskStatus.IN_PROGRESS and task.worker_id != worker_id:
            return TaskConflict(
                f"cannot {action} task {task_id}: it is claimed by worker {task.worker_id!r}, not {worker_id!r}"
            )
        return TaskConflict(f"cannot {action} task {task_id}: it is {task.status.value}")

    # --- TaskStore ---------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        applied: list[str] = []
        files = sorted(
            (
                f
                for f in resources.files("db").joinpath("migrations", self.migrations_dir).iterdir()
                if f.name.endswith(".sql")
            ),
            key=lambda f: f.name,
        )
        with self._transaction() as cur:
            self._migration_lock(cur)
            self._execute(
                cur,
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
            )
            done = {r["version"] for r in self._execute(cur, "SELECT version FROM schema_migrations")}
            for f in files:
                version = f.name.removesuffix(".sql")
                if version in done:
                    continue
                self._apply_migration(cur, f.read_text())
                self._execute(
                    cur,
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (:v, :at)",
                    {"v": version, "at": _utc_now_text()},
                )
                applied.append(version)
        return applied

    def create(self, new: NewTask) -> Task:
        task_id = new.id or str(uuid.uuid4())
        with self._transaction() as cur:
            if self._execute(cur, "SELECT 1 AS x FROM tasks WHERE id = :id", {"id": task_id}):
                raise InvalidTask("id", f"a task with id {task_id} already exists")
            if new.dependant_on is not None and not self._execute(
                cur, "SELECT 1 AS x FROM tasks WHERE id = :id", {"id": new.dependant_on}
            ):
                raise InvalidTask("dependant_on", f"no task with id {new.dependant_on!r}")
            self._execute(
                cur,
                "INSERT INTO tasks (id, task_type, params, status, dependant_on, project_id, priority) "
                "VALUES (:id, :task_type, :params, 'Queued', :dependant_on, :project_id, :priority)",
                {
                    "id": task_id,
                    "task_type": new.task_type,
                    "params": self._encode_params(new.params),
                    "dependant_on": new.dependant_on,
                    "project_id": new.project_id,
                    "priority": new.priority,
                },
            )
            if new.dependant_on is not None:
                # A dependency that already failed fails the new task at once.
                self._propagate_in(cur)
            return self._get_in(cur, task_id)

    def get(self, task_id: str) -> Task:
        with self._transaction() as cur:
            return self._get_in(cur, task_id)

    def list(
        self,
        *,
        status: TaskStatus | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Task]:
        if not 1 <= limit <= 10_000:
            raise InvalidTask("limit", "must be between 1 and 10000")
        if offset < 0:
            raise InvalidTask("offset", "must be 0 or more")
        where, args = [], {"limit": limit, "offset": offset}
        for column, value in (("status", status), ("task_type", task_type), ("project_id", project_id)):
            if value is not None:
                where.append(f"{column} = :{column}")
                args[column] = str(value.value if isinstance(value, TaskStatus) else value)
        sql = f"SELECT {COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at DESC, {self.insertion_order_sql} DESC LIMIT :limit OFFSET :offset"
        with self._transaction() as cur:
            return [task_from_row(r) for r in self._execute(cur, sql, args)]

    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        sql, args = "SELECT status, count(*) AS n FROM tasks", {}
        if task_types is not None:
            sql += " WHERE " + self._types_filter("task_type")
            args["task_types"] = self._encode_types(list(task_types))
        sql += " GROUP BY status"
        with self._transaction() as cur:
            counts = {TaskStatus(r["status"]): int(r["n"]) for r in self._execute(cur, sql, args)}
        return {status: counts.get(status, 0) for status in TaskStatus}

    def claim_next(
        self, worker_id: str, task_types: Iterable[str] | None = None, limit: int = 1
    ) -> list[Task]:
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        if limit < 1:
            return []
        args: dict[str, Any] = {"worker_id": worker_id, "limit": limit}
        type_filter = ""
        if task_types is not None:
            types = sorted(set(task_types))
            if not types:
                return []
            type_filter = "AND " + self._types_filter("t.task_type")
            args["task_types"] = self._encode_types(types)
        sql = self._sql(
            """
            WITH next AS MATERIALIZED (
                SELECT t.id FROM tasks t LEFT JOIN tasks d ON d.id = t.dependant_on
                WHERE t.status = 'Queued' AND (t.dependant_on IS NULL OR d.status = 'Complete')
                {type_filter}
                ORDER BY t.priority DESC, t.created_at ASC, {order}
                LIMIT :limit
                {lock}
            )
            UPDATE tasks
            SET status = 'In Progress', worker_id = :worker_id, attempts = attempts + 1,
                heartbeat_at = {now}, generation_started_at = {now}, updated_at = {now},
                progress = 0, progress_message = NULL, error_message = NULL
            FROM next
            WHERE tasks.id = next.id AND tasks.status = 'Queued'
            """,
            type_filter=type_filter,
            order="t." + self.insertion_order_sql,
            lock=self.lock_sql,
        )
        with self._transaction() as cur:
            tasks = [task_from_row(r) for r in self._execute(cur, sql + RETURNING, args)]
        # RETURNING order is unspecified: hand tasks out in claim order.
        tasks.sort(key=lambda t: (-t.priority, t.created_at))
        return tasks

    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        sql = self._sql(
            "UPDATE tasks SET heartbeat_at = {now}, updated_at = {now} "
            "WHERE id = :id AND worker_id = :worker_id AND status = 'In Progress' "
        )
        with self._transaction() as cur:
            return bool(
                self._execute(cur, sql + "RETURNING tasks.id", {"id": task_id, "worker_id": worker_id})
            )

    def set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None = None) -> bool:
        if not 0.0 <= progress <= 1.0:
            raise InvalidTask("progress", f"must be between 0 and 1, got {progress}")
        sql = self._sql(
            "UPDATE tasks SET progress = :progress, progress_message = :message, "
            "heartbeat_at = {now}, updated_at = {now} "
            "WHERE id = :id AND worker_id = :worker_id AND status = 'In Progress' "
        )
        args = {"id": task_id, "worker_id": worker_id, "progress": progress, "message": _clip(message)}
        with self._transaction() as cur:
            return bool(self._execute(cur, sql + "RETURNING tasks.id", args))

    def complete(self, task_id: str, output_location: str, worker_id: str | None = None) -> Task:
        if not output_location:
            raise InvalidTask("output_location", "must not be empty")
        sql = self._sql(
            "UPDATE tasks SET status = 'Complete', output_location = :output_location, error_message = NULL, "
            "progress = 1, generation_processed_at = {now}, updated_at = {now} "
            "WHERE id = :id AND status = 'In Progress' AND (CAST(:worker_id AS TEXT) IS NULL OR worker_id = :worker_id) "
        )
        args = {"id": task_id, "output_location": output_location, "worker_id": worker_id}
        with self._transaction() as cur:
            task = self._one(self._execute(cur, sql + RETURNING, args))
            if task is None:
                raise self._conflict(cur, task_id, "complete", worker_id)
            return task

    def fail(
        self,
        task_id: str,
        error_message: str,
        *,
        worker_id: str | None = None,
        retryable: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Task:
        message = _clip(error_message) or "failed without an error message"
        # A retryable failure with attempts left goes back to the queue, keeping the last error for the record.
        sql = self._sql(
            """
            UPDATE tasks SET
                status = CASE WHEN :retryable AND attempts < :max_attempts THEN 'Queued' ELSE 'Failed' END,
                output_location = CASE WHEN :retryable AND attempts < :max_attempts THEN NULL ELSE :message END,
                generation_processed_at = CASE WHEN :retryable AND attempts < :max_attempts
                                               THEN NULL ELSE {now} END,
                worker_id = CASE WHEN :retryable AND attempts < :max_attempts THEN NULL ELSE worker_id END,
                error_message = :message, updated_at = {now}
            WHERE id = :id
              AND ((CAST(:worker_id AS TEXT) IS NULL AND status IN ('Queued', 'In Progress'))
                   OR (status = 'In Progress' AND worker_id = :worker_id))
            """
        )
        args = {
            "id": task_id,
            "message": message,
            "worker_id": worker_id,
            "retryable": retryable,
            "max_attempts": max_attempts,
        }
        with self._transaction() as cur:
            task = self._one(self._execute(cur, sql + RETURNING, args))
            if task is None:
                raise self._conflict(cur, task_id, "fail", worker_id)
            if task.status == TaskStatus.FAILED:
                self._propagate_in(cur)
            return task

    def start(self, task_id: str, worker_id: str) -> Task:
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        sql = self._sql(
            "UPDATE tasks SET status = 'In Progress', worker_id = :worker_id, attempts = attempts + 1, "
            "heartbeat_at = {now}, generation_started_at = {now}, updated_at = {now}, progress = 0, "
            "progress_message = NULL, error_message = NULL, output_location = NULL, generation_processed_at = NULL "
            "WHERE id = :id AND status <> 'Complete' "
        )
        with self._transaction() as cur:
            task = self._one(self._execute(cur, sql + RETURNING, {"id": task_id, "worker_id": worker_id}))
            if task is None:
                raise self._conflict(cur, task_id, "start")
            return task

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        sql = self._sql(
            "UPDATE tasks SET status = 'Queued', worker_id = NULL, heartbeat_at = NULL, progress = 0, "
            "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, "
            "progress_message = :reason, updated_at = {now} "
            "WHERE id = :id AND worker_id = :worker_id AND status = 'In Progress' "
        )
        args = {"id": task_id, "worker_id": worker_id, "reason": _clip(reason)}
        with self._transaction() as cur:
            return bool(self._execute(cur, sql + "RETURNING tasks.id", args))

    def cancel(self, task_id: str) -> Task:
        sql = self._sql(
            "UPDATE tasks SET status = 'Cancelled', error_message = 'cancelled', "
            "generation_processed_at = {now}, updated_at = {now} "
            "WHERE id = :id AND status IN ('Queued', 'In Progress') "
        )
        with self._transaction() as cur:
            task = self._one(self._execute(cur, sql + RETURNING, {"id": task_id}))
            if task is None:
                raise self._conflict(cur, task_id, "cancel")
            self._propagate_in(cur)
            return task

    def requeue_stale(self, older_than_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Task]:
        stale = f"status = 'In Progress' AND coalesce(heartbeat_at, updated_at) < {self._cutoff_sql()}"
        give_up = self._sql(
            "UPDATE tasks SET status = 'Failed', "
            "error_message = 'worker ' || coalesce(worker_id, '?') || ' stopped heartbeating; gave up after ' "
            "|| attempts || ' attempts', "
            "output_location = 'worker ' || coalesce(worker_id, '?') || ' stopped heartbeating; gave up after ' "
            "|| attempts || ' attempts', "
            "generation_processed_at = {now}, updated_at = {now} "
            f"WHERE {stale} AND attempts >= :max_attempts "
        )
        retry = self._sql(
            "UPDATE tasks SET status = 'Queued', "
            "progress_message = 'requeued: worker ' || coalesce(worker_id, '?') || ' stopped heartbeating', "
            "worker_id = NULL, heartbeat_at = NULL, progress = 0, updated_at = {now} "
            f"WHERE {stale} "
        )
        args = {"older_than_s": float(older_than_s), "max_attempts": max_attempts}
        with self._transaction() as cur:
            changed = [task_from_row(r) for r in self._execute(cur, give_up + RETURNING, args)]
            changed += [task_from_row(r) for r in self._execute(cur, retry + RETURNING, args)]
            changed += self._propagate_in(cur)
        return changed

    def propagate_failures(self) -> list[Task]:
        with self._transaction() as cur:
            return self._propagate_in(cur)


def task_from_row(row: Mapping[str, Any]) -> Task:
    data = dict(row)
    if isinstance(data.get("params"), str | bytes):
        data["params"] = json.loads(data["params"] or "{}")
    if data.get("params") is None:
        data["params"] = {}
    return Task.model_validate(data)


def _clip(message: str | None) -> str | None:
    if message is None:
        return None
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def _utc_now_text() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()
