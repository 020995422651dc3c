"""The `TaskStore` front: the interface every backend implements, with the argument checks made once.

Public methods check their arguments here, then call the backend's `_name` method (e.g. `claim_next`
→ `_claim_next`), so SQLite, PostgreSQL and Supabase (SQL or HTTP) all refuse bad input the same way
before touching the database. Backends implement the rules; open one with `db.store.open_store`.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from db.errors import InvalidTask, TaskConflict
from db.models import MAX_PARAMS_BYTES, NewTask, Task, TaskStatus

DEFAULT_MAX_ATTEMPTS = 3
MAX_LIST_LIMIT = 10_000
MAX_THUMBNAIL_URL = 4096  # characters; a URL or storage location, not data


class TaskStore(abc.ABC):
    """A tasks table. All methods are safe to call from several processes at once.

    Every method may raise `StoreUnavailable` when the database cannot answer (see `db.errors`).
    """

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
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidTask("limit", f"must be between 1 and {MAX_LIST_LIMIT}")
        if offset < 0:
            raise InvalidTask("offset", "must be 0 or more")
        return self._list(
            status=status, task_type=task_type, project_id=project_id, limit=limit, offset=offset
        )

    @abc.abstractmethod
    def count_by_status(self, task_types: Sequence[str] | None = None) -> dict[TaskStatus, int]:
        """How many tasks are in each status (queue depth for metrics and capacity planning)."""

    # --- the worker's side -------------------------------------------------------------------
    def claim_next(
        self, worker_id: str, task_types: Iterable[str] | None = None, limit: int = 1
    ) -> list[Task]:
        """Atomically move up to `limit` claimable tasks to `In Progress` for `worker_id`.

        Claimable: `Queued`, and `dependant_on` is null or `Complete`. Higher priority first, then oldest.
        Each claim increments `attempts` and stamps `heartbeat_at` and `generation_started_at`.
        """
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        types = sorted(set(task_types)) if task_types is not None else None
        if limit < 1 or types == []:
            return []
        return self._claim_next(worker_id, types, limit)

    @abc.abstractmethod
    def heartbeat(self, task_id: str, worker_id: str) -> bool:
        """Refresh the heartbeat. False when the task is no longer this worker's to run (cancelled, requeued)."""

    def set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None = None) -> bool:
        """Record progress in [0, 1] (also a heartbeat). False when the task is no longer this worker's."""
        if not 0.0 <= progress <= 1.0:
            raise InvalidTask("progress", f"must be between 0 and 1, got {progress}")
        return self._set_progress(task_id, worker_id, float(progress), message)

    def complete(
        self,
        task_id: str,
        output_location: str,
        worker_id: str | None = None,
        result: dict[str, Any] | None = None,
        thumbnail_url: str | None = None,
    ) -> Task:
        """`In Progress` → `Complete`, recording `result` (a JSON object, see `Task.result`) with the output.
        With `worker_id`, only that worker's claim may complete it.

        `thumbnail_url` (the output's thumbnail) goes into the task's params, in the same write, where the
        original's complete-task puts it (`db.thumbnails.params_with_thumbnail_url`); every other key stays.

        Raises `TaskConflict` when the task is not in progress (cancelled, requeued, already finished), so an
        abandoned attempt can never record an output.
        """
        if not output_location:
            raise InvalidTask("output_location", "must not be empty")
        if thumbnail_url is not None and (not isinstance(thumbnail_url, str) or not thumbnail_url):
            raise InvalidTask("thumbnail_url", "must be a non-empty string")
        if thumbnail_url is not None and len(thumbnail_url) > MAX_THUMBNAIL_URL:
            raise InvalidTask(
                "thumbnail_url", f"is {len(thumbnail_url)} characters; the limit is {MAX_THUMBNAIL_URL}"
            )
        return self._complete(
            task_id, output_location, worker_id, _json_object(result, "result"), thumbnail_url
        )

    def complete_idempotent(
        self,
        task_id: str,
        output_location: str,
        worker_id: str | None = None,
        result: dict[str, Any] | None = None,
        thumbnail_url: str | None = None,
    ) -> Task:
        """`complete`, safe to retry after a lost reply (a timeout, `StoreUnavailable`).

        When the task is already `Complete` with this `output_location` (and, given `worker_id`, by this
        worker), an earlier call went through: that task comes back instead of `TaskConflict`. Any other
        state raises as `complete` does, so a retry never overwrites another attempt's output.
        """
        try:
            return self.complete(task_id, output_location, worker_id, result, thumbnail_url)
        except TaskConflict:
            task = self.get(task_id)
            if (
                task.status == TaskStatus.COMPLETE
                and task.output_location == output_location
                and (worker_id is None or task.worker_id == worker_id)
            ):
                return task
            raise

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

    def start(self, task_id: str, worker_id: str) -> Task:
        """Take over one specific unfinished task for `worker_id` (→ `In Progress`), whatever state it was
        left in: how an orchestrator drives the rows that mirror its steps, and resumes them after a crash.
        `Complete` → `TaskConflict`."""
        if not worker_id:
            raise InvalidTask("worker_id", "must not be empty")
        return self._start(task_id, worker_id)

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

    # --- what backends implement behind the checks above ----------------------------------------
    @abc.abstractmethod
    def _list(
        self,
        *,
        status: TaskStatus | None,
        task_type: str | None,
        project_id: str | None,
        limit: int,
        offset: int,
    ) -> list[Task]: ...

    @abc.abstractmethod
    def _claim_next(self, worker_id: str, task_types: list[str] | None, limit: int) -> list[Task]:
        """`task_types` is None (any type) or a sorted, non-empty list; `limit` ≥ 1."""

    @abc.abstractmethod
    def _set_progress(self, task_id: str, worker_id: str, progress: float, message: str | None) -> bool: ...

    @abc.abstractmethod
    def _complete(
        self,
        task_id: str,
        output_location: str,
        worker_id: str | None,
        result: dict[str, Any] | None,
        thumbnail_url: str | None,
    ) -> Task:
        """`result` is None or a JSON-serialisable dict; `thumbnail_url` None or a non-empty string, written
        into the params (`db.thumbnails`) by the same statement or transaction that completes the row."""

    @abc.abstractmethod
    def _start(self, task_id: str, worker_id: str) -> Task: ...


def _json_object(value: dict[str, Any] | None, field: str) -> dict[str, Any] | None:
    """`value` as a plain JSON object (None stays None); `InvalidTask` naming `field` otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidTask(field, f"must be a JSON object, got {type(value).__name__}")
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidTask(field, f"is not JSON-serialisable: {exc}") from None
    if len(encoded) > MAX_PARAMS_BYTES:
        raise InvalidTask(field, f"is {len(encoded)} bytes of JSON; the limit is {MAX_PARAMS_BYTES}")
    return json.loads(encoded)


def new_task(**fields: Any) -> NewTask:
    """Build a `NewTask`, turning pydantic's error into `InvalidTask` naming the first bad field."""

    try:
        return NewTask(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "task"
        problem = first["msg"].removeprefix("Value error, ")
        raise InvalidTask(field, problem) from None
