"""The thumbnail beside every output (issue 20), as the original worker sends one with each video.

`save_thumbnail` is the one call the dispatcher's save step makes: the output's first frame (a video) or
a third-size copy (an image), bounded to 512 px, stored with the task's files as `thumb_{id8}.jpg` (local
first, uploaded the same way as the output, never recorded as the output), and its location put in the
artifact's metadata as `thumbnail_url`, which the task's result carries. The dispatcher then hands that location to the store's
`complete(…, thumbnail_url=)`, which writes it into the task's params where the original does
(`db/thumbnails.py`) in the same write that completes the row.

Rows an orchestration completes itself (travel segments and the `travel_stitch` row, a join chain's rows,
a perspective's final row) get theirs the same way from the orchestration, on its blocking thread:
`save_thumbnail` for a step's own output, `save_row_thumbnail` for a row that shares the run's output.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from storage import OutputStorage, StorageError
from Wan2GP.artifact import Artifact
from Wan2GP.thumbnails import THUMBNAIL_MEDIA_TYPE, thumbnail_artifact, thumbnail_filename

logger = logging.getLogger("ray.serve")


def save_thumbnail(storage: OutputStorage, task_id: str, artifact: Artifact) -> str | None:
    """Store the thumbnail of `artifact` beside it; returns its location (also in
    `artifact.metadata["thumbnail_url"]`), or None for media with nothing to picture. A thumbnail that
    cannot be made or stored never fails the task: the reason goes in `metadata["thumbnail_error"]`."""
    try:
        thumbnail = thumbnail_artifact(task_id, artifact)
        if thumbnail is None:
            return None
        # An extra file, not the task's output: `save` would write the receipt that `find_saved` takes
        # for the output, and a later attempt would complete the task with its thumbnail.
        saved = storage.save_bytes(task_id, thumbnail.data, thumbnail.filename, thumbnail.media_type)
    except (ValueError, OSError, StorageError) as error:
        logger.warning("task %s: no thumbnail: %s", task_id, error)
        artifact.metadata["thumbnail_error"] = str(error).splitlines()[0]
        return None
    artifact.metadata["thumbnail_url"] = saved.output_location
    return saved.output_location


def save_row_thumbnail(storage: OutputStorage, row_id: str, output: Artifact | None) -> str | None:
    """`save_thumbnail` for a row completed with the run's own output (`travel_stitch`, a chain's last
    join, a perspective's final row): stored under the row's id as `thumb_{row_id[:8]}.jpg`, leaving
    `output`'s metadata, which is the orchestrator's result, as it is. None when there is no output."""
    if output is None:
        return None
    # The run's own thumbnail, stored by the dispatcher just before, pictures the same video: its bytes are
    # copied rather than the video decoded again.
    stored = output.metadata.get("thumbnail_url")
    local = storage.resolve_local(stored) if isinstance(stored, str) else None
    if local is not None:
        try:
            return _store_thumbnail_file(storage, row_id, local)
        except (OSError, ValueError, StorageError) as error:
            logger.warning("row %s: the run's thumbnail could not be copied (%s); making one", row_id, error)
    return save_thumbnail(storage, row_id, dataclasses.replace(output, metadata={}))


def stored_thumbnail(storage: OutputStorage, task_id: str) -> str | None:
    """The location of the thumbnail an earlier attempt stored for `task_id` (uploaded again when an
    upload backend is configured, so the location is current), or None. For a task completed from an
    output an earlier attempt stored."""
    try:
        return _store_thumbnail_file(
            storage, task_id, storage.local_path(task_id, thumbnail_filename(task_id))
        )
    except (OSError, ValueError, StorageError) as error:
        if not isinstance(error, FileNotFoundError):
            logger.warning("task %s: stored thumbnail not recorded: %s", task_id, error)
        return None


def _store_thumbnail_file(storage: OutputStorage, task_id: str, path: Path) -> str:
    """Store the thumbnail file at ``path`` as ``task_id``'s (local first, uploaded as configured); its location."""
    saved = storage.save_bytes(task_id, path.read_bytes(), thumbnail_filename(task_id), THUMBNAIL_MEDIA_TYPE)
    return saved.output_location
