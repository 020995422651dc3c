"""The dispatcher's thumbnail step with real output storage and real ffmpeg."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from test_dispatcher import FakeGpu, in_loop, make_dispatcher, until

from db.models import TaskStatus
from db.store import TaskStore, open_store
from deployments.dispatcher import Dispatcher
from deployments.thumbnail_step import save_row_thumbnail, save_thumbnail, stored_thumbnail
from storage import OutputStorage, StorageConfig
from Wan2GP.artifact import Artifact
from Wan2GP.video import encode_mp4, encode_png, load_image

TASK_ID = "0c4f7b6e-1d2a-4c3b-9e8f-123456789abc"


def storage(tmp_path) -> OutputStorage:
    return OutputStorage(StorageConfig(root=str(tmp_path / "files")))


def test_video_thumbnail_is_its_first_frame_beside_the_output(tmp_path):
    frames = np.zeros((5, 48, 64, 3), np.uint8)
    frames[0, :, :32] = 200  # only the first frame has a bright left half
    frames[1:] = 30
    artifact = Artifact(encode_mp4(frames, fps=16), "out.mp4", "video/mp4", {})
    location = save_thumbnail(storage(tmp_path), TASK_ID, artifact)
    assert location is not None and location.endswith(f"/{TASK_ID}/thumb_0c4f7b6e.jpg")
    assert artifact.metadata["thumbnail_url"] == location
    thumb = load_image((tmp_path / "files" / TASK_ID / "thumb_0c4f7b6e.jpg").read_bytes())
    assert thumb.shape == (48, 64, 3)
    assert thumb[:, :28].mean() > 180 and thumb[:, 36:].mean() < 20


def test_image_thumbnail_is_a_third_of_it(tmp_path):
    artifact = Artifact(encode_png(np.full((96, 129, 3), 90, np.uint8)), "out.png", "image/png", {})
    save_thumbnail(storage(tmp_path), TASK_ID, artifact)
    assert load_image((tmp_path / "files" / TASK_ID / "thumb_0c4f7b6e.jpg").read_bytes()).shape == (32, 43, 3)


def test_no_thumbnail_never_fails_the_task(tmp_path):
    broken = Artifact(b"not a video", "out.mp4", "video/mp4", {})
    assert save_thumbnail(storage(tmp_path), TASK_ID, broken) is None
    assert "not a decodable video" in broken.metadata["thumbnail_error"]
    text = Artifact(b"{}", "out.json", "application/json", {})
    assert save_thumbnail(storage(tmp_path), TASK_ID, text) is None and text.metadata == {}
    assert not (tmp_path / "files" / TASK_ID).exists()


def test_a_row_sharing_the_runs_output_gets_its_own_thumbnail(tmp_path):
    # A travel_stitch row completed with its orchestrator's video: the thumbnail goes under the row's id,
    # and the orchestrator's artifact (its result's metadata) is not touched; a broken one fails nothing.
    row_id = "9a8b7c6d-1d2a-4c3b-9e8f-123456789abc"
    video = Artifact(
        encode_mp4(np.full((3, 48, 64, 3), 99, np.uint8), fps=16), "f.mp4", "video/mp4", {"x": 1}
    )
    location = save_row_thumbnail(storage(tmp_path), row_id, video)
    assert location is not None and location.endswith(f"/{row_id}/thumb_9a8b7c6d.jpg")
    assert load_image((tmp_path / "files" / row_id / "thumb_9a8b7c6d.jpg").read_bytes()).shape == (48, 64, 3)
    assert video.metadata == {"x": 1}
    broken = Artifact(b"not a video", "f.mp4", "video/mp4", {})
    assert save_row_thumbnail(storage(tmp_path), row_id, broken) is None and broken.metadata == {}
    assert save_row_thumbnail(storage(tmp_path), row_id, None) is None
    # Once the run's own thumbnail is stored (the dispatcher's step, before the run finishes its rows), the
    # row's is a copy of it: the video is not decoded again (here it could not be).
    outputs = storage(tmp_path)
    run = Artifact(video.data, "f.mp4", "video/mp4", {})
    save_thumbnail(outputs, TASK_ID, run)
    undecodable = Artifact(b"not a video", "f.mp4", "video/mp4", dict(run.metadata))
    other_row = "8a8b7c6d-1d2a-4c3b-9e8f-123456789abc"
    copied = save_row_thumbnail(outputs, other_row, undecodable)
    assert copied is not None and copied.endswith(f"/{other_row}/thumb_8a8b7c6d.jpg")
    stored = (tmp_path / "files" / TASK_ID / "thumb_0c4f7b6e.jpg").read_bytes()
    assert (tmp_path / "files" / other_row / "thumb_8a8b7c6d.jpg").read_bytes() == stored
    assert "thumbnail_error" not in undecodable.metadata


def test_a_thumbnail_is_never_taken_for_the_tasks_output(tmp_path):
    # The thumbnail is stored before the output: if the output's save then fails (or the process dies), the
    # next attempt's `find_saved` must not find the thumbnail and complete the task with it.
    outputs = storage(tmp_path)
    video = Artifact(encode_mp4(np.full((3, 32, 32, 3), 99, np.uint8), fps=16), "out.mp4", "video/mp4", {})
    location = save_thumbnail(outputs, TASK_ID, video)
    assert location is not None and outputs.find_saved(TASK_ID) is None
    saved = outputs.save(TASK_ID, video)
    assert outputs.find_saved(TASK_ID) == saved
    # A task completed from that stored output (a later attempt) finds its thumbnail again.
    assert stored_thumbnail(outputs, TASK_ID) == location
    assert stored_thumbnail(outputs, "1c4f7b6e-1d2a-4c3b-9e8f-123456789abc") is None


@pytest.fixture
def running() -> list[Dispatcher]:
    """Dispatchers a test started: `in_loop` stops them before its event loop closes."""
    return []


@pytest.fixture
def store(tmp_path) -> Iterator[TaskStore]:
    with open_store(f"sqlite:///{tmp_path / 'tasks.db'}") as opened:
        yield opened


@in_loop
async def test_a_task_completed_from_an_earlier_attempts_output_records_its_thumbnail(
    store, tmp_path, running
):
    # An earlier attempt stored the output and its thumbnail, then could not complete the row: the next
    # claim completes it without running again, the thumbnail in its params as after a normal run.
    gpu = FakeGpu()
    dispatcher = make_dispatcher(store, tmp_path, gpu, {"T2V": 1})
    task_id = store.add("t2v", {"prompt": "x", "shot_id": "s"}).id
    video = Artifact(encode_mp4(np.full((3, 32, 32, 3), 99, np.uint8), fps=16), "out.mp4", "video/mp4", {})
    location = save_thumbnail(dispatcher.storage, task_id, video)
    saved = dispatcher.storage.save(task_id, video)
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: store.get(task_id).status == TaskStatus.COMPLETE)
    task = store.get(task_id)
    assert gpu.started == [] and task.output_location == saved.output_location
    assert task.params == {"prompt": "x", "shot_id": "s", "thumbnail_url": location}
