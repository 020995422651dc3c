"""Thumbnails: first frame of videos, reduced images, named and recorded as the original does."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from storage.outputs import OutputStorage
from Wan2GP.artifact import Artifact
from Wan2GP.thumbnails import (
    image_thumbnail,
    thumbnail_artifact,
    thumbnail_filename,
    video_thumbnail,
)
from Wan2GP.video import encode_mp4, encode_png


def coloured_video(width: int, height: int) -> np.ndarray:
    video = np.zeros((5, height, width, 3), np.uint8)
    video[0] = (200, 40, 40)  # the first frame is red, the others blue
    video[1:] = (40, 40, 200)
    return video


def decoded(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG"
    return image


def test_video_thumbnail_is_the_first_frame_bounded_to_512():
    thumb = decoded(video_thumbnail(encode_mp4(coloured_video(704, 304), fps=16)))
    assert thumb.size == (512, 221)  # long side 512, aspect kept
    red, green, blue = np.asarray(thumb.convert("RGB")).reshape(-1, 3).mean(axis=0)
    assert red > 170 and blue < 80  # the first (red) frame, not the later blue ones
    small = decoded(video_thumbnail(coloured_video(64, 48)))
    assert small.size == (64, 48)  # never enlarged


def test_image_thumbnail_is_a_third_of_the_image_bounded():
    assert decoded(image_thumbnail(encode_png(np.full((600, 900, 3), 90, np.uint8)))).size == (300, 200)
    assert decoded(image_thumbnail(np.full((1200, 1800, 3), 90, np.uint8))).size == (512, 341)
    with pytest.raises(ValueError, match="not a decodable image"):
        image_thumbnail(b"not an image")


def test_thumbnail_artifact_per_media_type_and_stored_beside_the_output(tmp_path):
    task_id = "0f1e2d3c-4b5a-6978-8899-aabbccddeeff"
    assert thumbnail_filename(task_id) == "thumb_0f1e2d3c.jpg"
    video = Artifact(encode_mp4(coloured_video(96, 64), fps=16), f"{task_id}.mp4", "video/mp4")
    thumb = thumbnail_artifact(task_id, video)
    assert thumb.filename == "thumb_0f1e2d3c.jpg" and thumb.media_type == "image/jpeg"
    assert thumb.metadata == {"thumbnail_of": f"{task_id}.mp4", "width": 96, "height": 64}
    image = Artifact(encode_png(np.zeros((30, 60, 3), np.uint8)), "out.png", "image/png")
    assert thumbnail_artifact(task_id, image).metadata["width"] == 20
    assert thumbnail_artifact(task_id, Artifact(b"{}", "result.json", "application/json")) is None

    storage = OutputStorage.from_dict({"root": str(tmp_path)})
    saved = storage.save(task_id, video)
    saved_thumb = storage.save(task_id, thumb)
    assert saved_thumb.local_path.parent == saved.local_path.parent  # beside the output
    assert saved_thumb.output_location.endswith(f"/{task_id}/thumb_0f1e2d3c.jpg")
