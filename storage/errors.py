"""Errors the storage package raises on purpose; their messages are meant for a task's ``error_message``."""

from __future__ import annotations

from pathlib import Path


class StorageError(RuntimeError):
    """Saving or uploading an output failed.

    When the local save succeeded and only the upload failed, ``local_path`` names the file that was
    kept, so an operator can retry the upload by hand.
    """

    def __init__(self, message: str, *, local_path: Path | None = None, attempts: int | None = None):
        super().__init__(message)
        self.local_path = local_path
        self.attempts = attempts


class InputError(ValueError):
    """An input reference (URL, output location, local path) was refused or could not be fetched.

    The message always starts with the task field it came from, e.g.
    ``image_start: scheme 'file' is not allowed (use http(s) URLs, ...)``.
    """

    def __init__(self, field: str, problem: str, *, ref: str | None = None):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.ref = ref
