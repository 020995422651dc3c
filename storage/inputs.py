"""Fetching task inputs (``image_start``, ``video_guide``, ``image_refs``, ...) to local files.

A reference may be:

* an ``http(s)`` URL: downloaded only from public addresses or allowlisted hosts (see
  :mod:`storage.url_guard`: the host is resolved once, every address checked, the connection made to the
  checked address, every redirect hop checked, at most 3), within a total deadline, a byte cap enforced
  while reading, and the content type checked against the kind the field expects. Downloads run on the
  fetcher's own bounded thread pool and can be cancelled; fetches of one reference while it downloads share
  that download. They are cached in ``cache_dir`` by URL hash (URLs are taken as immutable, as output URLs
  are: a cached copy is reused without revalidation); the cache keeps under ``cache_max_bytes`` by evicting
  the least recently used entries.
* an output of this service: a ``files/{task_id}/{filename}`` location, a public URL or ``s3://`` location
  of the configured bucket. These resolve to the local copy when it exists; otherwise they are read
  from the bucket through the uploader (never over HTTP, so the bucket needs no allowlist entry);
* a local path, only inside ``allowed_dirs`` (symlinks resolved, so neither ``..`` nor a link can
  escape). Relative paths are looked up in each allowed folder in turn, then from the working directory
  (where relative ``input_dirs`` are resolved from).

Any other scheme (``file:``, ``ftp:``, ``data:``, ...) is refused. Every refusal raises
:class:`storage.InputError` naming the field and the problem. Failed downloads say only which of a few
generic things went wrong (not allowed / no answer in time / failed / cancelled); details are logged.

Settings (constructor arguments, or :class:`InputSettings` from a config file), environment first:

==================================  ====================================================================
``$HWGP_INPUT_URL_ALLOW``           ``input_url_allow``: comma-separated ``host`` or ``host:port`` that may
                                    be fetched whatever their address (intranet servers, tests).
``$HWGP_INPUT_FETCH_TIMEOUT_S``     ``fetch_timeout_s``: total seconds one download may take (default 120).
``max_bytes``                       largest input file (default 512 MiB).
``max_concurrent_downloads``        size of the download thread pool (default 4).
``cache_max_bytes``                 size the input cache is kept under (default 10 GiB).
``$SSL_CERT_FILE``, ``$SSL_CERT_DIR``  CA certificates for https inputs (default: certifi's bundle).
==================================  ====================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlsplit

import httpcore
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InputError
from .guarded_http import Budget, CancelSignal, default_ssl_context, open_url
from .names import sanitize_filename
from .outputs import OutputStorage
from .url_guard import (
    CANCELLED,
    FAILED,
    FetchProblem,
    SystemResolver,
    allowlist_from,
    check_target,
    check_target_async,
    parse_allowlist,
    parse_url,
    redact_url,
)

logger = logging.getLogger(__name__)

# What a field accepts: images, videos, either, or any bytes (LoRA files and the like).
Kind = Literal["image", "video", "media", "binary"]

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT_S = 120.0
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 4
DEFAULT_CACHE_MAX_BYTES = 10 * 1024**3
FETCH_TIMEOUT_ENV = "HWGP_INPUT_FETCH_TIMEOUT_S"
# check_url at POST time: a request handler must not wait on a slow resolver for long.
CHECK_RESOLVE_TIMEOUT_S = 5.0
# Cache entries used this recently are never evicted: a caller may be about to read the file it was given.
CACHE_GRACE_S = 60.0
_CHUNK = 1 << 16
_PART_FILE_TRIES = 8
# What a failed transfer raises (httpcore has no common base class); all read "the download failed".
_TRANSFER_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
    httpcore.UnsupportedProtocol,
    ssl.SSLError,
)
# Servers that do not know what they serve (S3 defaults, plain file servers) say one of these.
_GENERIC_TYPES = {"application/octet-stream", "binary/octet-stream"}


def kind_for_field(field: str) -> Kind:
    """The kind of file a task field holds, from its name (``video_guide`` → video, ``image_refs`` → image)."""
    name = field.lower()
    if "lora" in name:
        return "binary"
    if "video" in name:
        return "video"
    if "image" in name or "img" in name:
        return "image"
    return "media"


def content_type_allowed(content_type: str | None, kind: Kind) -> bool:
    if kind == "binary":
        return True
    # RFC 9110: a missing Content-Type may be treated as application/octet-stream.
    main = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if main in _GENERIC_TYPES:
        return True
    if kind == "media":
        return main.startswith(("image/", "video/"))
    return main.startswith(f"{kind}/")


class InputSettings(BaseModel):
    """The fetcher's settings as a config file gives them (``InputFetcher(dirs, **settings.model_dump())``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_url_allow: list[str] = Field(default_factory=list)
    fetch_timeout_s: float | None = Field(None, gt=0, le=3600)
    max_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0)
    max_concurrent_downloads: int = Field(DEFAULT_MAX_CONCURRENT_DOWNLOADS, ge=1, le=64)
    cache_max_bytes: int = Field(DEFAULT_CACHE_MAX_BYTES, gt=0)

    @field_validator("input_url_allow")
    @classmethod
    def _check_allowlist(cls, entries: list[str]) -> list[str]:
        parse_allowlist(entries)  # raises ValueError naming the bad entry
        return entries


@dataclass(frozen=True)
class _Download:
    """An input that must be read over the network (a URL) or from the bucket (an own output)."""

    ref: str
    field: str
    kind: Kind
    from_bucket: bool


class _Flight:
    """One download of a reference, shared by every fetch of it that arrives while it runs: one request to
    the server and one pool thread however many tasks name the URL at once (a slow host named by many tasks
    cannot take every download thread).

    Each fetch waits on a future of its own, failed with its own field's error. The download's Budget polls
    :meth:`is_set` among its cancel events: a waiter whose cancel is set is released there (with the
    "cancelled" error), and the download stops once no waiter is left.
    """

    def __init__(self, ref: str):
        self.ref = ref
        self.future: Future[Path] | None = None  # the download, once submitted
        self._lock = threading.Lock()
        self._waiters: list[tuple[list[threading.Event], str, Future[Path]]] = []
        self.abandoned = False  # every waiter went: the download is stopping, nobody may join it

    def join(self, cancel: Iterable[threading.Event | None], field: str) -> Future[Path] | None:
        """A future for one more fetch (of task field ``field``) of this download; None when it is stopping."""
        mine: Future[Path] = Future()
        with self._lock:
            if self.abandoned:
                return None
            self._waiters.append(([event for event in cancel if event is not None], field, mine))
        if self.future is not None and self.future.done():  # finished while joining: settle it now
            self.finish()
        return mine

    def is_set(self) -> bool:
        """True when every waiter has gone (cancelled): what the download's Budget stops on."""
        with self._lock:
            for events, field, mine in self._waiters:
                if not mine.done() and any(event.is_set() for event in events):
                    _settle(
                        mine, error=InputError(field, f"could not fetch the URL: {CANCELLED}", ref=self.ref)
                    )
            self.abandoned = all(mine.done() for _, _, mine in self._waiters)
            return self.abandoned

    def finish(self) -> None:
        """Hand the download's outcome to every waiter still waiting (its error under the waiter's field)."""
        assert self.future is not None and self.future.done()
        with self._lock:
            waiting = [(field, mine) for _, field, mine in self._waiters if not mine.done()]
        if self.future.cancelled():  # the fetcher closed before the download started
            for _, mine in waiting:
                mine.cancel()
            return
        error = self.future.exception()
        for field, mine in waiting:
            if error is None:
                _settle(mine, result=self.future.result())
            elif isinstance(error, InputError):
                _settle(mine, error=InputError(field, error.problem, ref=error.ref))
            else:
                _settle(mine, error=error)


def _settle(future: Future[Path], result: Path | None = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless it already is (a waiter cancelled meanwhile)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class InputFetcher:
    """Turns input references into local file paths, refusing anything it should not read.

    ``outputs`` (the service's :class:`OutputStorage`) lets output locations resolve to local copies;
    its root is also an allowed folder. ``env`` defaults to ``os.environ`` (read once, here).
    """

    def __init__(
        self,
        allowed_dirs: Iterable[str | os.PathLike[str]] = (),
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache_dir: str | os.PathLike[str] | None = None,
        outputs: OutputStorage | None = None,
        input_url_allow: Iterable[str] | None = None,
        fetch_timeout_s: float | None = None,
        max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        env: Mapping[str, str] | None = None,
    ):
        env = os.environ if env is None else env
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if cache_max_bytes <= 0:
            raise ValueError(f"cache_max_bytes must be positive, got {cache_max_bytes}")
        if max_concurrent_downloads < 1:
            raise ValueError(f"max_concurrent_downloads must be at least 1, got {max_concurrent_downloads}")
        # Relative input_dirs resolve against this process's working directory; a relative path in a task may
        # be written from there too ("inputs/a.png" with input_dirs [inputs]).
        self.working_dir = Path.cwd()
        dirs = [Path(d).expanduser().resolve() for d in allowed_dirs]
        if outputs is not None:
            dirs.append(outputs.root.resolve())
        self.allowed_dirs: list[Path] = list(dict.fromkeys(dirs))
        self.max_bytes = max_bytes
        self.cache_dir = (
            Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "hwgp-inputs"
        )
        self.cache_max_bytes = cache_max_bytes
        self.outputs = outputs
        self.allow = allowlist_from(input_url_allow, env)
        self.fetch_timeout_s = _fetch_timeout(fetch_timeout_s, env)
        self.ssl_context = ssl_context or default_ssl_context(env)
        # Downloads get their own threads, never the event loop's default executor that database calls
        # and health checks use; DNS lookups too (getaddrinfo cannot be interrupted, only waited for).
        self._downloads = ThreadPoolExecutor(max_concurrent_downloads, thread_name_prefix="hwgp-input-fetch")
        self._dns = ThreadPoolExecutor(max_concurrent_downloads, thread_name_prefix="hwgp-input-dns")
        self._resolve = SystemResolver(self._dns)
        self._closing = threading.Event()
        self._cache_lock = threading.Lock()
        self._flights: dict[tuple[str, str, bool], _Flight] = {}  # downloads in progress, by what they fetch
        self._flights_lock = threading.Lock()

    def close(self) -> None:
        """Abort downloads in progress and stop the download threads."""
        self._closing.set()
        self._downloads.shutdown(wait=False, cancel_futures=True)
        self._dns.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> InputFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- public API -------------------------------------------------------------------------------

    def fetch(
        self,
        ref: str | os.PathLike[str],
        field: str,
        kind: Kind | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> Path:
        """A local path holding the input ``ref`` of task field ``field``; raises InputError if refused.

        ``kind`` is what the field must contain; by default it follows the field's name. Setting
        ``cancel`` aborts a download in progress (InputError "the download was cancelled").
        """
        planned = self._plan(ref, field, kind)
        if isinstance(planned, Path):
            return planned
        return self._submit(planned, [cancel]).result()

    def fetch_many(
        self,
        refs: Sequence[str | os.PathLike[str]],
        field: str,
        kind: Kind | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[Path]:
        """``fetch`` for list fields (``image_refs``, ``input_image_paths_resolved``): errors name ``field[i]``."""
        kind = self._list_kind(refs, field, kind)
        return [self.fetch(ref, f"{field}[{i}]", kind, cancel=cancel) for i, ref in enumerate(refs)]

    async def fetch_async(
        self,
        ref: str | os.PathLike[str],
        field: str,
        kind: Kind | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> Path:
        """``fetch`` for an event loop: the download runs on the fetcher's pool and the loop stays free.

        Cancelling the awaiting task, or setting ``cancel``, aborts the download.
        """
        planned = self._plan(ref, field, kind)
        if isinstance(planned, Path):
            return planned
        stop = threading.Event()
        future = self._submit(planned, [cancel, stop])
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            stop.set()
            raise

    async def fetch_many_async(
        self,
        refs: Sequence[str | os.PathLike[str]],
        field: str,
        kind: Kind | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[Path]:
        """``fetch_many`` for an event loop, the items downloaded concurrently; the first error stops the rest."""
        kind = self._list_kind(refs, field, kind)
        tasks = [
            asyncio.ensure_future(self.fetch_async(ref, f"{field}[{i}]", kind, cancel=cancel))
            for i, ref in enumerate(refs)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def check(self, ref: str | os.PathLike[str], field: str, kind: Kind | None = None) -> None:
        """Validate a reference without downloading it (for POST): raises InputError naming ``field``.

        Local paths and output locations must exist; URLs go through :meth:`check_url`.
        """
        planned = self._plan(ref, field, kind)
        if isinstance(planned, _Download) and not planned.from_bucket:
            self.check_url(planned.ref, field)

    async def check_async(self, ref: str | os.PathLike[str], field: str, kind: Kind | None = None) -> None:
        """:meth:`check` for an event loop: a slow DNS answer is awaited without holding any thread."""
        planned = self._plan(ref, field, kind)
        if isinstance(planned, _Download) and not planned.from_bucket:
            await self.check_url_async(planned.ref, field)

    def check_url(self, url: str, field: str) -> None:
        """Validate an http(s) URL without downloading it: scheme, host syntax, and that the host is
        allowlisted or resolves only to public addresses. Raises InputError naming ``field``."""
        with self._url_problem(url, field):
            check_target(parse_url(url), self.allow, self._resolve, CHECK_RESOLVE_TIMEOUT_S)

    async def check_url_async(self, url: str, field: str) -> None:
        """:meth:`check_url` for an event loop."""
        with self._url_problem(url, field):
            await check_target_async(parse_url(url), self.allow, self._resolve, CHECK_RESOLVE_TIMEOUT_S)

    @staticmethod
    @contextlib.contextmanager
    def _url_problem(url: str, field: str) -> Iterator[None]:
        """Turn a refused URL into the InputError users see; the details go to the log."""
        try:
            yield
        except FetchProblem as problem:
            logger.info("%s: refused %s: %s", field, redact_url(url), problem.detail)
            raise InputError(field, f"could not fetch the URL: {problem.public}", ref=url) from None

    # --- what a reference is ----------------------------------------------------------------------

    def _plan(self, ref: str | os.PathLike[str], field: str, kind: Kind | None) -> Path | _Download:
        """The local file ``ref`` names, or the download that would produce it; raises InputError."""
        kind = kind or kind_for_field(field)
        if isinstance(ref, os.PathLike):
            ref = os.fspath(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise InputError(field, f"expected a URL or a path, got {ref!r}", ref=None)
        ref = ref.strip()
        if "\x00" in ref:
            raise InputError(field, "the reference contains a NUL character", ref=ref)

        try:
            scheme = urlsplit(ref).scheme.lower() if _has_scheme(ref) else ""
        except ValueError as error:  # e.g. an unclosed IPv6 bracket
            raise InputError(field, f"{ref!r} is not a valid URL: {error}", ref=ref) from error

        # Outputs of this service first: they need no network and no allowed_dirs entry.
        if self.outputs is not None:
            local = self.outputs.resolve_local(ref)
            if local is not None:
                return local
            found = self.outputs.task_and_filename(ref)
            if found is not None:
                uploader = self.outputs.uploader
                if uploader is None:
                    raise InputError(field, f"output {ref!r} is not stored on this machine", ref=ref)
                # Gone from this machine: read it back from the bucket (a URL of ours counts too).
                location = ref if scheme else uploader.location_for(uploader.key_for(*found))
                return self._cached(location) or _Download(location, field, kind, from_bucket=True)

        if scheme in ("http", "https"):
            return self._cached(ref) or _Download(ref, field, kind, from_bucket=False)
        if scheme == "s3":
            uploader = self.outputs.uploader if self.outputs is not None else None
            if uploader is None or uploader.key_from_location(ref) is None:
                raise InputError(
                    field, f"{ref!r} is not in this service's bucket; use an http(s) URL", ref=ref
                )
            return self._cached(ref) or _Download(ref, field, kind, from_bucket=True)
        if scheme:
            raise InputError(
                field,
                f"scheme {scheme!r} is not allowed (use an http(s) URL, an output location, "
                "or a path inside the input folders)",
                ref=ref,
            )
        return self._local_path(ref, field)

    @staticmethod
    def _list_kind(refs: object, field: str, kind: Kind | None) -> Kind:
        if isinstance(refs, str | os.PathLike) or not isinstance(refs, Sequence):
            raise InputError(field, f"expected a list of URLs or paths, got {type(refs).__name__}")
        return kind or kind_for_field(field)

    # --- local paths --------------------------------------------------------------------------------

    def _local_path(self, ref: str, field: str) -> Path:
        if not self.allowed_dirs:
            raise InputError(field, f"local path {ref!r} refused: no input folders are configured", ref=ref)
        raw = Path(ref).expanduser()
        in_folders = [raw] if raw.is_absolute() else [base / raw for base in self.allowed_dirs]
        # A relative path may also be written from the working directory the folders were named from.
        from_working_dir = [] if raw.is_absolute() else [self.working_dir / raw]
        candidates = in_folders + from_working_dir
        outside = False
        for candidate in candidates:
            resolved = candidate.resolve()  # follows symlinks and folds '..'
            if any(resolved.is_relative_to(base) for base in self.allowed_dirs):
                if resolved.is_file():
                    return resolved
            elif candidate in in_folders or resolved.is_file():
                # Leading out of the folders is refused as such; the working-directory reading only counts
                # where it names a file (else a missing relative file would be reported as outside).
                outside = True
        if outside:
            raise InputError(
                field,
                f"local path {ref!r} is outside the allowed input folders "
                f"({', '.join(str(d) for d in self.allowed_dirs)})",
                ref=ref,
            )
        raise InputError(
            field,
            f"local file {ref!r} does not exist (or is not a file); looked for "
            f"{', '.join(str(candidate) for candidate in candidates)}",
            ref=ref,
        )

    # --- downloads ----------------------------------------------------------------------------------

    def _submit(self, download: _Download, cancel: Iterable[threading.Event | None]) -> Future[Path]:
        """A future of the download's path for this fetch: a download of the same reference already running
        is joined (:class:`_Flight`), else one is started."""
        key = (download.ref, download.kind, download.from_bucket)
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is not None and not flight.future.done():
                mine = flight.join(cancel, download.field)
                if mine is not None:
                    return mine
            flight = _Flight(download.ref)
            mine = flight.join(cancel, download.field)  # before it starts: it stops when no waiter is left
            assert mine is not None
            try:
                flight.future = self._downloads.submit(self._download, download, [flight, self._closing])
            except RuntimeError:  # the pool was shut down
                raise InputError(download.field, "could not fetch the URL: the service is stopping") from None
            self._flights[key] = flight
        # Outside the lock: the callback runs at once when the download already ended.
        flight.future.add_done_callback(lambda _: self._landed(key, flight))
        return mine

    def _landed(self, key: tuple[str, str, bool], flight: _Flight) -> None:
        with self._flights_lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.finish()

    def _download(self, download: _Download, cancel: list[CancelSignal | None]) -> Path:
        """Runs on the download pool: the budget starts when the download does, not while it queues."""
        budget = Budget(self.fetch_timeout_s, cancel)
        field, ref = download.field, download.ref
        try:
            budget.check()
            if download.from_bucket:
                return self._fetch_own_object(ref, field)
            return self._fetch_url(ref, field, download.kind, budget)
        except FetchProblem as problem:
            level = logging.INFO if problem.public == CANCELLED else logging.WARNING
            logger.log(level, "%s: fetching %s: %s", field, redact_url(ref), problem.detail)
            raise InputError(field, f"could not fetch the URL: {problem.public}", ref=ref) from None
        except _TRANSFER_ERRORS as error:
            # Refused connection, TLS failure, malformed answer: all read the same to the user.
            logger.warning(
                "%s: fetching %s failed: %s: %s", field, redact_url(ref), type(error).__name__, error
            )
            raise InputError(field, f"could not fetch the URL: {FAILED}", ref=ref) from None

    def _fetch_url(self, url: str, field: str, kind: Kind, budget: Budget) -> Path:
        with open_url(
            url, allow=self.allow, resolve=self._resolve, budget=budget, ssl_context=self.ssl_context
        ) as answer:
            if answer.status != 200:
                raise FetchProblem(FAILED, f"HTTP {answer.status} from {redact_url(answer.url)}")
            content_type = answer.headers.get("content-type")
            if not content_type_allowed(content_type, kind):
                logger.warning("%s: %s has content type %r", field, redact_url(answer.url), content_type)
                raise InputError(field, f"the URL does not point to {_describe(kind)}", ref=url)
            length = answer.headers.get("content-length", "").strip()
            if length.isdigit() and int(length) > self.max_bytes:
                raise InputError(
                    field, f"the file is larger than the limit of {self.max_bytes} bytes", ref=url
                )
            folder, name = self._cache_entry(url)
            if not name or "." not in name:
                name = sanitize_filename(name or "download", content_type)
            return self._store(answer.body, folder, name, field, url)

    def _fetch_own_object(self, ref: str, field: str) -> Path:
        uploader = self.outputs.uploader
        key = uploader.key_from_location(ref)
        folder, name = self._cache_entry(ref)
        try:
            with uploader.open_input(key) as stream:
                return self._store(_read_chunks(stream), folder, name or "object", field, ref)
        except OSError as error:
            logger.warning("%s: reading %s from the bucket failed: %s", field, ref, error)
            raise InputError(field, f"reading {ref} from the output bucket failed", ref=ref) from error

    # --- the cache ----------------------------------------------------------------------------------

    def _cache_entry(self, ref: str) -> tuple[Path, str]:
        """The cache folder of a reference and the file name its download is stored under."""
        digest = hashlib.sha256(ref.encode()).hexdigest()[:32]
        url_name = unquote(urlsplit(ref).path.rsplit("/", 1)[-1])
        return self.cache_dir / digest, sanitize_filename(url_name) if url_name else ""

    def _cached(self, ref: str) -> Path | None:
        """The cached copy of ``ref``, marked as just used (the cache evicts least recently used first)."""
        folder, _ = self._cache_entry(ref)
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_file() and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(entry)
                        logger.debug("cache hit for %s", ref)
                        return entry
        return None

    def _store(self, chunks: Iterable[bytes], folder: Path, name: str, field: str, ref: str) -> Path:
        """Write ``chunks`` into the cache as ``folder/name``, stopping as soon as the size cap is passed."""
        fd, tmp_name = _create_part_file(folder)
        try:
            size = 0
            with os.fdopen(fd, "wb") as tmp:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InputError(
                            field, f"the file is larger than the limit of {self.max_bytes} bytes", ref=ref
                        )
                    tmp.write(chunk)
            target = folder / name
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: another download may be writing here
            raise
        logger.info("%s: fetched %s (%d bytes) to %s", field, redact_url(ref), size, target)
        self._evict(keep=folder)
        return target

    def _evict(self, keep: Path) -> None:
        """Delete least recently used entries until the cache is under ``cache_max_bytes``.

        Entries used in the last CACHE_GRACE_S seconds (a caller may be about to read them) and entries
        with a download in progress are kept, even if that leaves the cache over its cap for a while.
        """
        with self._cache_lock:
            entries: list[tuple[float, int, Path]] = []
            total = 0
            for folder in self.cache_dir.iterdir():
                try:
                    files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
                    stats = [f.stat() for f in files]
                except FileNotFoundError:  # removed under us (a failed download's empty folder)
                    continue
                size = sum(s.st_size for s in stats)
                total += size
                busy = any(f.name.startswith(".") for f in files)
                if folder != keep and not busy and stats:
                    entries.append((max(s.st_mtime for s in stats), size, folder))
            now = time.time()
            for last_used, size, folder in sorted(entries):
                if total <= self.cache_max_bytes or now - last_used < CACHE_GRACE_S:
                    break
                if _last_used(folder) > last_used:  # a cache hit since the scan: keep it
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
                logger.info("input cache over %d bytes: evicted %s", self.cache_max_bytes, folder.name)


def _create_part_file(folder: Path) -> tuple[int, str]:
    """A new hidden ``.part`` file in ``folder`` (created if missing). Another download of the same URL
    that fails removes the folder when it is empty (see ``_store``), which can happen between our mkdir
    and our file's creation: then the folder is made again. A folder holding a part file is never empty,
    so once this returns nobody removes it."""
    for _ in range(_PART_FILE_TRIES):
        try:
            # FileExistsError: the folder existed at mkdir and was removed before mkdir checked it was one.
            folder.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=folder, prefix=".", suffix=".part")
        except (FileNotFoundError, FileExistsError):
            continue
    raise OSError(f"could not create a file in {folder}: the folder kept disappearing")


def _last_used(folder: Path) -> float:
    try:
        return max((f.stat().st_mtime for f in folder.iterdir() if f.is_file()), default=0.0)
    except FileNotFoundError:
        return 0.0


def _fetch_timeout(configured: float | None, env: Mapping[str, str]) -> float:
    text = env.get(FETCH_TIMEOUT_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{FETCH_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
        source = FETCH_TIMEOUT_ENV
    else:
        value = DEFAULT_FETCH_TIMEOUT_S if configured is None else float(configured)
        source = "fetch_timeout_s"
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source} must be a positive number of seconds, got {value}")
    return value


def _has_scheme(ref: str) -> bool:
    # "C:" style drive letters do not occur here (POSIX only); anything "word:" is a scheme.
    return bool(urlsplit(ref).scheme) and ":" in ref.split("/", 1)[0]


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _describe(kind: Kind) -> str:
    noun = {"image": "an image", "video": "a video", "media": "an image or a video"}[kind]
    types = {"image": "image/*", "video": "video/*", "media": "image/* or video/*"}[kind]
    return f"{noun} (expected {types} or application/octet-stream)"


__all__ = [
    "DEFAULT_CACHE_MAX_BYTES",
    "DEFAULT_FETCH_TIMEOUT_S",
    "FETCH_TIMEOUT_ENV",
    "InputFetcher",
    "InputSettings",
    "Kind",
    "content_type_allowed",
    "kind_for_field",
]
