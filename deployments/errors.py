"""The serving layer's domain errors (Ray-free, HTTP-free).

Routing and the store raise them; the api's one exception handler turns them into responses
(`TaskNotFound` 404, `TaskConflict` 409, `InvalidTask` 422 naming the field) and the dispatcher into
a `Failed` row with a readable message.
"""

from __future__ import annotations

from pydantic import ValidationError

from db.store import InvalidTask, TaskConflict, TaskNotFound, TaskStoreError

__all__ = [
    "InvalidParams",
    "InvalidTask",
    "TaskConflict",
    "TaskNotFound",
    "TaskStoreError",
    "describe_validation_error",
]


def describe_validation_error(error: ValidationError) -> str:
    """`resolution: expected WxH, got 'abc'; …` — field names first, as a user reads them."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "params"
        parts.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class InvalidParams(InvalidTask):
    """Params failed their model's validation; `errors` holds each (location within params, message)."""

    def __init__(self, error: ValidationError):
        self.errors = [(tuple(str(p) for p in e["loc"]), e["msg"]) for e in error.errors()]
        super().__init__("params", describe_validation_error(error))
