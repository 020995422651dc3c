"""Uploads to S3-compatible object stores (AWS S3, MinIO, R2, Supabase Storage's S3 endpoint)."""

from __future__ import annotations

import contextlib
import logging
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pyarrow import fs as pafs

from .config import S3Settings
from .errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# (attempt that failed, the error, seconds until the next attempt)
RetryCallback = Callable[[int, Exception, float], None]


def backoff_delays(attempts: int, base_delay: float, max_delay: float) -> list[float]:
    """Delays between ``attempts`` tries: base, 2·base, 4·base, ... capped at ``max_delay``."""
    return [min(base_delay * 2**i, max_delay) for i in range(attempts - 1)]


def retry_with_backoff(
    operation: Callable[[], T],
    *,
    attempts: int,
    base_delay: float,
    max_delay: float,
    on_retry: RetryCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
    what: str = "operation",
) -> T:
    """Run ``operation`` until it succeeds or ``attempts`` tries failed; the last error propagates.

    Only ``OSError`` is retried (pyarrow reports network, HTTP and S3 errors as ``OSError``): anything
    else is a bug that another try would not fix.
    """
    delays = backoff_delays(attempts, base_delay, max_delay)
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except OSError as error:
            if attempt == attempts:
                raise
            delay = delays[attempt - 1]
            logger.warning(
                "%s failed (attempt %d/%d), retrying in %.2fs: %s", what, attempt, attempts, delay, error
            )
            if on_retry is not None:
                on_retry(attempt, error, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # the loop either returns or raises


def make_s3_filesystem(
    settings: S3Settings, *, connect_timeout: float = 5.0, request_timeout: float = 60.0
) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for ``settings``; its own retries are off because callers retry with backoff."""
    kwargs: dict[str, Any] = {
        "region": settings.region,
        "scheme": settings.scheme,
        "connect_timeout": connect_timeout,
        "request_timeout": request_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    }
    if settings.endpoint:
        kwargs["endpoint_override"] = settings.endpoint
    if settings.access_key is not None:
        kwargs["access_key"] = settings.access_key
        kwargs["secret_key"] = settings.secret_key.get_secret_value()
        if settings.session_token is not None:
            kwargs["session_token"] = settings.session_token.get_secret_value()
    return pafs.S3FileSystem(**kwargs)


class S3Uploader:
    """Puts files into one bucket under ``{prefix}{task_id}/{filename}`` and names where they landed.

    ``filesystem`` defaults to a ``pyarrow.fs.S3FileSystem`` built from ``settings``; anything with the
    same ``open_output_stream`` / ``get_file_info`` / ``delete_file`` / ``open_input_stream`` methods works (tests wrap the real one to inject
    failures). ``on_retry`` is called before each retry, e.g. for metrics.
    """

    def __init__(
        self,
        settings: S3Settings,
        *,
        attempts: int = 4,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 60.0,
        filesystem: pafs.FileSystem | None = None,
        on_retry: RetryCallback | None = None,
    ):
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.settings = settings
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.on_retry = on_retry
        self.filesystem = filesystem or make_s3_filesystem(
            settings, connect_timeout=connect_timeout, request_timeout=request_timeout
        )

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    def key_for(self, task_id: str, filename: str) -> str:
        return f"{self.settings.prefix}{task_id}/{filename}"

    def location_for(self, key: str) -> str:
        """The ``output_location`` of an object: its public URL, or ``s3://bucket/key``."""
        template = self.settings.public_url_template
        if template is None:
            return f"s3://{self.bucket}/{key}"
        return template.format(bucket=self.bucket, key=key)

    def key_from_location(self, location: str) -> str | None:
        """The object key behind an ``output_location`` of this bucket, or None if it is not one of ours."""
        candidates = [f"s3://{self.bucket}/{{key}}"]
        if self.settings.public_url_template is not None:
            candidates.append(self.settings.public_url_template)
        for template in candidates:
            head, _, tail = template.partition("{key}")
            # Only {bucket} and {key} are allowed in templates (validated).
            head = _format_known(head, bucket=self.bucket)
            tail = _format_known(tail, bucket=self.bucket)
            if (
                location.startswith(head)
                and location.endswith(tail)
                and len(location) > len(head) + len(tail)
            ):
                key = location[len(head) : len(location) - len(tail)]
                if key.startswith(self.settings.prefix):
                    return key
        return None

    def upload(self, local_path: Path, key: str, media_type: str) -> str:
        """Upload ``local_path`` as ``key`` with retries; return its ``output_location``.

        Raises StorageError (retryable) after the last failed attempt, naming the object and the reason.
        """
        path = f"{self.bucket}/{key}"
        # Read first: a read error after opening the stream would publish a truncated object.
        try:
            data = Path(local_path).read_bytes()
        except OSError as error:
            raise StorageError(
                f"reading {local_path} for upload failed: {error}", local_path=local_path, retryable=True
            ) from error

        def put() -> None:
            sink = self.filesystem.open_output_stream(path, metadata={"Content-Type": media_type})
            try:
                sink.write(data)
            finally:
                # pyarrow completes the object on close even after a failed write (there is no abort),
                # so a failed attempt is cleaned up below rather than left truncated at a public URL.
                sink.close()
            size = self.filesystem.get_file_info(path).size
            if size != len(data):
                raise OSError(f"the stored object has {size} bytes, expected {len(data)}")

        def put_or_clean_up() -> None:
            try:
                put()
            except OSError:
                with contextlib.suppress(OSError):
                    self.filesystem.delete_file(path)
                raise

        try:
            retry_with_backoff(
                put_or_clean_up,
                attempts=self.attempts,
                base_delay=self.base_delay,
                max_delay=self.max_delay,
                on_retry=self.on_retry,
                what=f"upload of s3://{path}",
            )
        except OSError as error:
            raise StorageError(
                f"upload of {local_path.name} to s3://{path} failed after {self.attempts} attempt(s): {error}",
                local_path=local_path,
                attempts=self.attempts,
                retryable=True,  # the object store may be back later; the local file is kept
            ) from error
        return self.location_for(key)

    def open_input(self, key: str) -> BinaryIO:
        """A stream of an object of this bucket (used to fetch outputs that are no longer on local disk)."""
        return self.filesystem.open_input_stream(f"{self.bucket}/{key}")


def _format_known(text: str, **values: str) -> str:
    """``str.format`` for the placeholders of ``values`` only, leaving literal text alone."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)
