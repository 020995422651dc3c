"""The dispatcher's thumbnail step with real output storage and real ffmpeg."""

from __future__ import annotations

import numpy as np

from deployments.thumbnail_step import save_thumbnail
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
