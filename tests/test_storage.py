"""storage/: local-first saving, uploads to a real S3-compatible server (moto), input fetching over loopback HTTP."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import resource
import signal
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pyarrow import fs as pafs
from pydantic import ValidationError
from storage_fixtures import MediaServer, S3Server, admin_fs

from hwgp_testing import free_port
from storage import (
    InputError,
    InputFetcher,
    OutputStorage,
    S3Settings,
    S3Uploader,
    StorageConfig,
    StorageError,
    atomic_write_bytes,
    sanitize_filename,
)
from Wan2GP.artifact import Artifact


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png_bytes()
VIDEO = b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000)  # bytes need not decode: storage never parses them


def _task_id() -> str:
    return str(uuid.uuid4())


def _files_under(folder: Path) -> list[Path]:
    """The stored files under `folder`, without save receipts (storage/outputs.py, `.receipts/`)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name != ".receipts")


# --- local saving ---------------------------------------------------------------------------------------


@pytest.fixture
def local_storage(tmp_path: Path) -> OutputStorage:
    return OutputStorage(StorageConfig(root=tmp_path / "public" / "files"))


def test_local_save_layout_and_location(local_storage: OutputStorage, tmp_path: Path):
    task_id = _task_id()
    saved = local_storage.save(task_id, Artifact(VIDEO, "run1_final.mp4", "video/mp4", {"frames": 17}))

    assert saved.local_path == tmp_path / "public" / "files" / task_id / "run1_final.mp4"
    assert saved.local_path.read_bytes() == VIDEO
    assert saved.output_location == f"files/{task_id}/run1_final.mp4"
    assert saved.uploaded is False
    # The location is relative to the public root, the parent of the files folder.
    assert (tmp_path / "public" / saved.output_location).read_bytes() == VIDEO
    assert stat.S_IMODE(saved.local_path.stat().st_mode) == 0o644
    assert _files_under(tmp_path) == [saved.local_path]


def test_resolve_local_round_trip(local_storage: OutputStorage):
    task_id = _task_id()
    saved = local_storage.save(task_id, Artifact(PNG, "frame.png", "image/png"))

    assert local_storage.resolve_local(saved.output_location) == saved.local_path
    assert local_storage.resolve_local(str(saved.local_path)) == saved.local_path
    assert local_storage.task_and_filename(saved.output_location) == (task_id, "frame.png")
    assert local_storage.local_location(task_id, "frame.png") == saved.output_location
    # The async variant (for the ingress's event loop) saves the same way, off the loop's thread.
    again = asyncio.run(local_storage.asave(task_id, Artifact(VIDEO, "frame2.mp4", "video/mp4")))
    assert local_storage.resolve_local(again.output_location).read_bytes() == VIDEO


@pytest.mark.parametrize(
    "location",
    [
        "files/../../etc/passwd",
        "files/{tid}/../../../etc/passwd",
        "files/{tid}/sub/frame.png",
        "files/{tid}/.frame.png.abc.part",
        "files/{tid}/missing.png",
        "files/not a task/frame.png",
        "/etc/passwd",
        "https://example.com/files/{tid}/frame.png",
        "s3://bucket/{tid}/frame.png",
        "",
    ],
)
def test_resolve_local_refuses_what_is_not_a_stored_output(local_storage: OutputStorage, location: str):
    task_id = _task_id()
    local_storage.save(task_id, Artifact(PNG, "frame.png", "image/png"))
    # A temp file as a crashed write would leave it: present on disk, but never an output.
    (local_storage.root / task_id / ".frame.png.abc.part").write_bytes(b"half")

    assert local_storage.resolve_local(location.format(tid=task_id)) is None


def test_overwrite_is_atomic_and_leaves_no_temp_files(local_storage: OutputStorage):
    task_id = _task_id()
    local_storage.save(task_id, Artifact(b"first version", "out.png", "image/png"))
    saved = local_storage.save(task_id, Artifact(PNG, "out.png", "image/png"))

    assert saved.local_path.read_bytes() == PNG
    assert [p.name for p in (local_storage.root / task_id).iterdir()] == ["out.png"]


def test_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path: Path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"complete old file")

    # A real short write: cap this process's file size, as a full disk would, so the write fails
    # after the first bytes reached the temp file (SIGXFSZ ignored -> write returns EFBIG).
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(OSError) as info:
            atomic_write_bytes(target, b"\x01" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)

    assert info.value.errno == errno.EFBIG
    assert target.read_bytes() == b"complete old file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


@pytest.mark.parametrize(
    ("filename", "media_type", "expected"),
    [
        ("../../etc/passwd", "image/png", "etc_passwd.png"),
        ("..\\..\\windows\\win.ini", "image/png", "windows_win.ini"),
        ("/abs/path/clip.mp4", "video/mp4", "abs_path_clip.mp4"),
        ("..", "video/mp4", "output.mp4"),
        (".hidden.png", "image/png", "hidden.png"),
        ("", "image/png", "output.png"),
        ("name\x00with\nnul\x1b.png", "image/png", "namewithnul.png"),
        ("spaces and $pecial;chars|.MP4", "video/mp4", "spaces_and_pecial_chars.mp4"),
        ("émoji 🎬 clip.mp4", "video/mp4", "moji_clip.mp4"),
        ("no_extension", "video/mp4", "no_extension.mp4"),
        ("a" * 300 + ".png", "image/png", "a" * 124 + ".png"),
        ("run_seg00_output.mp4", "video/mp4", "run_seg00_output.mp4"),
    ],
)
def test_filenames_are_sanitized(local_storage: OutputStorage, filename: str, media_type: str, expected: str):
    task_id = _task_id()
    saved = local_storage.save(task_id, Artifact(PNG, filename, media_type))

    assert saved.local_path.name == expected
    assert saved.local_path.parent == local_storage.root / task_id
    assert saved.output_location == f"files/{task_id}/{expected}"
    assert local_storage.resolve_local(saved.output_location) == saved.local_path
    assert _files_under(local_storage.root) == [saved.local_path]


@pytest.mark.parametrize("task_id", ["", "..", "../escape", "a/b", ".hidden", "has space", "x" * 129, "a..b"])
def test_invalid_task_ids_are_refused(local_storage: OutputStorage, task_id: str, tmp_path: Path):
    with pytest.raises(StorageError, match="not a valid task id"):
        local_storage.save(task_id, Artifact(PNG, "x.png", "image/png"))
    assert _files_under(tmp_path) == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.sampled_from([None, "image/png", "video/mp4"]))
@example("0:.0:", None)  # a trailing separator hid an extension until a second pass (found by this test)
def test_sanitize_filename_properties(filename: str, media_type: str | None):
    name = sanitize_filename(filename, media_type)

    assert 0 < len(name) <= 128
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert name.isascii() and name.isprintable() and " " not in name
    assert sanitize_filename(name) == name  # stable: resolve_local relies on it
    stem, dot, ext = filename.rpartition(".")
    if dot and ext.isascii() and ext.isalnum() and len(ext) <= 10:
        assert name.endswith("." + ext.lower())


# --- configuration ----------------------------------------------------------------------------------------


def test_config_from_env():
    assert StorageConfig.from_env({}).backend == "local"
    assert StorageConfig.from_env({"HWGP_OUTPUT_DIR": "/srv/out"}).root == Path("/srv/out")

    s3 = StorageConfig.from_env(
        {
            "HWGP_S3_BUCKET": "outputs",
            "HWGP_S3_ENDPOINT": "http://minio:9000",
            "HWGP_S3_PREFIX": "/hwgp/",
            "AWS_ACCESS_KEY_ID": "id",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "HWGP_UPLOAD_ATTEMPTS": "6",
        }
    )
    target = s3.upload_target()
    assert (s3.backend, s3.upload_attempts) == ("s3", 6)
    assert (target.endpoint, target.scheme, target.prefix, target.region) == (
        "minio:9000",
        "http",
        "hwgp/",
        "eu-west-1",
    )
    assert target.secret_key.get_secret_value() == "s3cr3t-value" and "s3cr3t" not in repr(target)

    supabase = StorageConfig.from_env(
        {
            "SUPABASE_URL": "https://abcd.supabase.co/",
            "SUPABASE_SERVICE_KEY": "svc",
            "SUPABASE_ANON_KEY": "anon",
        }
    )
    target = supabase.upload_target()
    assert supabase.backend == "supabase"
    assert (target.bucket, target.endpoint, target.scheme) == (
        "image_uploads",
        "abcd.supabase.co/storage/v1/s3",
        "https",
    )
    # Session-token scheme: project ref as key id, anon key as secret, service key as token.
    assert target.access_key == "abcd"
    assert target.secret_key.get_secret_value() == "anon"
    assert target.session_token.get_secret_value() == "svc"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SUPABASE_URL": "https://abcd.supabase.co", "SUPABASE_SERVICE_KEY": "svc"},
            "SUPABASE_S3_ACCESS_KEY_ID",
        ),
        (
            {
                "SUPABASE_URL": "abcd.supabase.co",
                "SUPABASE_S3_ACCESS_KEY_ID": "a",
                "SUPABASE_S3_SECRET_ACCESS_KEY": "b",
            },
            "SUPABASE_URL",
        ),
        ({"HWGP_S3_BUCKET": "Bad_Bucket!"}, "not a valid bucket name"),
        ({"HWGP_S3_BUCKET": "ok-bucket", "AWS_ACCESS_KEY_ID": "only-id"}, "given together"),
        ({"HWGP_S3_BUCKET": "ok-bucket", "HWGP_S3_PREFIX": "a/../b"}, "not a valid key prefix"),
        ({"HWGP_S3_BUCKET": "ok-bucket", "HWGP_S3_PUBLIC_BASE_URL": "https://cdn/{task}"}, "placeholders"),
        ({"HWGP_S3_BUCKET": "ok-bucket", "SUPABASE_URL": "https://x.supabase.co"}, "HWGP_STORAGE_BACKEND"),
        ({"HWGP_STORAGE_BACKEND": "gcs"}, "backend"),
        ({"HWGP_UPLOAD_ATTEMPTS": "0"}, "upload_attempts"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(env: dict[str, str], message: str):
    with pytest.raises((ValidationError, ValueError), match=message):
        StorageConfig.from_env(env)


def test_from_dict_names_the_bad_field():
    with pytest.raises(ValidationError) as info:
        OutputStorage.from_dict({"root": "out", "s3": {"bucket": "ok-bucket", "scheme": "ftp"}})
    assert "s3.scheme" in str(info.value)


# --- uploads to a real S3-compatible server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = f"hwgp-{uuid.uuid4().hex[:12]}"
    admin_fs(s3_server).create_dir(name)
    return name


def _s3_settings(server: S3Server, bucket: str, **overrides: object) -> S3Settings:
    values = {
        "bucket": bucket,
        "endpoint": f"http://{server.endpoint}",
        "access_key": "testing",
        "secret_key": "testing",
        **overrides,
    }
    return S3Settings(**values)


def test_s3_upload_key_layout_and_public_url(s3_server: S3Server, bucket: str, tmp_path: Path):
    config = StorageConfig(
        root=tmp_path / "files",
        s3=_s3_settings(
            s3_server, bucket, prefix="outputs", public_base_url="https://cdn.example.com/{bucket}/{key}"
        ),
    )
    storage = OutputStorage(config)
    task_id = _task_id()
    saved = storage.save(task_id, Artifact(VIDEO, "../clip.mp4", "video/mp4"))

    key = f"outputs/{task_id}/clip.mp4"
    assert saved.uploaded is True
    assert saved.output_location == f"https://cdn.example.com/{bucket}/{key}"
    assert saved.local_path.read_bytes() == VIDEO  # local copy kept
    admin = admin_fs(s3_server)
    listed = admin.get_file_info(pafs.FileSelector(bucket, recursive=True))
    assert sorted(info.path for info in listed if info.is_file) == [f"{bucket}/{key}"]
    with admin.open_input_stream(f"{bucket}/{key}") as stream:
        assert stream.read() == VIDEO
        assert stream.metadata()["Content-Type"] == b"video/mp4"
    assert storage.resolve_local(saved.output_location) == saved.local_path
    assert storage.resolve_local(f"https://cdn.example.com/{bucket}/{task_id}/clip.mp4") is None  # no prefix


def test_s3_location_without_public_url_and_fetch_back(s3_server: S3Server, bucket: str, tmp_path: Path):
    storage = OutputStorage(StorageConfig(root=tmp_path / "files", s3=_s3_settings(s3_server, bucket)))
    task_id = _task_id()
    saved = storage.save(task_id, Artifact(PNG, "frame.png", "image/png"))
    assert saved.output_location == f"s3://{bucket}/{task_id}/frame.png"
    assert storage.resolve_local(saved.output_location) == saved.local_path

    # The local copy is gone (another machine, a cleaned disk): the fetcher reads the object back.
    saved.local_path.unlink()
    with InputFetcher(cache_dir=tmp_path / "cache", outputs=storage) as fetcher:
        from_s3 = fetcher.fetch(saved.output_location, field="image_start")
        from_files = fetcher.fetch(f"files/{task_id}/frame.png", field="image_end")
        with pytest.raises(InputError, match=r"^image_start: .*not in this service's bucket"):
            fetcher.fetch("s3://someone-elses-bucket/x.png", field="image_start")
    assert from_s3.read_bytes() == PNG and from_files.read_bytes() == PNG
    assert from_s3.is_relative_to(tmp_path / "cache")


def test_supabase_upload_through_the_s3_endpoint_and_public_url(s3_server: S3Server, tmp_path: Path):
    admin_fs(s3_server).create_dir("image_uploads")
    env = {
        "SUPABASE_URL": s3_server.url,
        "SUPABASE_SERVICE_KEY": "service-role-jwt",
        "SUPABASE_ANON_KEY": "anon-jwt",
        "HWGP_OUTPUT_DIR": str(tmp_path / "files"),
        "HWGP_UPLOAD_BASE_DELAY": "0.01",
    }
    storage = OutputStorage.from_env(env)
    task_id = _task_id()
    requests_before = len(s3_server.gateway.paths)
    saved = storage.save(task_id, Artifact(PNG, "posed image.png", "image/png"))

    public_url = f"{s3_server.url}/storage/v1/object/public/image_uploads/{task_id}/posed_image.png"
    assert saved.uploaded is True
    assert saved.output_location == public_url
    upload_paths = s3_server.gateway.paths[requests_before:]
    assert upload_paths and all(
        p.startswith(f"/storage/v1/s3/image_uploads/{task_id}/posed_image.png") for p in upload_paths
    )
    # The public URL serves the object anonymously, as Supabase's does.
    response = httpx.get(public_url)
    assert response.status_code == 200 and response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert storage.resolve_local(public_url) == saved.local_path

    # A dependent task referencing the public URL gets the local copy, or reads it back from the bucket
    # when gone: through the S3 API with the service's credentials, not over HTTP, so the bucket's host
    # (loopback here) needs no allowlist entry.
    with InputFetcher(cache_dir=tmp_path / "cache", outputs=storage, env={}) as fetcher:
        assert fetcher.fetch(public_url, field="image_refs") == saved.local_path
        saved.local_path.unlink()
        requests_before = len(s3_server.gateway.paths)
        downloaded = fetcher.fetch(public_url, field="image_refs")
    assert downloaded.read_bytes() == PNG and downloaded.name == "posed_image.png"
    read_paths = s3_server.gateway.paths[requests_before:]
    assert read_paths and all(p.startswith("/storage/v1/s3/image_uploads/") for p in read_paths)
    # Someone else's URL on the same loopback host is still refused: only our own objects are trusted.
    with (
        InputFetcher(cache_dir=tmp_path / "cache2", outputs=storage, env={}) as fetcher,
        pytest.raises(InputError, match=r"^image_refs: could not fetch the URL: the address is not allowed"),
    ):
        fetcher.fetch(f"{s3_server.url}/storage/v1/object/public/other-bucket/x/y.png", field="image_refs")


class FlakyFilesystem:
    """The real S3 filesystem, except that the first ``failures`` uploads die half-way through the write."""

    def __init__(self, real: pafs.FileSystem, failures: int):
        self.real = real
        self.failures = failures
        self.opened = 0

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None):
        self.opened += 1
        sink = self.real.open_output_stream(path, metadata=metadata)
        if self.opened > self.failures:
            return sink
        real_write = sink.write

        class DroppingSink:
            def write(self, data: bytes) -> None:
                real_write(data[: len(data) // 2])  # half the object reaches the server...
                raise OSError("connection reset by peer")  # ...then the network drops

            def close(self) -> None:
                sink.close()

        return DroppingSink()

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_upload_retries_after_failures_with_backoff(s3_server: S3Server, bucket: str, tmp_path: Path):
    settings_ = _s3_settings(s3_server, bucket)
    flaky = FlakyFilesystem(
        pafs.S3FileSystem(
            access_key="testing", secret_key="testing", scheme="http", endpoint_override=s3_server.endpoint
        ),
        failures=2,
    )
    retries: list[tuple[int, str, float]] = []
    uploader = S3Uploader(
        settings_,
        attempts=4,
        base_delay=0.01,
        filesystem=flaky,
        on_retry=lambda attempt, error, delay: retries.append((attempt, str(error), delay)),
    )
    storage = OutputStorage(StorageConfig(root=tmp_path / "files", s3=settings_), uploader=uploader)
    task_id = _task_id()
    saved = storage.save(task_id, Artifact(VIDEO, "clip.mp4", "video/mp4"))

    assert saved.uploaded is True
    assert [(a, d) for a, _, d in retries] == [(1, 0.01), (2, 0.02)]
    assert all("connection reset" in message for _, message, _ in retries)
    with admin_fs(s3_server).open_input_stream(f"{bucket}/{task_id}/clip.mp4") as stream:
        assert stream.read() == VIDEO  # the complete object, not a half from a failed attempt


def test_failed_attempts_leave_no_truncated_object(s3_server: S3Server, bucket: str, tmp_path: Path):
    real = pafs.S3FileSystem(
        access_key="testing", secret_key="testing", scheme="http", endpoint_override=s3_server.endpoint
    )
    uploader = S3Uploader(
        _s3_settings(s3_server, bucket),
        attempts=2,
        base_delay=0.001,
        filesystem=FlakyFilesystem(real, failures=5),
    )
    storage = OutputStorage(StorageConfig(root=tmp_path / "files"), uploader=uploader)
    task_id = _task_id()

    with pytest.raises(StorageError, match="connection reset by peer"):
        storage.save(task_id, Artifact(VIDEO, "clip.mp4", "video/mp4"))

    # pyarrow completed each half-written object on close; the uploader deleted them again.
    assert admin_fs(s3_server).get_file_info(f"{bucket}/{task_id}/clip.mp4").type == pafs.FileType.NotFound
    assert (tmp_path / "files" / task_id / "clip.mp4").read_bytes() == VIDEO


def test_upload_retries_until_the_bucket_exists(s3_server: S3Server, tmp_path: Path):
    bucket = f"late-{uuid.uuid4().hex[:12]}"
    errors: list[str] = []

    def create_bucket_on_first_failure(attempt: int, error: Exception, delay: float) -> None:
        errors.append(str(error))
        if attempt == 1:
            admin_fs(s3_server).create_dir(bucket)

    settings_ = _s3_settings(s3_server, bucket)
    uploader = S3Uploader(settings_, attempts=3, base_delay=0.01, on_retry=create_bucket_on_first_failure)
    storage = OutputStorage(StorageConfig(root=tmp_path / "files", s3=settings_), uploader=uploader)
    saved = storage.save(_task_id(), Artifact(PNG, "a.png", "image/png"))

    assert saved.uploaded is True
    assert len(errors) == 1 and "NO_SUCH_BUCKET" in errors[0]


@pytest.mark.parametrize("failure", ["unreachable", "no_such_bucket"])
def test_final_upload_failure_raises_and_keeps_the_local_file(
    s3_server: S3Server, tmp_path: Path, failure: str
):
    if failure == "unreachable":
        settings_ = _s3_settings(s3_server, "some-bucket", endpoint=f"http://127.0.0.1:{free_port()}")
        reason = "connect"
    else:
        settings_ = _s3_settings(s3_server, f"missing-{uuid.uuid4().hex[:12]}")
        reason = "NO_SUCH_BUCKET"
    config = StorageConfig(
        root=tmp_path / "files", s3=settings_, upload_attempts=3, upload_base_delay=0.01, connect_timeout=2
    )
    storage = OutputStorage(config)
    task_id = _task_id()

    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.save(task_id, Artifact(VIDEO, "clip.mp4", "video/mp4"))

    message = str(info.value)
    assert f"{task_id}/clip.mp4" in message and "after 3 attempt(s)" in message
    assert reason.lower() in message.lower()
    assert info.value.attempts == 3
    assert info.value.local_path == tmp_path / "files" / task_id / "clip.mp4"
    assert info.value.local_path.read_bytes() == VIDEO
    assert time.monotonic() - started < 10


# --- input fetching -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_server() -> Iterator[MediaServer]:
    server = MediaServer().start()
    server.files["/img/anchor.png"] = ("image/png", PNG)
    server.files["/img/noext"] = ("image/png", PNG)
    server.files["/video/guide.mp4"] = ("video/mp4", VIDEO)
    server.files["/bin/blob.png"] = ("application/octet-stream", PNG)
    server.files["/page.html"] = ("text/html; charset=utf-8", b"<html>not an image</html>")
    server.files["/big.mp4"] = ("video/mp4", b"\x00" * 300_000)
    server.files["/big-stream.mp4"] = ("video/mp4", b"\x00" * 300_000)
    server.no_length.add("/big-stream.mp4")
    yield server
    server.stop()


@pytest.fixture
def fetcher(tmp_path: Path, local_storage: OutputStorage) -> Iterator[InputFetcher]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # The media server is on loopback, which only an allowlist entry lets the fetcher reach.
    with InputFetcher(
        allowed_dirs=[inputs],
        max_bytes=100_000,
        cache_dir=tmp_path / "cache",
        outputs=local_storage,
        input_url_allow=["127.0.0.1"],
        env={},
    ) as f:
        yield f


def test_download_and_cache_hit(fetcher: InputFetcher, media_server: MediaServer, tmp_path: Path):
    url = media_server.url("/img/anchor.png")
    before = media_server.requests["/img/anchor.png"]

    first = fetcher.fetch(url, field="image_start")
    second = fetcher.fetch(url, field="image_end")

    assert first == second and first.read_bytes() == PNG and first.name == "anchor.png"
    assert first.is_relative_to(tmp_path / "cache")
    assert media_server.requests["/img/anchor.png"] - before == 1  # the second fetch hit the cache
    with Image.open(first) as image:
        assert image.size == (8, 8)
    assert [p.name for p in first.parent.iterdir()] == ["anchor.png"]  # no temp files left


def test_download_names_files_from_the_content_type(fetcher: InputFetcher, media_server: MediaServer):
    assert fetcher.fetch(media_server.url("/img/noext"), field="image_start").name == "noext.png"
    video = fetcher.fetch(media_server.url("/video/guide.mp4"), field="video_guide")
    assert video.read_bytes() == VIDEO
    # Generic binary types are accepted for any media field (S3 and plain servers send them).
    assert fetcher.fetch(media_server.url("/bin/blob.png"), field="image_refs").read_bytes() == PNG


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/big.mp4", "the file is larger than the limit of 100000 bytes"),  # refused from Content-Length
        ("/big-stream.mp4", "the file is larger than the limit of 100000 bytes"),  # stopped while reading
    ],
)
def test_size_cap_is_enforced(
    fetcher: InputFetcher, media_server: MediaServer, path: str, problem: str, tmp_path: Path
):
    with pytest.raises(InputError, match=r"^video_guide: ") as info:
        fetcher.fetch(media_server.url(path), field="video_guide")
    assert problem in str(info.value)
    assert info.value.field == "video_guide"
    assert _files_under(tmp_path / "cache") == []  # the partial download was removed


@pytest.mark.parametrize(
    ("path", "field", "problem"),
    [
        ("/page.html", "image_start", "does not point to an image (expected image/*"),
        ("/video/guide.mp4", "image_start", "does not point to an image (expected image/*"),
        ("/img/anchor.png", "video_mask", "does not point to a video (expected video/*"),
        ("/missing.png", "image_end", "could not fetch the URL: the download failed"),
    ],
)
def test_wrong_content_type_or_status_is_refused(
    fetcher: InputFetcher, media_server: MediaServer, path: str, field: str, problem: str
):
    with pytest.raises(InputError, match=rf"^{field}: ") as info:
        fetcher.fetch(media_server.url(path), field=field)
    assert problem in str(info.value)
    assert "404" not in str(info.value) and "text/html" not in str(info.value)  # nothing of what answered


def test_unreachable_url_is_an_input_error(fetcher: InputFetcher):
    with pytest.raises(InputError) as info:
        fetcher.fetch(f"http://127.0.0.1:{free_port()}/x.png", field="image_url")
    assert str(info.value) == "image_url: could not fetch the URL: the download failed"


@pytest.mark.parametrize(
    "ref",
    [
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "ftp://example.com/a.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "gopher://127.0.0.1/x",
    ],
)
def test_non_http_schemes_are_refused(fetcher: InputFetcher, ref: str):
    with pytest.raises(InputError, match=r"^image_start: scheme '\w+' is not allowed"):
        fetcher.fetch(ref, field="image_start")


def test_local_paths_only_inside_allowed_dirs(fetcher: InputFetcher, tmp_path: Path):
    inputs = tmp_path / "inputs"
    (inputs / "anchor.png").write_bytes(PNG)
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    (inputs / "link.png").symlink_to(secret)

    assert fetcher.fetch(str(inputs / "anchor.png"), field="image_start") == inputs / "anchor.png"
    assert fetcher.fetch("anchor.png", field="image_start") == inputs / "anchor.png"  # relative to inputs
    assert fetcher.fetch(inputs / "anchor.png", field="image_start") == inputs / "anchor.png"

    for ref in ["/etc/passwd", str(secret), "../secret.png", str(inputs / ".." / "secret.png"), "link.png"]:
        with pytest.raises(
            InputError, match=r"^image_refs\[1\]: local path .* is outside the allowed input folders"
        ):
            fetcher.fetch_many([str(inputs / "anchor.png"), ref], field="image_refs")

    with pytest.raises(
        InputError,
        match=rf"^image_end: local file 'nope.png' does not exist.*looked for {inputs / 'nope.png'}",
    ):
        fetcher.fetch("nope.png", field="image_end")
    with pytest.raises(InputError, match=r"^image_end: expected a URL or a path"):
        fetcher.fetch("  ", field="image_end")
    with pytest.raises(InputError, match=r"^image_refs: expected a list"):
        fetcher.fetch_many("anchor.png", field="image_refs")


def test_relative_paths_may_be_written_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """input_dirs [inputs] named from the service's folder: "inputs/a.png" is that folder's a.png, as "a.png"
    is; a relative path leading out of the folders is refused as outside, a missing one as missing."""
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    with InputFetcher(allowed_dirs=["inputs"], cache_dir=tmp_path / "cache") as fetcher:
        assert fetcher.allowed_dirs == [inputs]
        assert fetcher.fetch("inputs/a.png", field="image_start") == inputs / "a.png"
        assert fetcher.fetch("./inputs/a.png", field="image_start") == inputs / "a.png"
        assert fetcher.fetch("a.png", field="image_start") == inputs / "a.png"
        for ref in ["secret.png", "inputs/../secret.png"]:
            with pytest.raises(
                InputError, match=r"^image_end: local path .* outside the allowed input folders"
            ):
                fetcher.fetch(ref, field="image_end")
        with pytest.raises(
            InputError,
            match=rf"^image_end: local file 'inputs/b.png' does not exist \(or is not a file\); looked for "
            rf"{inputs / 'inputs' / 'b.png'}, {inputs / 'b.png'}$",
        ):
            fetcher.fetch("inputs/b.png", field="image_end")


def test_no_allowed_dirs_means_no_local_paths(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(PNG)
    with (
        InputFetcher(cache_dir=tmp_path / "cache") as fetcher,
        pytest.raises(InputError, match=r"^image_start: local path .* no input folders"),
    ):
        fetcher.fetch(str(tmp_path / "a.png"), field="image_start")


def test_output_locations_resolve_to_the_local_copy(fetcher: InputFetcher, local_storage: OutputStorage):
    task_id = _task_id()
    saved = local_storage.save(task_id, Artifact(VIDEO, f"{task_id}_seg00_output.mp4", "video/mp4"))

    assert fetcher.fetch(saved.output_location, field="video_guide") == saved.local_path
    # The outputs folder is an allowed folder too, so the absolute path works as well.
    assert fetcher.fetch(str(saved.local_path), field="continue_from_video_resolved_path") == saved.local_path
    with pytest.raises(
        InputError, match=r"^video_guide: output 'files/.*/gone.mp4' is not stored on this machine"
    ):
        fetcher.fetch(f"files/{task_id}/gone.mp4", field="video_guide")
