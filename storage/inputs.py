"""Fetching task inputs (``image_start``, ``video_guide``, ``image_refs``, ...) to local files.

A reference may be:

* an ``http(s)`` URL: downloaded with httpx (streamed, size cap enforced while reading, timeout,
  content type checked against the kind the field expects), cached in ``cache_dir`` by URL hash
  (URLs are taken as immutable, as output URLs are: a cached copy is reused without revalidation);
* an output of this service: a ``files/{task_id}/{filename}`` location, a public URL or ``s3://`` location
  of the configured bucket. These resolve to the local copy when it exists; otherwise URLs are
  downloaded and ``s3://`` objects read through the uploader;
* a local path, only inside ``allowed_dirs`` (symlinks resolved, so neither ``..`` nor a link can
  escape). Relative paths are looked up in each allowed folder in turn.

Any other scheme (``file:``, ``ftp:``, ``data:``, ...) is refused. Every refusal raises
:class:`storage.InputError` naming the field and the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlsplit

import httpx

from .errors import InputError
from .names import sanitize_filename
from .outputs import OutputStorage

logger = logging.getLogger(__name__)

# What a field accepts: images, videos, either, or any bytes (LoRA files and the like).
Kind = Literal["image", "video", "media", "binary"]

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_CHUNK = 1 << 16
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


class InputFetcher:
    """Turns input references into local file paths, refusing anything it should not read.

    ``outputs`` (the service's :class:`OutputStorage`) lets output locations resolve to local copies;
    its root is also an allowed folder. ``http_client`` may be passed to share a connection pool.
    """

    def __init__(
        self,
        allowed_dirs: Iterable[str | os.PathLike[str]] = (),
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache_dir: str | os.PathLike[str] | None = None,
        outputs: OutputStorage | None = None,
        timeout: float = 30.0,
        http_client: httpx.Client | None = None,
    ):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        dirs = [Path(d).expanduser().resolve() for d in allowed_dirs]
        if outputs is not None:
            dirs.append(outputs.root.resolve())
        self.allowed_dirs: list[Path] = list(dict.fromkeys(dirs))
        self.max_bytes = max_bytes
        self.cache_dir = (
            Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "hwgp-inputs"
        )
        self.outputs = outputs
        self._own_client = http_client is None
        self.http = http_client or httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=True, headers={"User-Agent": "hwgp-serve"}
        )

    def close(self) -> None:
        if self._own_client:
            self.http.close()

    def __enter__(self) -> InputFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- public API -------------------------------------------------------------------------------

    def fetch(self, ref: str | os.PathLike[str], field: str, kind: Kind | None = None) -> Path:
        """A local path holding the input ``ref`` of task field ``field``; raises InputError if refused.

        ``kind`` is what the field must contain; by default it follows the field's name.
        """
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
            if found is not None and not scheme:
                # A local-style location whose file is gone here: the bucket may still have it.
                uploader = self.outputs.uploader
                if uploader is None:
                    raise InputError(field, f"output {ref!r} is not stored on this machine", ref=ref)
                return self._fetch_own_object(uploader.location_for(uploader.key_for(*found)), field)

        if scheme in ("http", "https"):
            return self._fetch_url(ref, field, kind)
        if scheme == "s3":
            return self._fetch_own_object(ref, field)
        if scheme:
            raise InputError(
                field,
                f"scheme {scheme!r} is not allowed (use an http(s) URL, an output location, "
                "or a path inside the input folders)",
                ref=ref,
            )
        return self._local_path(ref, field)

    def fetch_many(
        self, refs: Sequence[str | os.PathLike[str]], field: str, kind: Kind | None = None
    ) -> list[Path]:
        """``fetch`` for list fields (``image_refs``, ``input_image_paths_resolved``): errors name ``field[i]``."""
        if isinstance(refs, str | os.PathLike) or not isinstance(refs, Sequence):
            raise InputError(field, f"expected a list of URLs or paths, got {type(refs).__name__}")
        kind = kind or kind_for_field(field)
        return [self.fetch(ref, f"{field}[{i}]", kind) for i, ref in enumerate(refs)]

    # --- local paths --------------------------------------------------------------------------------

    def _local_path(self, ref: str, field: str) -> Path:
        if not self.allowed_dirs:
            raise InputError(field, f"local path {ref!r} refused: no input folders are configured", ref=ref)
        raw = Path(ref).expanduser()
        candidates = [raw] if raw.is_absolute() else [base / raw for base in self.allowed_dirs]
        outside = False
        for candidate in candidates:
            resolved = candidate.resolve()  # follows symlinks and folds '..'
            if not any(resolved.is_relative_to(base) for base in self.allowed_dirs):
                outside = True
                continue
            if resolved.is_file():
                return resolved
        if outside:
            raise InputError(
                field,
                f"local path {ref!r} is outside the allowed input folders "
                f"({', '.join(str(d) for d in self.allowed_dirs)})",
                ref=ref,
            )
        raise InputError(field, f"local file {ref!r} does not exist (or is not a file)", ref=ref)

    # --- downloads ----------------------------------------------------------------------------------

    def _cache_entry(self, ref: str) -> tuple[Path, str]:
        """The cache folder of a reference and the file name its download is stored under."""
        digest = hashlib.sha256(ref.encode()).hexdigest()[:32]
        url_name = unquote(urlsplit(ref).path.rsplit("/", 1)[-1])
        return self.cache_dir / digest, sanitize_filename(url_name) if url_name else ""

    def _cached(self, folder: Path) -> Path | None:
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_file() and not entry.name.startswith("."):
                    return entry
        return None

    def _fetch_url(self, url: str, field: str, kind: Kind) -> Path:
        folder, name = self._cache_entry(url)
        cached = self._cached(folder)
        if cached is not None:
            logger.debug("%s: cache hit for %s", field, url)
            return cached
        try:
            with self.http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InputError(field, f"download of {url} failed: HTTP {response.status_code}", ref=url)
                content_type = response.headers.get("content-type")
                if not content_type_allowed(content_type, kind):
                    raise InputError(
                        field,
                        f"{url} has content type {content_type!r}, expected {_describe(kind)}",
                        ref=url,
                    )
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > self.max_bytes:
                    raise InputError(
                        field,
                        f"{url} is {int(length)} bytes, more than the limit of {self.max_bytes}",
                        ref=url,
                    )
                if not name or "." not in name:
                    name = sanitize_filename(name or "download", content_type)
                return self._store(response.iter_bytes(_CHUNK), folder, name, field, url)
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise InputError(
                field, f"download of {url} failed: {type(error).__name__}: {error}", ref=url
            ) from error

    def _fetch_own_object(self, ref: str, field: str) -> Path:
        uploader = self.outputs.uploader if self.outputs is not None else None
        key = uploader.key_from_location(ref) if uploader is not None else None
        if key is None:
            raise InputError(field, f"{ref!r} is not in this service's bucket; use an http(s) URL", ref=ref)
        folder, name = self._cache_entry(ref)
        cached = self._cached(folder)
        if cached is not None:
            return cached
        try:
            with uploader.open_input(key) as stream:
                return self._store(_read_chunks(stream), folder, name or "object", field, ref)
        except OSError as error:
            raise InputError(field, f"reading {ref} failed: {error}", ref=ref) from error

    def _store(self, chunks: Iterable[bytes], folder: Path, name: str, field: str, ref: str) -> Path:
        """Write ``chunks`` into the cache as ``folder/name``, stopping as soon as the size cap is passed."""
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".", suffix=".part")
        try:
            size = 0
            with os.fdopen(fd, "wb") as tmp:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InputError(
                            field, f"{ref} is larger than the limit of {self.max_bytes} bytes", ref=ref
                        )
                    tmp.write(chunk)
            target = folder / name
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        logger.info("%s: fetched %s (%d bytes) to %s", field, ref, size, target)
        return target


def _has_scheme(ref: str) -> bool:
    # "C:" style drive letters do not occur here (POSIX only); anything "word:" is a scheme.
    return bool(urlsplit(ref).scheme) and ":" in ref.split("/", 1)[0]


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _describe(kind: Kind) -> str:
    types = {"image": "image/*", "video": "video/*", "media": "image/* or video/*"}[kind]
    return f"{types} or application/octet-stream"


__all__ = ["InputFetcher", "Kind", "content_type_allowed", "kind_for_field"]
