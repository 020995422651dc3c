"""complete-task's thumbnails, served by Deno against the real database: the original worker's first
frame (`first_frame_data` / `first_frame_filename`), the image thumbnail complete-task makes, the URL in
the task's params, and the 400s for bad input (with nothing uploaded)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from supabase_fixtures import EdgeFunctions, StorageObjects

from db.models import TaskStatus
from db.store import TaskStore
from db.supabase_store import SupabaseTaskStore


@pytest.fixture
def fn(edge_functions: EdgeFunctions, clean_supabase: str) -> EdgeFunctions:
    return edge_functions


@pytest.fixture
def direct(clean_supabase: str):
    with SupabaseTaskStore("supabase+" + clean_supabase) as store:
        yield store


def jpeg(width: int = 32, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def png(width: int, height: int) -> bytes:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = 250  # bright left half, dark right half
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def public(fn: EdgeFunctions, key: str) -> str:
    return f"{fn.url}/storage/v1/object/public/{key}"


def test_the_original_workers_first_frame_is_stored_and_recorded_in_params(
    fn: EdgeFunctions, direct: TaskStore, storage_objects: StorageObjects
):
    params = {"orchestrator_details": {"run_id": "r", "shot_id": "s"}, "prompt": "p", "segment_index": 0}
    task = direct.add("wan_2_2_i2v", params)
    direct.claim_next("w")
    frame = jpeg()
    answer = fn.post(
        "complete-task",
        {
            "task_id": task.id,
            "file_data": b64(b"\x00\x00\x00\x18ftypmp42 video bytes"),
            "filename": "out.mp4",
            "first_frame_data": b64(frame),
            "first_frame_filename": f"thumb_{task.id[:8]}.jpg",
        },
    )
    assert answer.status_code == 200, answer.text
    key = f"image_uploads/{task.id}/thumbnails/thumb_{task.id[:8]}.jpg"
    assert storage_objects.objects[key] == ("image/jpeg", frame)
    url = public(fn, key)
    body = answer.json()
    assert body["thumbnail_url"] == url  # what the original worker reads back
    assert body["public_url"] == body["output_location"] == public(fn, f"image_uploads/{task.id}/out.mp4")
    done = direct.get(task.id)
    assert done.status == TaskStatus.COMPLETE
    assert done.params == {
        **params,
        "orchestrator_details": {"run_id": "r", "shot_id": "s", "thumbnail_url": url},
    }


def test_an_image_gets_a_third_size_jpeg_made_by_complete_task(
    fn: EdgeFunctions, direct: TaskStore, storage_objects: StorageObjects
):
    task = direct.add("travel_stitch", {"full_orchestrator_payload": {"run_id": "r"}})
    direct.claim_next("w")
    answer = fn.post(
        "complete-task", {"task_id": task.id, "file_data": b64(png(90, 60)), "filename": "o.png"}
    )
    assert answer.status_code == 200, answer.text
    key = f"image_uploads/{task.id}/thumbnails/thumb_{task.id[:8]}.jpg"
    content_type, data = storage_objects.objects[key]
    thumb = Image.open(io.BytesIO(data))
    assert content_type == "image/jpeg" and thumb.format == "JPEG" and thumb.size == (30, 20)
    pixels = np.asarray(thumb.convert("RGB"), dtype=float)
    assert pixels[:, :13].mean() > 230 and pixels[:, 17:].mean() < 25  # the image, reduced
    assert direct.get(task.id).params == {
        "full_orchestrator_payload": {"run_id": "r", "thumbnail_url": public(fn, key), "accelerated": False}
    }


def test_an_image_that_does_not_decode_is_its_own_thumbnail(fn: EdgeFunctions, direct: TaskStore):
    task = direct.add("qwen_image", {"prompt": "p"})
    direct.claim_next("w")
    answer = fn.post(
        "complete-task", {"task_id": task.id, "file_data": b64(b"not a png"), "filename": "o.png"}
    )
    assert answer.status_code == 200, answer.text
    output = answer.json()["output_location"]
    assert direct.get(task.id).params == {
        "prompt": "p",
        "thumbnail_url": output,
    }  # as the original falls back


def test_a_worker_that_stored_its_own_thumbnail_sends_its_url(fn: EdgeFunctions, direct: TaskStore):
    task = direct.add("vace", {"prompt": "p"})
    direct.claim_next("w")
    answer = fn.post(
        "complete-task",
        {"task_id": task.id, "output_location": "https://cdn/o.mp4", "thumbnail_url": "https://cdn/t.jpg"},
    )
    assert answer.status_code == 200, answer.text
    assert direct.get(task.id).params == {"prompt": "p", "thumbnail_url": "https://cdn/t.jpg"}


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"first_frame_data": b64(jpeg())}, "first_frame_filename", "required"),
        ({"first_frame_filename": "thumb.jpg"}, "first_frame_data", "required"),
        ({"first_frame_data": "***", "first_frame_filename": "t.jpg"}, "first_frame_data", "base64"),
        ({"first_frame_data": b64(png(8, 8)), "first_frame_filename": "t.jpg"}, "first_frame_data", "JPEG"),
        ({"first_frame_data": b64(b"\xff\xd8\xff\xe0" + b"junk" * 9 + b"\xff\xd9"), "first_frame_filename": "t.jpg"}, "first_frame_data", "decode"),
        ({"first_frame_data": b64(jpeg()), "first_frame_filename": "t.png"}, "first_frame_filename", ".jpg"),
        ({"first_frame_data": "A" * (14 * 1024 * 1024), "first_frame_filename": "t.jpg"}, "first_frame_data", "limit"),
        ({"first_frame_data": b64(jpeg()), "first_frame_filename": "t.jpg", "thumbnail_url": "u"}, "thumbnail_url", "not both"),
        ({"thumbnail_url": 5}, "thumbnail_url", "string"),
    ],
)  # fmt: skip
def test_bad_thumbnails_are_400_naming_the_field_and_upload_nothing(
    fn: EdgeFunctions, direct: TaskStore, storage_objects: StorageObjects, extra: dict, field: str, words: str
):
    task = direct.add("t2v", {"prompt": "p"})
    direct.claim_next("w")
    body = {"task_id": task.id, "file_data": b64(b"video"), "filename": "o.mp4", **extra}
    answer = fn.post("complete-task", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field and words in answer.json()["error"]
    assert not any(key.startswith(f"image_uploads/{task.id}/") for key in storage_objects.objects)
    stored = direct.get(task.id)
    assert stored.status == TaskStatus.IN_PROGRESS and stored.params == {"prompt": "p"}


def test_the_http_store_sends_a_first_frame_with_its_file(
    fn: EdgeFunctions, direct: TaskStore, storage_objects: StorageObjects
):
    task = direct.add("t2v", {"prompt": "p"})
    direct.claim_next("w")
    frame = jpeg(16, 16)
    with SupabaseTaskStore(fn.store_url()) as store:
        done = store.complete_with_file(task.id, b"video", "o.mp4", worker_id="w", first_frame=frame)
    key = f"image_uploads/{task.id}/thumbnails/thumb_{task.id[:8]}.jpg"
    assert storage_objects.objects[key] == ("image/jpeg", frame)
    assert done.params == direct.get(task.id).params == {"prompt": "p", "thumbnail_url": public(fn, key)}
