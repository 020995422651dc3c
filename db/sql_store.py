"""SQLite's task rules: what each operation does to the tasks table, in SQLite's SQL.

PostgreSQL's rules are SQL functions (`db/supabase/migrations/*_task_functions.sql`); the shared
behaviour suite (tests/test_store.py) holds both to one behaviour. The connection, its locking and
the waiting live in `db/sqlite.py`.
"""

from __future__ import annotations

import abc
import json
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from db.base import DEFAULT_MAX_ATTEMPTS, TaskStore
from db.errors import InvalidTask, TaskConflict, TaskNotFound
from db.models import NewTask, Task, TaskStatus
from db.thumbnails import params_with_thumbnail_url

COLUMNS = (
    "id, task_type, params, status, dependant_on, project_id, priority, output_location, error_message, "
    "worker_id, attempts, progress, progress_message, created_at, updated_at, heartbeat_at, "
    "generation_started_at, generation_processed_at, result"
)
RETURNING = "RETURNING " + ", ".join(f"tasks.{c.strip()}" for c in COLUMNS.split(","))
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
MAX_MESSAGE = 4000

# One step of failure propagation: queued tasks whose dependency failed, was cancelled or does not exist
# fail with a message naming it. Repeated until nothing changes, it reaches dependants of dependants.
_FAIL_ORPHANS = f"""
UPDATE tasks SET status = 'Failed', error_message = orphan.message, output_location = orphan.message,
                 worker_id = NULL, generation_processed_at = {NOW}, updated_at = {NOW}
FROM (
    SELECT t.id, substr(CASE WHEN d.id IS NULL THEN 'dependency ' || t.dependant_on || ' does not exist'
                             WHEN d.status = 'Cancelled' THEN 'dependency ' || d.id || ' (' || d.task_type
                                                              || ') was cancelled'
                             ELSE 'dependency ' || d.id || ' (' || d.task_type || ') failed: '
                                  || coalesce(d.error_message, 'no error message') END, 1, {MAX_MESSAGE}) AS message
    FROM tasks t LEFT JOIN tasks d ON d.id = t.dependant_on
    WHERE t.status = 'Queued' AND t.dependant_on IS NOT NULL AND (d.id IS NULL OR d.status IN ('Failed', 'Cancelled'))
) AS orphan
WHERE tasks.id = orphan.id
{RETURNING}
"""


class SqlTaskStore(TaskStore):
    """`TaskStore` over a SQLite connection that a subclass provides."""

    @abc.abstractmethod
    def _write(self) -> AbstractContextManager[Any]:
        """A cursor inside one transaction holding the write lock from its start."""

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Any]:
        """A cursor inside one read transaction: a consistent snapshot, never the write lock."""

    @abc.abstractmethod
    def _execute(self, cur: Any, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run one statement with `:name` parameters; return the rows as dicts."""

    # --- helpers ---------------------------------------------------------------------------------
    def _one(self, rows: list[dict[str, Any]]) -> Task | None:
        return task_from_row(rows[0]) if rows else None

    def _get_in(self, cur: Any, task_id: str) -> Task:
        rows = self._execute(cur, f"SELECT {COLUMNS} FROM tasks WHERE id = :id", {"id": task_id})
        if not rows:
            raise TaskNotFound(task_id)
        return task_from_row(rows[0])

    def _propagate_in(self, cur: Any) -> list[Task]:
        failed: list[Task] = []
        while step := [task_from_row(r) for r in self._execute(cur, _FAIL_ORPHANS)]:
            failed += step
        return failed

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
                for f in resources.files("db").joinpath("migrations", "sqlite").iterdir()
                if f.name.endswith(".sql")
            ),
            key=lambda f: f.name,
        )
        with self._write() as cur:
            self._execute(
                cur,
                "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
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
                    {"v": version, "at": datetime.now(UTC).isoformat()},
                )
                applied.append(version)
        return applied

    @abc.abstractmethod
    def _apply_migration(self, cur: Any, sql: str) -> None: ...

    def create(self, new: NewTask) -> Task:
        task_id = new.id or str(uuid.uuid4())
        with self._write() as cur:
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
                    "params": json.dumps(new.params),
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
        with self._read() as cur:
            return self._get_in(cur, task_id)

    def _list(
        self,
        *,
        status: TaskStatus | None,
        task_type: str | None,
        project_id: str | None,
        limit: int,
        offset: int,
    ) -> list[Task]:
        where, args = [], {"limit": limit, "offset": offset}
        for column, value in (("status", status), ("task_type", task_type), ("project_id", project_id)):
            if value is not None:
                where.append(f"{column} = :{column}")
                args[column] = str(value.value if isinstance(value, TaskStatus) else value)
        sql = f"SELECT {COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT :limit OFFSET :offset"
        with self._read() as cur:
            return [task_from_row(r) for r in self._execute(cur, sql, args)]

    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        sql, args = "SELECT status, count(*) AS n FROM tasks", {}
        if task_types is not None:
            sql += " WHERE task_type IN (SELECT value FROM json_each(:task_types))"
            args["task_types"] = json.dumps(list(task_types))
        sql += " GROUP BY status"
        with self._read() as cur:
            counts = {TaskStatus(r["status"]): int(r["n"]) for r in self._execute(cur, sql, args)}
        return {status: counts.get(status, 0) for status in TaskStatus}

    def _claim_next(self, worker_id: str, task_types: list[str] | None, limit: int) -> list[Task]:
        args: dict[str, Any] = {"worker_id": worker_id, "limit": limit}
        type_filter = ""
        if task_types is not None:
            type_filter = "AND t.task_type IN (SELECT value FROM json_each(:task_types))"
            args["task_types"] = json.dumps(task_types)
        # The write transaction holds SQLite's write lock: no other claimer runs between select and update.
        sql = f"""
            WITH next AS MATERIALIZED (
                SELECT t.id FROM tasks t LEFT JOIN tasks d ON d.id = t.dependant_on
                WHERE t.status = 'Queued' AND (t.dependant_on IS NULL OR d.status = 'Complete') {type_filter}
                ORDER BY t.priority DESC, t.created_at ASC, t.rowid
                LIMIT :limit
            )
            UPDATE tasks
            SET status = 'In Progress', worker_id = :worker_id, attempts = attempts + 1,
                heartbeat_at = {NOW}, generation_started_at = {NOW}, updated_at = {NOW},
                progress = 0, progress_message = NULL, error_message = NULL
            FROM next
            WHERE tasks.id = next.id AND tasks.status = 'Queued'
            {RETURNING}
        """
        with self._write() as cur:
            tasks = [task_from_row(r) for r in self._execute(cur, sql, args)]
        # RETURNING order is unspecified: hand tasks out in claim order.
        tasks.sort(key=lambda t: (-t.priority, t.created_at))
        return tasks

    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        sql = (
            f"UPDATE tasks SET heartbeat_at = {NOW}, updated_at = {NOW} "
            "WHERE id = :id AND worker_id = :worker_id AND status = 'In Progress' RETURNING tasks.id"
        )
        with self._write() as cur:
            return bool(self._execute(cur, sql, {"id": task_id, "worker_id": worker_id}))

    def _set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None) -> bool:
        sql = (
            "UPDATE tasks SET progress = :progress, progress_message = :message, "
            f"heartbeat_at = {NOW}, updated_at = {NOW} "
            "WHERE id = :id AND worker_id = :worker_id AND status = 'In Progress' RETURNING tasks.id"
        )
        args = {"id": task_id, "worker_id": worker_id, "progress": progress, "message": _clip(message)}
        with self._write() as cur:
            return bool(self._execute(cur, sql, args))

    def _complete(
        self,
        task_id: str,
        output_location: str,
        worker_id: str | None,
        result: dict[str, Any] | None,
        thumbnail_url: str | None,
    ) -> Task:
        sql = (
            "UPDATE tasks SET status = 'Complete', output_location = :output_location, error_message = NULL, "
            "result = :result, params = coalesce(:params, params), "
            f"progress = 1, generation_processed_at = {NOW}, updated_at = {NOW} "
            "WHERE id = :id AND status = 'In Progress' AND (:worker_id IS NULL OR worker_id = :worker_id) "
        )
        args = {
            "id": task_id,
            "output_location": output_location,
            "worker_id": worker_id,
            "result": json.dumps(result) if result is not None else None,
            "params": None,
        }
        with self._write() as cur:  # one write transaction: the params read here are the ones replaced
            if thumbnail_url is not None:
                rows = self._execute(
                    cur, "SELECT task_type, params FROM tasks WHERE id = :id", {"id": task_id}
                )
                if rows:
                    params = params_with_thumbnail_url(
                        rows[0]["task_type"], _json_or_none(rows[0]["params"]), thumbnail_url
                    )
                    args["params"] = json.dumps(params)
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
        sql = f"""
            UPDATE tasks SET
                status = CASE WHEN :retryable AND attempts < :max_attempts THEN 'Queued' ELSE 'Failed' END,
                output_location = CASE WHEN :retryable AND attempts < :max_attempts THEN NULL ELSE :message END,
                generation_processed_at = CASE WHEN :retryable AND attempts < :max_attempts THEN NULL ELSE {NOW} END,
                worker_id = CASE WHEN :retryable AND attempts < :max_attempts THEN NULL ELSE worker_id END,
                error_message = :message, updated_at = {NOW}
            WHERE id = :id
              AND ((:worker_id IS NULL AND status IN ('Queued', 'In Progress'))
                   OR (status = 'In Progress' AND worker_id = :worker_id))
            {RETURNING}
        """
        args = {
            "id": task_id,
            "message": message,
            "worker_id": worker_id,
            "retryable": retryable,
            "max_attempts": max_attempts,
        }
        with self._write() as cur:
            task = self._one(self._execute(cur, sql, args))
            if task is None:
                raise self._conflict(cur, task_id, "fail", worker_id)
            if task.status == TaskStatus.FAILED:
                self._propagate_in(cur)
            return task

    def _start(self, task_id: str, worker_id: str) -> Task:
        sql = (
            "UPDATE tasks SET status = 'In Progress', worker_id = :worker_id, attempts = attempts + 1, "
            f"heartbeat_at = {NOW}, generation_started_at = {NOW}, updated_at = {NOW}, progress = 0, "
            "progress_message = NULL, error_message = NULL, output_location = NULL, generation_processed_at = NULL "
            "WHERE id = :id AND status <> 'Complete' "
        )
        with self._write() as cur:
            task = self._one(self._execute(cur, sql + RETURNING, {"id": task_id, "worker_id": worker_id}))
            if task is None:
                raise self._conflict(cur, task_id, "start")
            return task

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        sql = (
            "UPDATE tasks SET status = 'Queued', worker_id = NULL, heartbeat_at = NULL, progress = 0, "
            f"attempts = max(attempts - 1, 0), progress_message = :reason, updated_at = {NOW} "
            "WHERE id = :id AND worker_id = :worker_id AND status = 'In Progress' RETURNING tasks.id"
        )
        args = {"id": task_id, "worker_id": worker_id, "reason": _clip(reason)}
        with self._write() as cur:
            return bool(self._execute(cur, sql, args))

    def cancel(self, task_id: str) -> Task:
        sql = (
            "UPDATE tasks SET status = 'Cancelled', error_message = 'cancelled', "
            f"generation_processed_at = {NOW}, updated_at = {NOW} "
            "WHERE id = :id AND status IN ('Queued', 'In Progress') "
        )
        with self._write() as cur:
            task = self._one(self._execute(cur, sql + RETURNING, {"id": task_id}))
            if task is None:
                raise self._conflict(cur, task_id, "cancel")
            self._propagate_in(cur)
            return task

    def requeue_stale(self, older_than_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Task]:
        cutoff = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || :older_than_s || ' seconds')"
        stale = f"status = 'In Progress' AND coalesce(heartbeat_at, updated_at) < {cutoff}"
        gave_up = "'worker ' || coalesce(worker_id, '?') || ' stopped heartbeating; gave up after ' || attempts || ' attempts'"
        give_up = (
            f"UPDATE tasks SET status = 'Failed', error_message = {gave_up}, output_location = {gave_up}, "
            f"generation_processed_at = {NOW}, updated_at = {NOW} "
            f"WHERE {stale} AND attempts >= :max_attempts {RETURNING}"
        )
        retry = (
            "UPDATE tasks SET status = 'Queued', "
            "progress_message = 'requeued: worker ' || coalesce(worker_id, '?') || ' stopped heartbeating', "
            f"worker_id = NULL, heartbeat_at = NULL, progress = 0, updated_at = {NOW} "
            f"WHERE {stale} {RETURNING}"
        )
        args = {"older_than_s": float(older_than_s), "max_attempts": max_attempts}
        with self._write() as cur:
            changed = [task_from_row(r) for r in self._execute(cur, give_up, args)]
            changed += [task_from_row(r) for r in self._execute(cur, retry, args)]
            changed += self._propagate_in(cur)
        return changed

    def propagate_failures(self) -> list[Task]:
        with self._write() as cur:
            return self._propagate_in(cur)


def task_from_row(row: Mapping[str, Any]) -> Task:
    data = dict(row)
    data["params"] = json.loads(data.get("params") or "{}")
    data["result"] = json.loads(data["result"]) if data.get("result") else None
    return Task.model_validate(data)


def _clip(message: str | None) -> str | None:
    if message is None:
        return None
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def _json_or_none(text: str | None) -> Any:
    """A stored JSON column's value; None when it is not valid JSON (a row written by hand)."""
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None
