"""The errors every task store raises, whatever the backend.

The API maps them to HTTP answers: `TaskNotFound` → 404, `InvalidTask` → 422, `TaskConflict` → 409,
`TaskForbidden` → 403, `StoreUnavailable` → 503 with `Retry-After: StoreUnavailable.retry_after_s`.
"""

from __future__ import annotations


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


class TaskForbidden(TaskStoreError, PermissionError):
    """The credentials are missing, invalid, or do not own the task's project (Supabase)."""


class StoreUnavailable(TaskStoreError):
    """The database cannot answer now: unreachable, restarting, locked or slow past the store's timeout.

    The call may be retried later (`retry_after_s` is a sensible first wait). Its transaction was rolled
    back, except when the connection dropped during the commit itself: then a write may have landed, and
    the retry meets the new state (e.g. `TaskConflict` for a second claim-guarded write).
    """

    retry_after_s = 5

    def __init__(self, message: str):
        super().__init__(message)
