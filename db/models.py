"""The task model: one row of the tasks table, and what a client may send to create one."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

TASK_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
MAX_PARAMS_BYTES = 1_000_000


class TaskStatus(StrEnum):
    """The statuses existing clients read (exactly these strings), plus `Cancelled`."""

    QUEUED = "Queued"
    IN_PROGRESS = "In Progress"
    COMPLETE = "Complete"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES

    @classmethod
    def parse(cls, value: str) -> TaskStatus:
        """Accept the exact value or a case/spacing variant (`in_progress`, `complete`)."""
        wanted = value.strip().lower().replace("_", " ").replace("-", " ")
        for status in cls:
            if status.value.lower() == wanted:
                return status
        choices = ", ".join(repr(s.value) for s in cls)
        raise ValueError(f"unknown status {value!r}; expected one of {choices}")


FINAL_STATUSES = frozenset({TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.CANCELLED})


class Task(BaseModel):
    """One row of the tasks table."""

    model_config = ConfigDict(use_enum_values=False)

    id: str
    task_type: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: TaskStatus = TaskStatus.QUEUED
    dependant_on: str | None = None
    project_id: str | None = None
    priority: int = 0
    output_location: str | None = None
    error_message: str | None = None
    worker_id: str | None = None
    attempts: int = 0
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    progress_message: str | None = None
    created_at: datetime
    updated_at: datetime
    heartbeat_at: datetime | None = None
    generation_started_at: datetime | None = None
    generation_processed_at: datetime | None = None
    result: dict[str, Any] | None = Field(
        default=None,
        description="What a completed task reports: model, seed and settings as applied, output size, timings.",
    )


class NewTask(BaseModel):
    """What a client sends to create a task. Validated before anything is written."""

    model_config = ConfigDict(extra="forbid")

    task_type: str
    params: dict[str, Any] = Field(default_factory=dict)
    dependant_on: str | None = None
    project_id: str | None = None
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    id: str | None = Field(default=None, description="Client-chosen task id (a UUID); generated when absent.")

    @field_validator("task_type")
    @classmethod
    def _task_type_is_a_name(cls, value: str) -> str:
        if not TASK_TYPE_PATTERN.match(value):
            raise ValueError("must be 1-100 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("params", mode="before")
    @classmethod
    def _params_is_a_json_object(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                ) from None
        if not isinstance(value, dict):
            raise ValueError(f"must be a JSON object, got {type(value).__name__}")
        try:
            encoded = json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"is not JSON-serialisable: {exc}") from None
        if len(encoded) > MAX_PARAMS_BYTES:
            raise ValueError(f"is {len(encoded)} bytes of JSON; the limit is {MAX_PARAMS_BYTES}")
        return value

    @field_validator("id", "dependant_on")
    @classmethod
    def _is_a_uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ValueError(f"{value!r} is not a UUID") from None

    @field_validator("project_id")
    @classmethod
    def _project_id_is_short(cls, value: str | None) -> str | None:
        if value is not None and not (0 < len(value) <= 200):
            raise ValueError("must be 1-200 characters")
        return value
