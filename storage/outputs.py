"""Local-first output storage: save an artifact under ``{root}/{task_id}/{filename}``, then upload it.

``output_location`` rules (what the ingress writes into the tasks table):

* local only: ``{location_prefix}/{task_id}/{filename}`` (default ``files/{task_id}/{filename}``), a path
  relative to the public root; with the default ``root`` of ``public/files`` the file is
  ``public/files/{task_id}/{filename}``.
* uploaded: the object's public URL (Supabase, or S3 with ``public_base_url``) or ``s3://bucket/key``.

The local copy is always kept, so outputs can be streamed or fed to dependent tasks without a
download; :meth:`OutputStorage.resolve_local` maps any of these locations back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import StorageConfig
from .errors import StorageError
from .names import sanitize_filename, validate_task_id
from .uploaders import S3Uploader

logger = logging.getLogger(__name__)


class ArtifactLike(Protocol):
    """What :meth:`OutputStorage.save` reads from an artifact (``Wan2GP.artifact.Artifact`` has it)."""

    data: bytes
    filename: str
    media_type: str


@dataclass(frozen=True)
class SavedOutput:
    local_path: Path
    output_location: str
    uploaded: bool


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, the old file, or complete.

    The bytes go to a hidden temp file in the same folder, are fsynced, then renamed over ``path``
    (``os.replace`` is atomic on POSIX), so a crash never leaves a half-written output under its name.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; outputs are meant to be served
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # Persist the rename itself; not every filesystem lets a directory be opened, hence best effort.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class OutputStorage:
    """Saves outputs locally, uploads them when an object store is configured, and finds them again.

    ``save`` blocks (disk and network I/O): async callers use :meth:`asave`, which runs it in a thread.
    A relative ``config.root`` is taken relative to the working directory at construction time.
    """

    def __init__(self, config: StorageConfig | None = None, *, uploader: S3Uploader | None = None):
        self.config = config or StorageConfig()
        self.root = Path(self.config.root).absolute()
        if uploader is None:
            target = self.config.upload_target()
            if target is not None:
                uploader = S3Uploader(
                    target,
                    attempts=self.config.upload_attempts,
                    base_delay=self.config.upload_base_delay,
                    max_delay=self.config.upload_max_delay,
                    connect_timeout=self.config.connect_timeout,
                    request_timeout=self.config.request_timeout,
                )
        self.uploader = uploader

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OutputStorage:
        return cls(StorageConfig.from_env(env))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputStorage:
        """From plain data, e.g. the application builder's args: ``{"root": ..., "s3": {...}}``."""
        return cls(StorageConfig.model_validate(dict(data)))

    # --- saving -----------------------------------------------------------------------------------

    def local_path(self, task_id: str, filename: str) -> Path:
        """Where the output ``filename`` of ``task_id`` is (or would be) stored; the name is sanitized."""
        return self.root / validate_task_id(task_id) / sanitize_filename(filename)

    def local_location(self, task_id: str, filename: str) -> str:
        """The local-only ``output_location`` of an output."""
        return f"{self.config.location_prefix}/{validate_task_id(task_id)}/{sanitize_filename(filename)}"

    def save(self, task_id: str, artifact: ArtifactLike) -> SavedOutput:
        """Save ``artifact`` locally, then upload it if a backend is configured.

        Raises StorageError when the task id is invalid, the disk write fails, or every upload attempt
        failed; in the last case the local file is kept and named in ``error.local_path``.
        """
        return self.save_bytes(task_id, artifact.data, artifact.filename, artifact.media_type)

    async def asave(self, task_id: str, artifact: ArtifactLike) -> SavedOutput:
        return await asyncio.to_thread(self.save, task_id, artifact)

    def save_bytes(self, task_id: str, data: bytes, filename: str, media_type: str) -> SavedOutput:
        try:
            validate_task_id(task_id)
        except ValueError as error:
            raise StorageError(str(error)) from error
        name = sanitize_filename(filename, media_type)
        path = self.root / task_id / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as error:
            raise StorageError(f"saving output {name} of task {task_id} to {path} failed: {error}") from error
        logger.info("saved output of task %s to %s (%d bytes)", task_id, path, len(data))

        if self.uploader is None:
            return SavedOutput(path, f"{self.config.location_prefix}/{task_id}/{name}", uploaded=False)
        location = self.uploader.upload(path, self.uploader.key_for(task_id, name), media_type)
        logger.info("uploaded output of task %s to %s", task_id, location)
        return SavedOutput(path, location, uploaded=True)

    # --- finding outputs again ----------------------------------------------------------------------

    def task_and_filename(self, output_location: str) -> tuple[str, str] | None:
        """``(task_id, filename)`` of an output location of this storage, or None if it is not one."""
        location = str(output_location).strip()
        relative: str | None = None
        local_prefix = f"{self.config.location_prefix}/"
        if location.startswith(local_prefix):
            relative = location[len(local_prefix) :]
        elif location.startswith("/"):
            path = Path(location)
            if path.is_relative_to(self.root):
                relative = path.relative_to(self.root).as_posix()
        elif self.uploader is not None:
            key = self.uploader.key_from_location(location)
            if key is not None:
                relative = key[len(self.uploader.settings.prefix) :]
        if relative is None:
            return None
        parts = relative.split("/")
        if len(parts) != 2:
            return None
        task_id, filename = parts
        try:
            validate_task_id(task_id)
        except ValueError:
            return None
        # Every stored name is sanitized, so anything else (e.g. '..', '.x.part' temp files) is not ours.
        if not filename or sanitize_filename(filename) != filename:
            return None
        return task_id, filename

    def resolve_local(self, output_location: str) -> Path | None:
        """The local file behind an ``output_location`` of this storage, or None if there is none."""
        found = self.task_and_filename(output_location)
        if found is None:
            return None
        path = self.root / found[0] / found[1]
        return path if path.is_file() else None
