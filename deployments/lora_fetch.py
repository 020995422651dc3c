"""LoRAs by URL: checked when a task is posted, fetched when it is claimed, shipped to the replica as bytes.

The original's clients name LoRAs by URL (``activated_loras``, ``additional_loras``, ``phase_config``
``phases[].loras[].url``, the image models' ``loras[].path``). Here such a URL

1. is checked at POST (:meth:`LoraFetcher.check`): downloads must be allowed by config
   (``loras.allow_url_downloads``), the URL's path must end in ``.safetensors``, an optional pin
   ``#sha256=<64 hex>`` must be well formed, and the host must pass the input fetcher's SSRF guard;
2. is fetched at claim time (:meth:`LoraFetcher.fetch`) through a guarded :class:`storage.InputFetcher` of
   its own (same allowlist and deadline as inputs, byte cap ``max_lora_bytes``, its LRU cache keyed by URL
   so a second task downloads nothing); the file must start with a valid safetensors header and, when
   pinned, have that sha256. Its content name is ``<sha256>.safetensors``;
3. reaches the replica as an object ref keyed by content name (replicas share no filesystem); the replica
   pulls it only when its content-addressed LoRA folder lacks it (:func:`store_lora_files`), and the params
   reach the engine with each URL replaced by that name (:func:`Wan2GP.loras.replace_lora_urls`).

Key formats: diffusers' Wan loader (``WanLoraLoaderMixin.lora_state_dict``) already converts
ComfyUI / LightX2V (``diffusion_model.*``) and musubi / kohya (``lora_unet_*``) keys; nothing to do here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import ray
from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import InvalidTask
from storage import InputError, InputFetcher
from Wan2GP.loras import LORA_SUFFIX, is_lora_url, lora_names_of, replace_lora_urls

logger = logging.getLogger(__name__)

DEFAULT_MAX_LORA_BYTES = 2 * 1024**3
DEFAULT_LORA_CACHE_MAX_BYTES = 20 * 1024**3
CACHE_DIR_ENV = "HWGP_CACHE_DIR"  # the replica's LoRA folder is $HWGP_CACHE_DIR/loras
_MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header
_PIN = re.compile(r"^sha256=([0-9a-f]{64})$", re.IGNORECASE)
_CONTENT_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")


class LoraSettings(BaseModel):
    """``args.loras`` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_url_downloads: bool = Field(True, description="fetch LoRAs named by URL (off: 422 at POST)")
    max_lora_bytes: int = Field(DEFAULT_MAX_LORA_BYTES, gt=0, description="largest LoRA file fetched")
    cache_max_bytes: int = Field(
        DEFAULT_LORA_CACHE_MAX_BYTES, gt=0, description="the downloaded-LoRA cache is kept under this (LRU)"
    )


@dataclass(frozen=True)
class LoraUrl:
    field: str  # the task field naming it, e.g. "activated_loras"
    ref: str  # as the task wrote it (pin included): the key replace_lora_urls swaps
    url: str  # what is downloaded (pin removed)
    sha256: str | None  # the pinned digest, lower case


def content_name(sha256: str) -> str:
    return f"{sha256}{LORA_SUFFIX}"


def lora_urls(params: dict[str, Any]) -> list[LoraUrl]:
    """Every LoRA URL ``params`` (and travel's ``orchestrator_details``) name, once each. Raises InputError naming the field for a URL that is not
    a ``.safetensors`` file or carries a malformed pin."""
    found: dict[str, LoraUrl] = {}
    named = lora_names_of(params)
    if isinstance(params.get("orchestrator_details"), dict):  # travel's original payload form
        named += [
            (f"orchestrator_details.{f}", ref) for f, ref in lora_names_of(params["orchestrator_details"])
        ]
    for field, ref in named:
        if not is_lora_url(ref) or ref in found:
            continue
        url, _, fragment = ref.partition("#")
        pin = None
        if fragment:
            match = _PIN.match(fragment)
            if match is None:
                raise InputError(field, "a LoRA URL's fragment must be '#sha256=<64 hex digits>'", ref=ref)
            pin = match.group(1).lower()
        try:
            path = unquote(urlsplit(url).path)
        except ValueError as error:
            raise InputError(field, f"not a valid URL: {error}", ref=ref) from None
        if not path.lower().endswith(LORA_SUFFIX):
            raise InputError(field, f"a LoRA URL must name a {LORA_SUFFIX} file (no pickle formats)", ref=ref)
        found[ref] = LoraUrl(field, ref, url, pin)
    return list(found.values())


def check_safetensors_header(path: Path) -> None:
    """Raise ValueError unless ``path`` starts like a safetensors file: an 8-byte little-endian header
    length, then that many bytes of a JSON object."""
    size = path.stat().st_size
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little") if size >= 8 else 0
        if not 2 <= length <= min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError("not a safetensors file (bad header length)")
        header = file.read(length)
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LoraFetcher:
    """The ingress side: POST checks and claim-time downloads of LoRA URLs."""

    def __init__(
        self,
        settings: LoraSettings | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        input_url_allow: list[str] | None = None,
    ):
        self.settings = settings or LoraSettings()
        self.fetcher = InputFetcher(
            input_url_allow=input_url_allow,  # the inputs' allowlist ($HWGP_INPUT_URL_ALLOW wins)
            max_bytes=self.settings.max_lora_bytes,
            cache_dir=cache_dir or Path(tempfile.gettempdir()) / "hwgp-lora-downloads",
            cache_max_bytes=self.settings.cache_max_bytes,
            max_concurrent_downloads=2,
            env=env,
        )
        # (path, size, mtime) -> sha256, so a cached multi-GiB file is hashed once per process.
        self._digests: dict[tuple[str, int, int], str] = {}

    def close(self) -> None:
        self.fetcher.close()

    def check(self, params: dict[str, Any]) -> None:
        """POST-time check of every LoRA URL in ``params`` (blocking: a DNS lookup). Raises InvalidTask."""
        try:
            urls = lora_urls(params)
            for lora in urls:
                if not self.settings.allow_url_downloads:
                    raise InputError(
                        lora.field,
                        "LoRA URLs are refused: downloads are off (loras.allow_url_downloads); "
                        "name a file in the LoRA folders instead",
                        ref=lora.ref,
                    )
                self.fetcher.check_url(lora.url, lora.field)
        except InputError as error:
            raise InvalidTask(f"params.{error.field}", error.problem) from None

    def fetch(
        self, params: dict[str, Any], cancel: threading.Event | None = None
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Download every LoRA URL of ``params`` (blocking). Returns the params with each URL replaced by
        its content name, and content name -> bytes for the replica. Raises InputError naming the field."""
        urls = lora_urls(params)
        if not urls:
            return params, {}
        names: dict[str, str] = {}
        files: dict[str, bytes] = {}
        for lora in urls:
            if not self.settings.allow_url_downloads:  # a row written straight into the table
                raise InputError(lora.field, "LoRA URLs are refused: downloads are off", ref=lora.ref)
            path = self.fetcher.fetch(lora.url, lora.field, kind="binary", cancel=cancel)
            try:
                check_safetensors_header(path)
            except ValueError as error:
                raise InputError(lora.field, f"the URL's file is {error}", ref=lora.ref) from None
            sha256 = self._sha256(path)
            if lora.sha256 is not None and lora.sha256 != sha256:
                raise InputError(
                    lora.field,
                    f"sha256 mismatch: the URL pins {lora.sha256} but the file has {sha256}",
                    ref=lora.ref,
                )
            names[lora.ref] = content_name(sha256)
            files[content_name(sha256)] = path.read_bytes()
        replaced = replace_lora_urls(params, names)
        if isinstance(params.get("orchestrator_details"), dict):
            replaced["orchestrator_details"] = replace_lora_urls(params["orchestrator_details"], names)
        return replaced, files

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]


# --- the replica side ------------------------------------------------------------------------------


def replica_lora_dir(env: Mapping[str, str] | None = None) -> Path:
    """The replica's content-addressed LoRA folder: ``$HWGP_CACHE_DIR/loras`` (default under the temp dir)."""
    env = os.environ if env is None else env
    root = env.get(CACHE_DIR_ENV) or str(Path(tempfile.gettempdir()) / "hwgp-cache")
    return Path(root) / "loras"


def object_bytes(value: Any) -> bytes:
    """A LoRA file's bytes as the runner hands them to a replica: an object ref (``ray.put``) or the bytes."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def store_lora_files(
    folder: Path,
    files: Mapping[str, Any],
    max_bytes: int = DEFAULT_LORA_CACHE_MAX_BYTES,
    read: Callable[[Any], bytes] | None = None,
) -> list[str]:
    """Write each ``<sha256>.safetensors`` of ``files`` into ``folder`` unless already there (checking the
    bytes match the name), then evict the least recently used other files while over ``max_bytes``.

    ``read`` turns a value of ``files`` into its bytes (e.g. ``ray.get`` of an object ref); it is called
    only for files the folder lacks, so a LoRA already here is never transferred again. Returns the names
    written (not those already present). Raises ValueError for a bad name or digest."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, value in files.items():
        if not _CONTENT_NAME.match(name):
            raise ValueError(f"LoRA file name {name!r} is not <sha256>{LORA_SUFFIX}")
        target = folder / name
        if target.is_file():
            os.utime(target)  # just used: the last to be evicted
            continue
        data = read(value) if read is not None else value
        if hashlib.sha256(data).hexdigest() != name.removesuffix(LORA_SUFFIX):
            raise ValueError(f"LoRA file {name}: its bytes do not have that sha256")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        written.append(name)
    _evict(folder, keep=set(files), max_bytes=max_bytes)
    return written


def _evict(folder: Path, keep: set[str], max_bytes: int) -> None:
    entries = []
    for path in folder.iterdir():
        if _CONTENT_NAME.match(path.name):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path.name in keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            total -= size
            logger.info("LoRA folder over %d bytes: evicted %s", max_bytes, path.name)
