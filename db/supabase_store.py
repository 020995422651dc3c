"""Supabase mode: the tasks table of a Supabase project, through either of two transports.

* `SupabaseDirectStore` — a direct PostgreSQL connection (`supabase+postgresql://…`), for service-role
  workers inside the database's network. Every operation is one call of the SQL functions in
  `db/supabase/migrations/0002_task_functions.sql`, the same functions the edge functions call, so the
  claim / complete / fail rules exist once in SQL for both transports.
* `SupabaseHttpStore` — the edge functions over HTTP (`supabase+https://<ref>.supabase.co`), with the
  service key (sees every task) or a user's JWT / personal access token (only that user's projects).

URLs (what `open_store` and `hwgp --db` accept):

    supabase+postgresql://postgres:PASSWORD@db.<ref>.supabase.co:5432/postgres
    supabase+https://<ref>.supabase.co?service_key=KEY      (or ?access_token=TOKEN)
    supabase+https://<ref>.supabase.co                      (key from $SUPABASE_SERVICE_KEY or
                                                             $SUPABASE_ACCESS_TOKEN)

`migrate()` of the direct store applies `db/migrations/postgres/*.sql` then `db/supabase/migrations/*.sql`;
the HTTP store cannot change the schema and reports nothing to apply.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import psycopg

from db.models import NewTask, Task, TaskStatus
from db.postgres import NOTIFY_CHANNEL, PostgresTaskStore
from db.sql_store import task_from_row
from db.store import (
    DEFAULT_MAX_ATTEMPTS,
    InvalidTask,
    TaskConflict,
    TaskNotFound,
    TaskStore,
    TaskStoreError,
)

SUPABASE_MIGRATIONS = Path(__file__).parent / "supabase" / "migrations"
FUNCTIONS_DIR = Path(__file__).parent / "supabase" / "functions"
SUPABASE_ROLES = ("anon", "authenticated", "service_role")


class TaskForbidden(TaskStoreError, PermissionError):
    """The credentials are missing, invalid, or do not own the task's project."""


def supabase_migrations() -> list[tuple[str, str]]:
    """(version, sql) of the Supabase migrations, in order; versions are prefixed `supabase/`."""
    files = sorted(SUPABASE_MIGRATIONS.glob("*.sql"))
    return [(f"supabase/{f.stem}", f.read_text()) for f in files]


def store_error(error: psycopg.Error, task_id: str | None = None) -> Exception:
    """The store's exception for the SQLSTATEs our SQL functions raise (others come back unchanged)."""
    state = error.sqlstate
    message = error.diag.message_primary or str(error)
    detail = error.diag.message_detail
    if state == "P0002":
        return TaskNotFound(task_id or detail or "?")
    if state == "55000":
        return TaskConflict(message)
    if state == "22023":
        field = detail or "request"
        return InvalidTask(field, message.removeprefix(f"{field}: "))
    if state == "42501":
        return TaskForbidden(message)
    return error


class SupabaseDirectStore(PostgresTaskStore):
    """The Supabase tasks table over a direct PostgreSQL connection; see the module docstring."""

    def __init__(self, url: str):
        super().__init__(url.removeprefix("supabase+"))
        self.url = url

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url.removeprefix("supabase+"), autocommit=True, row_factory=_dict_row())

    def wait_for_work(self, timeout_s: float) -> bool:
        with self._lock:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(self.url.removeprefix("supabase+"), autocommit=True)
                self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            listener = self._listener
        return any(True for _ in listener.notifies(timeout=timeout_s, stop_after=1))

    def _call(self, sql: str, args: Mapping[str, Any], task_id: str | None = None) -> list[dict[str, Any]]:
        try:
            with self._transaction() as cur:
                return self._execute(cur, sql, args)
        except psycopg.Error as error:
            translated = store_error(error, task_id)
            if translated is error:
                raise
            raise translated from None

    def _task(self, sql: str, args: Mapping[str, Any], task_id: str | None = None) -> Task:
        return task_from_row(self._call(sql, args, task_id)[0])

    def _tasks(self, sql: str, args: Mapping[str, Any]) -> list[Task]:
        return [task_from_row(r) for r in self._call(sql, args)]

    # --- schema ------------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        applied = super().migrate()  # the tasks table (db/migrations/postgres)
        with self._transaction() as cur:
            self._migration_lock(cur)
            done = {r["version"] for r in self._execute(cur, "SELECT version FROM schema_migrations")}
            pending = [(v, sql) for v, sql in supabase_migrations() if v not in done]
            if pending:
                self._check_supabase_roles(cur)
            for version, sql in pending:
                self._apply_migration(cur, sql)
                self._execute(
                    cur,
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (:v, clock_timestamp()::text)",
                    {"v": version},
                )
                applied.append(version)
        return applied

    def _check_supabase_roles(self, cur: psycopg.Cursor) -> None:
        rows = self._execute(
            cur,
            "SELECT array(SELECT r FROM unnest(CAST(:roles AS text[])) r "
            "             WHERE r NOT IN (SELECT rolname FROM pg_roles)) AS missing, "
            "       to_regprocedure('auth.uid()') IS NOT NULL AS has_uid",
            {"roles": list(SUPABASE_ROLES)},
        )
        missing = list(rows[0]["missing"]) + ([] if rows[0]["has_uid"] else ["auth.uid()"])
        if missing:
            raise TaskStoreError(
                f"{self.url.split('@')[-1]}: not a Supabase database: missing {', '.join(missing)} "
                "(every Supabase project has the roles anon, authenticated, service_role and auth.uid())"
            )

    # --- TaskStore, each a call of one SQL function ---------------------------------------------------
    def create(self, new: NewTask) -> Task:
        return self._task(
            "SELECT * FROM create_task(:task_type, :params, :id, :dependant_on, :project_id, :priority)",
            {
                "task_type": new.task_type,
                "params": self._encode_params(new.params),
                "id": new.id,
                "dependant_on": new.dependant_on,
                "project_id": new.project_id,
                "priority": new.priority,
            },
        )

    def get(self, task_id: str) -> Task:
        return self._task("SELECT * FROM get_task(:id)", {"id": task_id}, task_id)

    def list(
        self,
        *,
        status: TaskStatus | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Task]:
        return self._tasks(
            "SELECT * FROM list_tasks(:status, :task_type, :project_id, :limit, :offset)",
            {
                "status": status.value if status is not None else None,
                "task_type": task_type,
                "project_id": project_id,
                "limit": limit,
                "offset": offset,
            },
        )

    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        rows = self._call(
            "SELECT status, n FROM count_tasks_by_status(:types)",
            {"types": list(task_types) if task_types is not None else None},
        )
        counts = {TaskStatus(r["status"]): int(r["n"]) for r in rows}
        return {status: counts.get(status, 0) for status in TaskStatus}

    def claim_next(
        self, worker_id: str, task_types: Iterable[str] | None = None, limit: int = 1
    ) -> list[Task]:
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        types = sorted(set(task_types)) if task_types is not None else None
        if limit < 1 or types == []:
            return []
        return self._tasks(
            "SELECT * FROM claim_next_task(:worker_id, :types, NULL, :limit)",
            {"worker_id": worker_id, "types": types, "limit": limit},
        )

    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        rows = self._call("SELECT heartbeat_task(:id, :w) AS ok", {"id": task_id, "w": worker_id})
        return bool(rows[0]["ok"])

    def set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None = None) -> bool:
        rows = self._call(
            "SELECT set_task_progress(:id, :w, :progress, :message) AS ok",
            {"id": task_id, "w": worker_id, "progress": float(progress), "message": message},
        )
        return bool(rows[0]["ok"])

    def complete(self, task_id: str, output_location: str, worker_id: str | None = None) -> Task:
        return self._task(
            "SELECT * FROM complete_task(:id, :output, :w)",
            {"id": task_id, "output": output_location, "w": worker_id},
            task_id,
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
            "SELECT * FROM fail_task(:id, :message, :w, :retryable, :max_attempts)",
            {
                "id": task_id,
                "message": error_message,
                "w": worker_id,
                "retryable": retryable,
                "max_attempts": max_attempts,
            },
            task_id,
        )

    def start(self, task_id: str, worker_id: str) -> Task:
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        return self._task("SELECT * FROM start_task(:id, :w)", {"id": task_id, "w": worker_id}, task_id)

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        rows = self._call(
            "SELECT release_task(:id, :w, :reason) AS ok", {"id": task_id, "w": worker_id, "reason": reason}
        )
        return bool(rows[0]["ok"])

    def cancel(self, task_id: str) -> Task:
        return self._task("SELECT * FROM cancel_task(:id)", {"id": task_id}, task_id)

    def requeue_stale(self, older_than_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Task]:
        return self._tasks(
            "SELECT * FROM requeue_stale_tasks(:older, :max_attempts)",
            {"older": float(older_than_s), "max_attempts": max_attempts},
        )

    def propagate_failures(self) -> list[Task]:
        return self._tasks("SELECT * FROM propagate_task_failures()", {})

    # --- Supabase-only operations ----------------------------------------------------------------------
    def update_status(
        self, task_id: str, status: TaskStatus | str, output_location: str | None = None
    ) -> Task:
        """What `update-task-status` does: set a status as existing clients do (message in output_location)."""
        value = status.value if isinstance(status, TaskStatus) else status
        return self._task(
            "SELECT * FROM update_task_status(:id, :status, :output)",
            {"id": task_id, "status": value, "output": output_location},
            task_id,
        )

    def predecessor_output(self, task_id: str) -> dict[str, Any] | None:
        """`{predecessor_id, output_location, status}` of the task this one depends on, or None."""
        rows = self._call("SELECT * FROM get_predecessor_output(:id)", {"id": task_id}, task_id)
        if not rows:
            return None
        row = rows[0]
        return {
            "predecessor_id": row["predecessor_id"],
            "output_location": row["output_location"],
            "status": row["predecessor_status"],
        }

    def completed_segments(self, run_id: str, project_id: str | None = None) -> list[dict[str, Any]]:
        """`[{segment_index, output_location}]` of a travel run's completed segments, by index."""
        rows = self._call(
            "SELECT segment_index, output_location FROM get_completed_segments(:run, :project)",
            {"run": run_id, "project": project_id},
        )
        return [dict(r) for r in rows]


def _dict_row() -> Any:
    from psycopg.rows import dict_row

    return dict_row


class SupabaseHttpStore(TaskStore):
    """The Supabase tasks table through the edge functions (`{project}/functions/v1/<name>`)."""

    def __init__(
        self,
        url: str,
        *,
        service_key: str | None = None,
        access_token: str | None = None,
        timeout: float = 30.0,
    ):
        parts = urlsplit(url.removeprefix("supabase+"))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidTask("db", f"{url!r} is not supabase+https://<project host>")
        query = parse_qs(parts.query)
        service_key = service_key or _first(query, "service_key")
        access_token = access_token or _first(query, "access_token")
        if not (service_key or access_token):
            service_key = os.environ.get("SUPABASE_SERVICE_KEY") or None
            access_token = os.environ.get("SUPABASE_ACCESS_TOKEN") or None
        token = service_key or access_token
        if not token:
            raise InvalidTask(
                "supabase_key",
                "give a service key (SUPABASE_SERVICE_KEY) or a personal access token (--supabase-access-token)",
            )
        self.base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        # `url` is logged: keep the credentials out of it.
        kept = {k: v for k, v in query.items() if k not in ("service_key", "access_token")}
        self.url = "supabase+" + urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/"), urlencode(kept, doseq=True), "")
        )
        self._client = httpx.Client(
            base_url=f"{self.base_url}/functions/v1",
            timeout=timeout,
            headers={"Authorization": f"Bearer {token}", "apikey": token},
        )

    def call(self, function: str, body: Mapping[str, Any], *, timeout: float | None = None) -> Any:
        """POST `body` to one edge function; its JSON answer (None for 204), or the store's exceptions."""
        try:
            extra = {"timeout": timeout} if timeout is not None else {}
            response = self._client.post(f"/{function}", json=dict(body), **extra)
        except httpx.HTTPError as error:
            raise TaskStoreError(f"cannot reach {self.base_url}: {error}") from None
        if response.status_code == 204:
            return None
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": response.text}
        if response.status_code < 400:
            return payload
        payload = payload if isinstance(payload, dict) else {}
        message = payload.get("error", response.text)
        if response.status_code == 400:
            field = payload.get("field") or "request"
            raise InvalidTask(field, str(message).removeprefix(f"{field}: "))
        if response.status_code == 404:
            raise TaskNotFound(str(body.get("task_id") or payload.get("task_id") or "?"))
        if response.status_code == 409:
            raise TaskConflict(message)
        if response.status_code in (401, 403):
            raise TaskForbidden(f"{function}: HTTP {response.status_code}: {message}")
        raise TaskStoreError(f"{function}: HTTP {response.status_code}: {message}")

    def create(self, new: NewTask) -> Task:
        body = {
            "task_id": new.id,
            "task_type": new.task_type,
            "params": new.params,
            "dependant_on": new.dependant_on,
            "project_id": new.project_id,
            "priority": new.priority,
        }
        return Task.model_validate(self.call("create-task", body))

    def get(self, task_id: str) -> Task:
        return Task.model_validate(self.call("get-task", {"task_id": task_id}))

    def list(
        self,
        *,
        status: TaskStatus | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Task]:
        body = {
            "status": status.value if status is not None else None,
            "task_type": task_type,
            "project_id": project_id,
            "limit": limit,
            "offset": offset,
        }
        return [Task.model_validate(t) for t in self.call("list-tasks", body)]

    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        body = {"task_types": list(task_types) if task_types is not None else None}
        counts = {TaskStatus(k): int(v) for k, v in self.call("count-tasks", body).items()}
        return {status: counts.get(status, 0) for status in TaskStatus}

    def claim_next(
        self, worker_id: str, task_types: Iterable[str] | None = None, limit: int = 1
    ) -> list[Task]:
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        types = sorted(set(task_types)) if task_types is not None else None
        if limit < 1 or types == []:
            return []
        answer = self.call("claim-next-task", {"worker_id": worker_id, "task_types": types, "limit": limit})
        return [Task.model_validate(t) for t in answer["tasks"]]

    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        return bool(self.call("heartbeat-task", {"task_id": task_id, "worker_id": worker_id})["ok"])

    def set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None = None) -> bool:
        body = {"task_id": task_id, "worker_id": worker_id, "progress": float(progress), "message": message}
        return bool(self.call("set-task-progress", body)["ok"])

    def complete(self, task_id: str, output_location: str, worker_id: str | None = None) -> Task:
        if not output_location:
            raise InvalidTask("output_location", "must not be empty")
        body = {"task_id": task_id, "output_location": output_location, "worker_id": worker_id}
        return Task.model_validate(self.call("complete-task", body))

    def complete_with_file(
        self, task_id: str, data: bytes, filename: str, worker_id: str | None = None
    ) -> Task:
        """Upload `data` through `complete-task` (Supabase Storage) and complete the task with its URL."""
        import base64

        body = {
            "task_id": task_id,
            "file_data": base64.b64encode(data).decode(),
            "filename": filename,
            "worker_id": worker_id,
        }
        return Task.model_validate(self.call("complete-task", body))

    def fail(
        self,
        task_id: str,
        error_message: str,
        *,
        worker_id: str | None = None,
        retryable: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Task:
        body = {
            "task_id": task_id,
            "error_message": error_message,
            "worker_id": worker_id,
            "retryable": retryable,
            "max_attempts": max_attempts,
        }
        return Task.model_validate(self.call("fail-task", body))

    def start(self, task_id: str, worker_id: str) -> Task:
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        return Task.model_validate(self.call("start-task", {"task_id": task_id, "worker_id": worker_id}))

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        body = {"task_id": task_id, "worker_id": worker_id, "reason": reason}
        return bool(self.call("release-task", body)["ok"])

    def cancel(self, task_id: str) -> Task:
        return Task.model_validate(self.call("cancel-task", {"task_id": task_id}))

    def requeue_stale(self, older_than_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Task]:
        body = {"older_than_s": float(older_than_s), "max_attempts": max_attempts}
        return [Task.model_validate(t) for t in self.call("requeue-stale-tasks", body)]

    def propagate_failures(self) -> list[Task]:
        return [Task.model_validate(t) for t in self.call("propagate-failures", {})]

    def wait_for_work(self, timeout_s: float) -> bool:
        # The function long-polls LISTEN hwgp_tasks for at most 60 s a call.
        deadline = max(0.0, float(timeout_s))
        while True:
            chunk = min(deadline, 60.0)
            if self.call("wait-for-work", {"timeout_s": chunk}, timeout=chunk + 30.0)["woke"]:
                return True
            deadline -= chunk
            if deadline <= 0:
                return False

    def migrate(self) -> list[str]:
        # Migrations need a database connection: `hwgp db init --db supabase+postgresql://…`.
        return []

    def update_status(
        self, task_id: str, status: TaskStatus | str, output_location: str | None = None
    ) -> Task:
        value = status.value if isinstance(status, TaskStatus) else status
        body = {"task_id": task_id, "status": value, "output_location": output_location}
        return Task.model_validate(self.call("update-task-status", body))

    def predecessor_output(self, task_id: str) -> dict[str, Any] | None:
        return self.call("get-predecessor-output", {"task_id": task_id})

    def completed_segments(self, run_id: str, project_id: str | None = None) -> list[dict[str, Any]]:
        return self.call("get-completed-segments", {"run_id": run_id, "project_id": project_id})

    def close(self) -> None:
        self._client.close()


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def open_supabase_store(url: str) -> TaskStore:
    """`supabase+postgresql://…` → direct store; `supabase+http(s)://…` → edge-function store."""
    if url.startswith(("supabase+postgresql:", "supabase+postgres:")):
        return SupabaseDirectStore(url)
    if url.startswith(("supabase+https:", "supabase+http:")):
        return SupabaseHttpStore(url)
    raise InvalidTask(
        "db", f"unsupported Supabase URL {url!r}; use supabase+postgresql://… or supabase+https://…"
    )


def supabase_url_from_settings(
    supabase_url: str | None, *, service_key: str | None = None, access_token: str | None = None
) -> str:
    """The store URL for `--db supabase`: the project URL (SUPABASE_URL) with the chosen credential."""
    if not supabase_url:
        raise InvalidTask("supabase_url", "--db supabase needs --supabase-url or $SUPABASE_URL")
    parts = urlsplit(supabase_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidTask("supabase_url", f"{supabase_url!r} is not an http(s) URL")
    credential = {"access_token": access_token} if access_token else {"service_key": service_key}
    if not next(iter(credential.values())):
        raise InvalidTask(
            "supabase_key",
            "--db supabase needs $SUPABASE_SERVICE_KEY or --supabase-access-token / $SUPABASE_ACCESS_TOKEN",
        )
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return f"supabase+{base}?{urlencode(credential)}"
