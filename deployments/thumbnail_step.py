"""The thumbnail beside every output (issue 20), as the original worker sends one with each video.

`save_thumbnail` is the one call the dispatcher's save step makes: the output's first frame (a video) or
a third-size copy (an image), bounded to 512 px, stored with the task's files as `thumb_{id8}.jpg` (local
first, uploaded the same way as the output), and its location put in the artifact's metadata as
`thumbnail_url`, which the task's result carries. The original also writes `thumbnail_url` into the
task's params (`Wan2GP.thumbnails.params_with_thumbnail_url` says where); the task stores here have no
params update yet, so the result is where it is recorded.
"""

from __future__ import annotations

import logging

from storage import OutputStorage, StorageError
from Wan2GP.artifact import Artifact
from Wan2GP.thumbnails import thumbnail_artifact

logger = logging.getLogger("ray.serve")


def save_thumbnail(storage: OutputStorage, task_id: str, artifact: Artifact) -> str | None:
    """Store the thumbnail of `artifact` beside it; returns its location (also in
    `artifact.metadata["thumbnail_url"]`), or None for media with nothing to picture. A thumbnail that
    cannot be made or stored never fails the task: the reason goes in `metadata["thumbnail_error"]`."""
    try:
        thumbnail = thumbnail_artifact(task_id, artifact)
        if thumbnail is None:
            return None
        saved = storage.save(task_id, thumbnail)
    except (ValueError, OSError, StorageError) as error:
        logger.warning("task %s: no thumbnail: %s", task_id, error)
        artifact.metadata["thumbnail_error"] = str(error).splitlines()[0]
        return None
    artifact.metadata["thumbnail_url"] = saved.output_location
    return saved.output_location
