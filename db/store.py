"""The `TaskStore` interface: every claim / complete / fail / requeue rule lives behind it.

Two implementations share one behavioural test suite: `SqliteTaskStore` (embedded default) and
`PostgresTaskStore` (also the direct transport for Supabase). Open one with `open_store(url)`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence
from typing import Any

from db.models import NewTask, Task, TaskStatus

DEFAULT_DB_URL = "sqlite:///tasks.db"
DEFAULT_MAX_ATTEMPTS = 3


class TaskStoreError(Exception):
    """Base class for store errors a caller can show to a user as they are."""


class TaskNotFound(TaskStoreError, LookupError):
    def __init__(self, task_id: str):
        super().__init__(f"no task with id {task_id!r}")
        self.task_id = task_id


class InvalidTask(TaskStoreError, ValueError):
    """The request is malformed; `field` names what is wrong. Nothing was written."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class TaskConflict(TaskStoreError):
    """The task is not in a state that allows the operation (e.g. cancelling a finished task)."""


class TaskStore(abc.ABC):
    """A tasks table. All methods are safe to call from several processes at once."""

    url: str

    # --- writing tasks -------------------------------------------------------------------
    @abc.abstractmethod
    def create(self, new: NewTask) -> Task:
        """Insert a `Queued` task. Raises `InvalidTask` (e.g. `dependant_on` names no task)."""

    def add(self, task_type: str, params: dict[str, Any] | str | None = None, **fields: Any) -> Task:
        """Convenience over `create`: validates the same way and raises `InvalidTask` naming the field."""
        return self.create(
            new_task(task_type=task_type, params=params if params is not None else {}, **fields)
        )

    # --- reading ---------------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, task_id: str) -> Task:
        """The task, or `TaskNotFound`."""

    @abc.abstractmethod
    def list(
        self,
        *,
        status: TaskStatus | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Task]:
        """Tasks, newest first."""

    @abc.abstractmethod
    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        """How many tasks are in each status (queue depth for metrics and capacity planning)."""

    # --- the worker's side -------------------------------------------------------------------
    @abc.abstractmethod
    def claim_next(
        self, worker_id: str, task_types: Iterable[str] | None = None, limit: int = 1
    ) -> list[Task]:
        """Atomically move up to `limit` claimable tasks to `In Progress` for `worker_id`.

        Claimable: `Queued`, and `dependant_on` is null or `Complete`. Higher priority first, then oldest.
        Each claim increments `attempts` and stamps `heartbeat_at` and `generation_started_at`.
        """

    @abc.abstractmethod
    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        """Refresh the heartbeat. False when the task is no longer this worker's to run (cancelled, requeued)."""

    @abc.abstractmethod
    def set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None = None) -> bool:
        """Record progress in [0, 1] (also a heartbeat). False when the task is no longer this worker's."""

    @abc.abstractmethod
    def complete(self, task_id: str, output_location: str, worker_id: str | None = None) -> Task:
        """`In Progress` → `Complete`. With `worker_id`, only that worker's claim may complete it.

        Raises `TaskConflict` when the task is not in progress (cancelled, requeued, already finished), so an
        abandoned attempt can never record an output.
        """

    @abc.abstractmethod
    def fail(
        self,
        task_id: str,
        error_message: str,
        *,
        worker_id: str | None = None,
        retryable: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Task:
        """`In Progress` → `Failed` (or back to `Queued` when retryable and attempts remain).

        The message also goes to `output_location`, as the original system did. Queued dependants fail
        with a message naming this task.
        """

    @abc.abstractmethod
    def start(self, task_id: str, worker_id: str) -> Task:
        """Take over one specific unfinished task for `worker_id` (→ `In Progress`), whatever state it was
        left in: how an orchestrator drives the rows that mirror its steps, and resumes them after a crash.
        `Complete` → `TaskConflict`."""

    @abc.abstractmethod
    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        """Give an unfinished claim back: `In Progress` → `Queued` without spending an attempt
        (a worker shutting down, not a failure). False when the task is no longer this worker's."""

    @abc.abstractmethod
    def cancel(self, task_id: str) -> Task:
        """`Queued`/`In Progress` → `Cancelled`; queued dependants fail naming it. Finished → `TaskConflict`."""

    # --- maintenance ------------------------------------------------------------------------
    @abc.abstractmethod
    def requeue_stale(self, older_than_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Task]:
        """Tasks `In Progress` whose heartbeat is older than `older_than_s` go back to `Queued`, or to
        `Failed` once `attempts` reached `max_attempts`. Returns the tasks changed."""

    @abc.abstractmethod
    def propagate_failures(self) -> list[Task]:
        """Fail every `Queued` task whose dependency is `Failed`, `Cancelled` or missing (transitively).

        `fail` and `cancel` already do this; this catches rows written directly by other systems."""

    @abc.abstractmethod
    def wait_for_work(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` until a task may have become claimable. True when woken early."""

    @abc.abstractmethod
    def migrate(self) -> list[str]:
        """Apply pending schema migrations; returns the versions applied."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_task(**fields: Any) -> NewTask:
    """Build a `NewTask`, turning pydantic's error into `InvalidTask` naming the first bad field."""
    from pydantic import ValidationError

    try:
        return NewTask(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "task"
        problem = first["msg"].removeprefix("Value error, ")
        raise InvalidTask(field, problem) from None


def dependency_error(dep_id: str, dep_type: str | None, dep_status: str | None, dep_error: str | None) -> str:
    """The message a task gets when its dependency can no longer complete."""
    if dep_status is None:
        return f"dependency {dep_id} does not exist"
    if dep_status == TaskStatus.CANCELLED:
        return f"dependency {dep_id} ({dep_type}) was cancelled"
    return f"dependency {dep_id} ({dep_type}) failed: {dep_error or 'no error message'}"


def open_store(url: str | None = None, *, migrate: bool = True) -> TaskStore:
    """Open the store named by `url`, `$HWGP_DB`, or the default `sqlite:///tasks.db`.

    `sqlite:///relative.db`, `sqlite:////absolute.db`, `postgresql://user@host:port/db`, or Supabase:
    `supabase+postgresql://…` (direct) / `supabase+https://<ref>.supabase.co` (edge functions; see
    `db/supabase_store.py`).
    """
    url = url or os.environ.get("HWGP_DB") or DEFAULT_DB_URL
    if url.startswith("sqlite:"):
        from db.sqlite import SqliteTaskStore

        store: TaskStore = SqliteTaskStore(url)
    elif url.startswith(("postgresql:", "postgres:")):
        from db.postgres import PostgresTaskStore

        store = PostgresTaskStore(url)
    elif url.startswith("supabase+"):
        from db.supabase_store import open_supabase_store

        store = open_supabase_store(url)
    else:
        raise InvalidTask(
            "db", f"unsupported database URL {url!r}; use sqlite:///FILE, postgresql://… or supabase+…"
        )
    if migrate:
        store.migrate()
    return store
