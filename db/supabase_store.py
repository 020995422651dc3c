"""Supabase mode: the tasks table of a Supabase project, one store (`SupabaseTaskStore`) over either of
two transports:

* SQL — a direct PostgreSQL connection pool (`supabase+postgresql://…`), for service-role workers inside
  the database's network: the SQL functions of `db/supabase/migrations/*_task_functions.sql`;
* HTTP — the edge functions (`supabase+https://<ref>.supabase.co`, `HttpTransport`), which call those
  same SQL functions, with the service key (sees every task) or a user's JWT / personal access token
  (only that user's projects).

The claim / complete / fail rules exist once, in SQL, behind either transport; the store's methods once,
in `PostgresTaskStore`; the argument checks once, in the `TaskStore` front.

URLs (what `open_store` and `hwgp --db` accept):

    supabase+postgresql://postgres:PASSWORD@db.<ref>.supabase.co:5432/postgres
    supabase+https://<ref>.supabase.co?service_key=KEY      (or ?access_token=TOKEN)
    supabase+https://<ref>.supabase.co                      (key from $SUPABASE_SERVICE_KEY or
                                                             $SUPABASE_ACCESS_TOKEN)

`migrate()` over SQL applies every file of `db/supabase/migrations/` in name order, as `supabase db push`
does (and shares its bookkeeping, `supabase_migrations.schema_migrations`, when the project has it); over
HTTP it cannot change the schema and reports nothing to apply.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import psycopg

from db.errors import (
    InvalidTask,
    StoreUnavailable,
    TaskConflict,
    TaskForbidden,
    TaskNotFound,
    TaskStoreError,
)
from db.models import Task, TaskStatus
from db.postgres import Call, PostgresTaskStore, is_supabase_only, migration_files

SUPABASE_ROLES = ("anon", "authenticated", "service_role")


def supabase_migrations() -> list[tuple[str, str]]:
    """(version, sql) of the migrations only Supabase databases get (`*_supabase_*.sql`), in order."""
    return [(v, sql) for v, sql in migration_files() if is_supabase_only(v)]


UPDATE_STATUS = Call(
    "SELECT * FROM update_task_status(%(task_id)s, %(status)s, %(output_location)s)",
    "update-task-status",
    "row",
)
PREDECESSOR_OUTPUT = Call(
    "SELECT predecessor_id, output_location, predecessor_status AS status FROM get_predecessor_output(%(task_id)s)",
    "get-predecessor-output",
    "optional row",
)
COMPLETED_SEGMENTS = Call(
    "SELECT segment_index, output_location FROM get_completed_segments(%(run_id)s, %(project_id)s)",
    "get-completed-segments",
    "rows",
)


class SupabaseTaskStore(PostgresTaskStore):
    """The Supabase tasks table: the PostgreSQL store's SQL functions over a direct connection
    (`supabase+postgresql://…`) or the edge functions (`supabase+https://…`), plus the Supabase migrations
    and the operations only Supabase clients use."""

    def __init__(self, url: str, **transport_settings: Any):
        """`transport_settings`: the pool's (`connect_timeout_s`, …) for SQL; `service_key`, `access_token`,
        `timeout` for HTTP."""
        if url.startswith(("supabase+postgresql:", "supabase+postgres:")):
            super().__init__(url, **transport_settings)
        elif url.startswith(("supabase+https:", "supabase+http:")):
            super().__init__(url, transport=HttpTransport(url, **transport_settings))
        else:
            raise InvalidTask(
                "db", f"unsupported Supabase URL {url!r}; use supabase+postgresql://… or supabase+https://…"
            )

    def migrations(self) -> list[tuple[str, str]]:
        """Every file of `db/supabase/migrations/`, in order: what `supabase db push` applies."""
        return migration_files()

    def _before_migration(self, cur: psycopg.Cursor, version: str) -> None:
        if not is_supabase_only(version):
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
        return self._task(UPDATE_STATUS, task_id=task_id, status=value, output_location=output_location)

    def predecessor_output(self, task_id: str) -> dict[str, Any] | None:
        """`{predecessor_id, output_location, status}` of the task this one depends on, or None."""
        answer = self.transport.call(PREDECESSOR_OUTPUT, {"task_id": task_id})
        return dict(answer) if answer is not None else None

    def completed_segments(self, run_id: str, project_id: str | None = None) -> list[dict[str, Any]]:
        """`[{segment_index, output_location}]` of a travel run's completed segments, by index."""
        return [
            dict(r)
            for r in self.transport.call(COMPLETED_SEGMENTS, {"run_id": run_id, "project_id": project_id})
        ]

    def complete_with_file(
        self,
        task_id: str,
        data: bytes,
        filename: str,
        worker_id: str | None = None,
        result: dict[str, Any] | None = None,
        first_frame: bytes | None = None,
    ) -> Task:
        """Upload `data` through `complete-task` (Supabase Storage) and complete the task with its URL
        (and `result`, see `Task.result`). `first_frame` (JPEG bytes, as the original worker sends a
        video's) is stored as `thumb_{task_id[:8]}.jpg` and its URL written into the params' `thumbnail_url`;
        an image output without one gets complete-task's own third-size thumbnail."""
        if not isinstance(self.transport, HttpTransport):
            raise InvalidTask(
                "db", "complete_with_file uploads through the edge functions: use supabase+https://…"
            )
        body = {
            "task_id": task_id,
            "file_data": base64.b64encode(data).decode(),
            "filename": filename,
            "worker_id": worker_id,
            "result": result,
        }
        if first_frame is not None:
            body["first_frame_data"] = base64.b64encode(first_frame).decode()
            body["first_frame_filename"] = f"thumb_{task_id[:8]}.jpg"  # the original worker's name
        return Task.model_validate(self.transport.post("complete-task", body))


class HttpTransport:
    """The SQL functions through the edge functions (`{project}/functions/v1/<name>`), with the service key
    (sees every task) or a user's JWT / personal access token (only that user's projects)."""

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

    def call(self, call: Call, args: dict[str, Any]) -> Any:
        answer = self.post(call.edge_function, args)
        return answer[call.answer_key] if call.answer_key else answer

    def post(self, function: str, body: Mapping[str, Any], *, timeout: float | None = None) -> Any:
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

    def wait_for_work(self, timeout_s: float) -> bool:
        # The function long-polls LISTEN hwgp_tasks for at most 60 s a call.
        deadline = max(0.0, float(timeout_s))
        while True:
            chunk = min(deadline, 60.0)
            if self.post("wait-for-work", {"timeout_s": chunk}, timeout=chunk + 30.0)["woke"]:
                return True
            deadline -= chunk
            if deadline <= 0:
                return False

    def migrate(self, migrations: list[tuple[str, str]], check: Callable[[Any, str], None]) -> list[str]:
        # Migrations need a database connection: `hwgp db init --db supabase+postgresql://…`.
        return []

    def close(self) -> None:
        self._client.close()


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


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
