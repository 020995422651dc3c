"""Supabase mode: the tasks table of a Supabase project, through either of two transports.

* SQL: `SupabaseDirectStore` — a direct PostgreSQL connection (`supabase+postgresql://…`), for
  service-role workers inside the database's network: `PostgresTaskStore` (every operation one call of
  the SQL functions of `db/migrations/postgres/0002_task_functions.sql`) plus the Supabase migrations.
* HTTP: `SupabaseHttpStore` — the edge functions over HTTP (`supabase+https://<ref>.supabase.co`), which
  call those same SQL functions, with the service key (sees every task) or a user's JWT / personal
  access token (only that user's projects).

Both are one store: the claim / complete / fail rules exist once, in SQL, behind either transport, and
the argument checks once, in the `TaskStore` front.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import psycopg

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
from db.postgres import PostgresTaskStore

SUPABASE_MIGRATIONS = Path(__file__).parent / "supabase" / "migrations"
SUPABASE_ROLES = ("anon", "authenticated", "service_role")


def supabase_migrations() -> list[tuple[str, str]]:
    """(version, sql) of the Supabase migrations, in order; versions are prefixed `supabase/`."""
    files = sorted(SUPABASE_MIGRATIONS.glob("*.sql"))
    return [(f"supabase/{f.stem}", f.read_text()) for f in files]


class SupabaseDirectStore(PostgresTaskStore):
    """The Supabase tasks table over a direct PostgreSQL connection (`supabase+postgresql://…`).

    The same SQL functions as `PostgresTaskStore` (and as the edge functions); this adds the Supabase
    migrations (after PostgreSQL's) and the operations only Supabase clients use."""

    def migrations(self) -> list[tuple[str, str]]:
        return super().migrations() + supabase_migrations()

    def _before_migration(self, cur: psycopg.Cursor, version: str) -> None:
        if not version.startswith("supabase/"):
            return
        row = cur.execute(
            "SELECT array(SELECT r FROM unnest(%s::text[]) r WHERE r NOT IN (SELECT rolname FROM pg_roles))"
            " AS missing, to_regprocedure('auth.uid()') IS NOT NULL AS has_uid",
            (list(SUPABASE_ROLES),),
        ).fetchone()
        missing = list(row["missing"]) + ([] if row["has_uid"] else ["auth.uid()"])
        if missing:
            raise TaskStoreError(
                f"{self.url.split('@')[-1]}: not a Supabase database: missing {', '.join(missing)} "
                "(every Supabase project has the roles anon, authenticated, service_role and auth.uid())"
            )

    def update_status(
        self, task_id: str, status: TaskStatus | str, output_location: str | None = None
    ) -> Task:
        """What `update-task-status` does: set a status as existing clients do (message in output_location)."""
        value = status.value if isinstance(status, TaskStatus) else status
        return self._task(
            "SELECT * FROM update_task_status(%s, %s, %s)", (task_id, value, output_location), task_id
        )

    def predecessor_output(self, task_id: str) -> dict[str, Any] | None:
        """`{predecessor_id, output_location, status}` of the task this one depends on, or None."""
        rows = self._call("SELECT * FROM get_predecessor_output(%s)", (task_id,), task_id)
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
            "SELECT segment_index, output_location FROM get_completed_segments(%s, %s)", (run_id, project_id)
        )
        return [dict(r) for r in rows]


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
        except httpx.TransportError as error:  # refused, timed out, dropped
            raise StoreUnavailable(f"cannot reach {self.base_url}: {error!r}") from None
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
        if response.status_code in (502, 503, 504):
            raise StoreUnavailable(f"{function}: HTTP {response.status_code}: {message}")
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

    def _list(
        self,
        *,
        status: TaskStatus | None,
        task_type: str | None,
        project_id: str | None,
        limit: int,
        offset: int,
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

    def _claim_next(self, worker_id: str, task_types: list[str] | None, limit: int) -> list[Task]:
        body = {"worker_id": worker_id, "task_types": task_types, "limit": limit}
        answer = self.call("claim-next-task", body)
        return [Task.model_validate(t) for t in answer["tasks"]]

    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        return bool(self.call("heartbeat-task", {"task_id": task_id, "worker_id": worker_id})["ok"])

    def _set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None) -> bool:
        body = {"task_id": task_id, "worker_id": worker_id, "progress": progress, "message": message}
        return bool(self.call("set-task-progress", body)["ok"])

    def _complete(self, task_id: str, output_location: str, worker_id: str | None) -> Task:
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

    def _start(self, task_id: str, worker_id: str) -> Task:
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
