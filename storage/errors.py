"""Errors the storage package raises on purpose; their messages are meant for a task's ``error_message``."""

from __future__ import annotations

from pathlib import Path


class StorageError(RuntimeError):
    """Saving or uploading an output failed.

    When the local save succeeded and only the upload failed, ``local_path`` names the file that was
    kept, so the next :meth:`~storage.outputs.OutputStorage.save` of the same output only uploads it.

    ``retryable`` says whether the same save may succeed later (a full disk, an unreachable object
    store): the task should go back to the queue, not fail for good. A bad task id is not retryable.
    """

    def __init__(
        self,
        message: str,
        *,
        local_path: Path | None = None,
        attempts: int | None = None,
        retryable: bool = False,
    ):
        super().__init__(message)
        self.local_path = local_path
        self.attempts = attempts
        self.retryable = retryable


class StorageUnavailable(StorageError):
    """The local disk refused a write (full, read-only, I/O error, quota): retryable by definition.

    Nothing was recorded: the temp file was removed and no file exists under the output's name unless
    an earlier complete save put it there. ``errno`` is the OS error number (e.g. ``errno.ENOSPC``).
    """

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message, retryable=True)
        self.errno = errno


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
