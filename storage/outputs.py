"""Local-first output storage: save an artifact under ``{root}/{task_id}/{filename}``, then upload it.

``output_location`` rules (what the ingress writes into the tasks table):

* local only: ``{location_prefix}/{task_id}/{filename}`` (default ``files/{task_id}/{filename}``), a path
  relative to the public root; with the default ``root`` of ``public/files`` the file is
  ``public/files/{task_id}/{filename}``.
* uploaded: the object's public URL (Supabase, or S3 with ``public_base_url``) or ``s3://bucket/key``.

The local copy is always kept, so outputs can be streamed or fed to dependent tasks without a
download; :meth:`OutputStorage.resolve_local` maps any of these locations back to it.

Reliability contract (what the dispatcher relies on to keep an artifact until its row is ``Complete``):

* A file under an output's name is always complete (temp file, fsync, rename; the temp file is removed
  when the write fails). A failed local write raises :class:`~storage.errors.StorageUnavailable`
  (``retryable=True``); a failed upload raises ``StorageError(retryable=True)`` and keeps the local file.
* :meth:`OutputStorage.save` records a receipt (``{root}/.receipts/{task_id}.json``) once the output is
  fully stored (written, and uploaded when a backend is configured). Saving the same bytes under the
  same task id and filename again returns the same location without rewriting or re-uploading.
* :meth:`OutputStorage.find_saved` returns that fully stored output, so a re-claimed task whose
  artifact was stored by an earlier attempt can complete without generating again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import StorageConfig
from .errors import StorageError, StorageUnavailable
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


# Receipts of fully stored outputs live in {root}/.receipts/{task_id}.json: a leading dot is never a
# task id, so the folder cannot collide with a task's outputs, and task folders hold only outputs.
RECEIPTS_DIR = ".receipts"


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
        """Store ``artifact`` as the output of ``task_id``: locally, then uploaded if a backend is configured.

        Idempotent: when the same bytes are already fully stored under the same name (an earlier
        attempt, or a retry after a failed ``complete``), returns the same location without writing or
        uploading again. When only the upload was missing, only the upload runs.

        Raises StorageError: not retryable for an invalid task id; ``StorageUnavailable`` (retryable)
        when the disk write fails; retryable with ``local_path`` set when every upload attempt failed.
        """
        name = sanitize_filename(artifact.filename, artifact.media_type)
        path = self._output_path(task_id, name)
        digest = hashlib.sha256(artifact.data).hexdigest()
        stored = self.find_saved(task_id)
        if (
            stored is not None
            and stored.local_path == path
            and self._receipt(task_id).get("sha256") == digest
        ):
            logger.info("output %s of task %s is already stored at %s", name, task_id, stored.output_location)
            return stored
        # A different output (a regenerated video) replaces the file; the old receipt then no longer
        # matches its bytes, so find_saved ignores it until the new receipt is written.
        saved = self._store(path, artifact.data, artifact.media_type)
        self._write_receipt(saved, digest, len(artifact.data))
        return saved

    async def asave(self, task_id: str, artifact: ArtifactLike) -> SavedOutput:
        return await asyncio.to_thread(self.save, task_id, artifact)

    async def asave_retrying(
        self, task_id: str, artifact: ArtifactLike, *, within_s: float, base_delay: float = 0.5
    ) -> SavedOutput:
        """:meth:`asave`, retried with backoff (``base_delay`` doubling up to 10 s) while the error is
        retryable and ``within_s`` seconds have not passed; the artifact stays in memory meanwhile.
        Raises the last StorageError. Cancel the call to give up early (e.g. when the claim is lost)."""
        deadline = time.monotonic() + within_s
        for attempt in itertools.count():
            try:
                return await self.asave(task_id, artifact)
            except StorageError as error:
                delay = min(base_delay * 2**attempt, 10.0)
                if not error.retryable or time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "saving the output of task %s failed, retrying in %.1f s: %s", task_id, delay, error
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # itertools.count never ends

    def save_bytes(self, task_id: str, data: bytes, filename: str, media_type: str) -> SavedOutput:
        """Store an extra file of ``task_id`` (a debug video, a side output): like :meth:`save`, but it is
        not recorded as the task's output (no receipt), and uploaded again on every call."""
        path = self._output_path(task_id, sanitize_filename(filename, media_type))
        return self._store(path, data, media_type)

    def _output_path(self, task_id: str, name: str) -> Path:
        try:
            validate_task_id(task_id)
        except ValueError as error:
            raise StorageError(str(error)) from error
        return self.root / task_id / name

    def _store(self, path: Path, data: bytes, media_type: str) -> SavedOutput:
        """Write ``path`` unless it already holds exactly ``data``, then upload it when configured."""
        task_id, name = path.parent.name, path.name
        if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
            except OSError as error:
                raise StorageUnavailable(
                    f"saving output {name} of task {task_id} to {path} failed: {error}", errno=error.errno
                ) from error
            logger.info("saved output of task %s to %s (%d bytes)", task_id, path, len(data))
        if self.uploader is None:
            return SavedOutput(path, f"{self.config.location_prefix}/{task_id}/{name}", uploaded=False)
        location = self.uploader.upload(path, self.uploader.key_for(task_id, name), media_type)
        logger.info("uploaded output of task %s to %s", task_id, location)
        return SavedOutput(path, location, uploaded=True)

    # --- receipts: which output of a task is fully stored -----------------------------------------

    def _receipt_path(self, task_id: str) -> Path:
        return self.root / RECEIPTS_DIR / f"{validate_task_id(task_id)}.json"

    def _receipt(self, task_id: str) -> dict[str, Any]:
        try:
            receipt = json.loads(self._receipt_path(task_id).read_text())
        except (OSError, ValueError):
            return {}
        return receipt if isinstance(receipt, dict) else {}

    def _write_receipt(self, saved: SavedOutput, digest: str, size: int) -> None:
        receipt = {
            "filename": saved.local_path.name,
            "sha256": digest,
            "size": size,
            "output_location": saved.output_location,
            "uploaded": saved.uploaded,
        }
        path = self._receipt_path(saved.local_path.parent.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(receipt).encode())
        except OSError as error:
            # The output itself is stored; without a receipt a later save only repeats the work.
            logger.warning("could not record the receipt of %s: %s", saved.local_path, error)

    def find_saved(self, task_id: str) -> SavedOutput | None:
        """The output an earlier :meth:`save` of ``task_id`` fully stored, or None.

        Fully stored: the receipt names a local file that is still there with the recorded bytes
        (sha256 checked), and it was uploaded when an upload backend is configured now.
        """
        receipt = self._receipt(task_id)
        filename = receipt.get("filename")
        if not isinstance(filename, str) or sanitize_filename(filename) != filename:
            return None
        path = self.root / task_id / filename
        uploaded = bool(receipt.get("uploaded"))
        if self.uploader is not None and not uploaded:
            return None
        try:
            if path.stat().st_size != receipt.get("size"):
                return None
            if hashlib.sha256(path.read_bytes()).hexdigest() != receipt.get("sha256"):
                return None
        except OSError:
            return None
        return SavedOutput(path, str(receipt["output_location"]), uploaded=uploaded)

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
