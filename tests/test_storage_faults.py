"""Storage under real faults: a tmpfs that fills up (ENOSPC), a read-only remount (EROFS), an object store
that is not there yet. Nothing truncated is ever recorded, every write error is retryable, and saving
again after the fault is gone stores the output once (idempotent save, receipts, `find_saved`)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from disk_fixtures import files_under, fill_disk
from storage_fixtures import S3Server, admin_fs

from storage import OutputStorage, S3Settings, StorageConfig, StorageError, StorageUnavailable
from Wan2GP.artifact import Artifact


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _task_id() -> str:
    return str(uuid.uuid4())


def test_full_disk_records_nothing_and_is_retryable(small_disk: Path):
    storage = OutputStorage(StorageConfig(root=small_disk / "files"))
    task_id = _task_id()
    video = os.urandom(300_000)
    filler = fill_disk(small_disk, leave_free=100_000)  # the write starts, then runs out of space

    with pytest.raises(StorageUnavailable) as info:
        storage.save(task_id, Artifact(video, "clip.mp4", "video/mp4"))

    assert info.value.retryable is True
    assert info.value.errno == errno.ENOSPC
    assert "clip.mp4" in str(info.value) and task_id in str(info.value)
    assert files_under(small_disk / "files") == []  # no truncated output, no temp file, no receipt
    assert storage.find_saved(task_id) is None

    filler.unlink()  # space comes back: the same save now stores it completely
    saved = storage.save(task_id, Artifact(video, "clip.mp4", "video/mp4"))
    assert saved.local_path.read_bytes() == video
    assert storage.find_saved(task_id) == saved
    assert files_under(small_disk / "files") == [f".receipts/{task_id}.json", f"{task_id}/clip.mp4"]


def test_a_failed_overwrite_keeps_the_complete_earlier_output(small_disk: Path):
    storage = OutputStorage(StorageConfig(root=small_disk / "files"))
    task_id = _task_id()
    first = storage.save(task_id, Artifact(b"first complete video", "clip.mp4", "video/mp4"))
    fill_disk(small_disk, leave_free=50_000)

    with pytest.raises(StorageUnavailable):
        storage.save(task_id, Artifact(os.urandom(200_000), "clip.mp4", "video/mp4"))

    assert first.local_path.read_bytes() == b"first complete video"
    assert storage.find_saved(task_id) == first


def test_read_only_disk_is_retryable(small_disk: Path):
    storage = OutputStorage(StorageConfig(root=small_disk / "files"))
    (small_disk / "files").mkdir()
    _mount("-o", "remount,ro", str(small_disk))
    task_id = _task_id()

    with pytest.raises(StorageUnavailable) as info:
        storage.save(task_id, Artifact(b"png bytes", "frame.png", "image/png"))

    assert info.value.retryable is True and info.value.errno == errno.EROFS
    _mount("-o", "remount,rw", str(small_disk))
    assert files_under(small_disk / "files") == []


def test_asave_retrying_waits_for_space_with_the_artifact_in_memory(small_disk: Path):
    storage = OutputStorage(StorageConfig(root=small_disk / "files"))
    task_id = _task_id()
    video = os.urandom(400_000)
    filler = fill_disk(small_disk, leave_free=10_000)
    freed = threading.Timer(0.5, filler.unlink)  # an operator frees space while the save retries
    freed.start()
    try:
        saved = asyncio.run(
            storage.asave_retrying(
                task_id, Artifact(video, "clip.mp4", "video/mp4"), within_s=20, base_delay=0.1
            )
        )
    finally:
        freed.cancel()

    assert saved.local_path.read_bytes() == video
    assert storage.find_saved(task_id) == saved


def test_asave_retrying_gives_up_after_its_bound(small_disk: Path):
    storage = OutputStorage(StorageConfig(root=small_disk / "files"))
    fill_disk(small_disk, leave_free=10_000)

    with pytest.raises(StorageUnavailable):
        asyncio.run(
            storage.asave_retrying(
                _task_id(), Artifact(os.urandom(200_000), "c.mp4", "video/mp4"), within_s=0.5, base_delay=0.1
            )
        )


def test_invalid_task_id_is_not_retryable(tmp_path: Path):
    storage = OutputStorage(StorageConfig(root=tmp_path / "files"))
    with pytest.raises(StorageError) as info:
        storage.save("../escape", Artifact(b"x", "a.png", "image/png"))
    assert info.value.retryable is False and not isinstance(info.value, StorageUnavailable)


def test_saving_the_same_output_again_does_not_rewrite_it(tmp_path: Path):
    storage = OutputStorage(StorageConfig(root=tmp_path / "files"))
    task_id = _task_id()
    first = storage.save(task_id, Artifact(b"video bytes", "clip.mp4", "video/mp4"))
    before = first.local_path.stat()

    again = storage.save(task_id, Artifact(b"video bytes", "clip.mp4", "video/mp4"))

    assert again == first
    after = first.local_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_find_saved_checks_the_stored_bytes(tmp_path: Path):
    storage = OutputStorage(StorageConfig(root=tmp_path / "files"))
    task_id = _task_id()
    assert storage.find_saved(task_id) is None
    assert storage.find_saved("../not-a-task-id") is None

    saved = storage.save(task_id, Artifact(b"0123456789", "clip.mp4", "video/mp4"))
    assert storage.find_saved(task_id) == saved

    saved.local_path.write_bytes(b"9876543210")  # same size, other bytes
    assert storage.find_saved(task_id) is None
    saved.local_path.unlink()
    assert storage.find_saved(task_id) is None

    # A regenerated, different output replaces the file and the receipt.
    other = storage.save(task_id, Artifact(b"another video", "clip.mp4", "video/mp4"))
    assert storage.find_saved(task_id) == other and other.local_path.read_bytes() == b"another video"


# --- uploads ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


def test_upload_failure_keeps_the_local_file_and_the_retry_only_uploads(s3_server: S3Server, tmp_path: Path):
    bucket = f"later-{uuid.uuid4().hex[:12]}"  # does not exist yet: every upload attempt fails
    settings = S3Settings(
        bucket=bucket, endpoint=f"http://{s3_server.endpoint}", access_key="testing", secret_key="testing"
    )
    storage = OutputStorage(
        StorageConfig(root=tmp_path / "files", s3=settings, upload_attempts=2, upload_base_delay=0.01)
    )
    task_id = _task_id()
    video = os.urandom(5000)

    with pytest.raises(StorageError) as info:
        storage.save(task_id, Artifact(video, "clip.mp4", "video/mp4"))

    assert info.value.retryable is True
    local = tmp_path / "files" / task_id / "clip.mp4"
    assert info.value.local_path == local and local.read_bytes() == video
    assert storage.find_saved(task_id) is None  # not fully stored: the upload is missing
    written = local.stat()

    admin_fs(s3_server).create_dir(bucket)
    saved = storage.save(task_id, Artifact(video, "clip.mp4", "video/mp4"))

    assert saved.uploaded is True and saved.output_location == f"s3://{bucket}/{task_id}/clip.mp4"
    assert (local.stat().st_ino, local.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    with admin_fs(s3_server).open_input_stream(f"{bucket}/{task_id}/clip.mp4") as stream:
        assert stream.read() == video
    assert storage.find_saved(task_id) == saved

    puts_before = sum(1 for p in s3_server.gateway.paths if p.endswith(f"{task_id}/clip.mp4"))
    assert storage.save(task_id, Artifact(video, "clip.mp4", "video/mp4")) == saved
    puts_after = sum(1 for p in s3_server.gateway.paths if p.endswith(f"{task_id}/clip.mp4"))
    # Already fully stored: no request to the object store at all.
    assert puts_before > 0 and puts_after == puts_before
