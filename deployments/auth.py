"""API keys scoped to projects (Ray-free, HTTP-free: the api turns the answers into 401/403/404).

A keys file (JSON or YAML, a list) names who may call the API and which projects each caller sees:

    - {name: studio, key: "a long random string", projects: [studio-1, studio-2]}
    - {name: ops, key_sha256: "9f86d0…", projects: "*"}      # every project, detailed /healthz

`key` holds the key itself, `key_sha256` its SHA-256 hex digest (so the file need not hold secrets).
Keys are compared as digests in constant time, every entry each time. The file is read again when its
modification time or size changes, so keys are added and revoked without a restart; a file that no
longer parses keeps the last good keys (and says so in the log).

Where the file is: `$HWGP_API_KEYS_FILE` wins over `auth.api_keys_file` of the config.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger("ray.serve")

KEYS_FILE_ENV = "HWGP_API_KEYS_FILE"
ALL_PROJECTS = "*"
MIN_KEY_LENGTH = 16  # a key shorter than this is guessable; refuse it rather than trust it


class AuthSettings(BaseModel):
    """`auth:` of the app config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["keys", "none"] = Field(
        default="keys",
        description="keys: API keys are needed when a keys file is configured (and to listen on a "
        "non-loopback host); none: no authentication, explicitly (anyone who reaches the port may do anything)",
    )
    api_keys_file: str | None = Field(
        default=None, description="JSON or YAML list of keys; $HWGP_API_KEYS_FILE wins"
    )


class KeyEntry(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    key: str | None = Field(default=None, min_length=MIN_KEY_LENGTH)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    projects: list[str] | Literal["*"]

    @field_validator("projects")
    @classmethod
    def _some_projects(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and (not value or not all(p for p in value)):
            raise ValueError('must be "*" or a non-empty list of project ids')
        return value

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key and key_sha256")
        return self

    @property
    def digest(self) -> bytes:
        if self.key is not None:
            return hashlib.sha256(self.key.encode()).digest()
        return bytes.fromhex(self.key_sha256 or "")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name and the projects it may see (None: every project)."""

    name: str
    projects: frozenset[str] | None

    @property
    def sees_everything(self) -> bool:
        return self.projects is None

    def may_see(self, project_id: str | None) -> bool:
        return self.projects is None or (project_id is not None and project_id in self.projects)

    @property
    def only_project(self) -> str | None:
        """The project a key with exactly one project fills in when a task names none."""
        if self.projects is not None and len(self.projects) == 1:
            return next(iter(self.projects))
        return None


# Auth is off (no keys configured): the caller may do everything, as before keys existed.
EVERYONE = Principal("anonymous", None)


class KeysFileError(ValueError):
    """The keys file cannot be read or is not a valid list of keys."""


def load_keys(path: Path) -> list[tuple[bytes, Principal]]:
    """(SHA-256 digest of the key, who it is) for each entry of the file; raises KeysFileError."""
    try:
        text = path.read_text()
    except OSError as error:
        raise KeysFileError(f"{path}: cannot read the API keys file: {error.strerror or error}") from None
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise KeysFileError(f"{path}: not valid JSON/YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, list):
        raise KeysFileError(f"{path}: must be a list of {{name, key | key_sha256, projects}}")
    keys: list[tuple[bytes, Principal]] = []
    names: set[str] = set()
    for i, item in enumerate(data):
        try:
            entry = KeyEntry.model_validate(item)
        except ValidationError as error:
            first = error.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "entry"
            # Never echo the entry: it may hold a key.
            raise KeysFileError(f"{path}: entry {i}: {loc}: {first['msg']}") from None
        if entry.name in names:
            raise KeysFileError(f"{path}: entry {i}: name {entry.name!r} is used twice")
        names.add(entry.name)
        projects = None if entry.projects == ALL_PROJECTS else frozenset(entry.projects)
        keys.append((entry.digest, Principal(entry.name, projects)))
    return keys


class ApiKeys:
    """The keys of one keys file, reloaded when the file changes."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._keys = load_keys(self.path)  # a bad file at start refuses to start

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _reload_if_changed(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._keys = load_keys(self.path)
                logger.info("API keys reloaded from %s: %d keys", self.path, len(self._keys))
            except KeysFileError as error:
                logger.error("API keys file changed but cannot be used; keeping the previous keys: %s", error)

    def authenticate(self, key: str) -> Principal | None:
        """Who `key` belongs to, or None. Every entry is compared, in constant time."""
        self._reload_if_changed()
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, principal in self._keys:
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    def __len__(self) -> int:
        return len(self._keys)


def keys_file(settings: AuthSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The keys file in force: `$HWGP_API_KEYS_FILE` wins over the config."""
    env = os.environ if env is None else env
    return env.get(KEYS_FILE_ENV) or settings.api_keys_file


def open_keys(settings: AuthSettings, env: Mapping[str, str] | None = None) -> ApiKeys | None:
    """The API keys to enforce, or None when authentication is off. Raises KeysFileError."""
    path = keys_file(settings, env)
    if settings.mode == "none":
        if path:
            raise KeysFileError(f"auth.mode is 'none' but a keys file is configured ({path}); choose one")
        return None
    return ApiKeys(path) if path else None


def is_loopback_host(host: str | None) -> bool:
    """True for hosts only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    if not host:
        return False
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(
    settings: AuthSettings, http_host: str | None, env: Mapping[str, str] | None = None
) -> None:
    """Refuse to serve a non-loopback host with no keys unless `auth.mode: none` says so (ValueError)."""
    if http_host is None or is_loopback_host(http_host):
        return
    if settings.mode == "none" or keys_file(settings, env):
        return
    raise ValueError(
        f"refusing to start: the HTTP proxy listens on {http_host!r} (reachable from other machines) and no "
        f"API keys are configured. Set args.auth.api_keys_file (or ${KEYS_FILE_ENV}) to a keys file, bind "
        "http_options.host to 127.0.0.1, or set args.auth.mode: none to run without authentication on purpose."
    )
