"""Storage configuration: where outputs are saved locally and which object store they are uploaded to.

Three backends:

* ``local`` (default): outputs stay in ``root`` (``public/files``); ``output_location`` is the path
  relative to the public root, ``files/{task_id}/{filename}``.
* ``s3``: any S3-compatible store (AWS S3, MinIO, Cloudflare R2, ...) through
  ``pyarrow.fs.S3FileSystem``. Object key ``{prefix}{task_id}/{filename}``; ``output_location`` is
  ``public_base_url`` filled in (``{bucket}`` and ``{key}`` placeholders, or the key appended to it),
  or ``s3://{bucket}/{key}`` when no public URL is configured.
* ``supabase``: Supabase Storage through its S3-compatible endpoint ``{SUPABASE_URL}/storage/v1/s3``,
  bucket ``image_uploads``, object ``{task_id}/{filename}``; ``output_location`` is the public URL
  ``{SUPABASE_URL}/storage/v1/object/public/image_uploads/{task_id}/{filename}``, as the original did.

Environment variables read by :meth:`StorageConfig.from_env`:

=================================  ==========================================================================
``HWGP_STORAGE_BACKEND``           ``local``, ``s3`` or ``supabase``. Unset: ``s3`` when ``HWGP_S3_BUCKET`` is
                                   set, ``supabase`` when ``SUPABASE_URL`` is set, else ``local``.
``HWGP_OUTPUT_DIR``                local output folder (default ``public/files``).
``HWGP_UPLOAD_ATTEMPTS``           upload attempts before giving up (default 4).
``HWGP_UPLOAD_BASE_DELAY``         first retry delay in seconds, doubled each retry (default 0.5, max 8).
``HWGP_S3_ENDPOINT``               ``host:port`` or URL of the S3-compatible server (unset: AWS S3).
                                   A scheme in it (``http://minio:9000``) sets the scheme, else https.
``HWGP_S3_BUCKET``                 bucket name (required for ``s3``).
``HWGP_S3_PREFIX``                 key prefix, e.g. ``outputs/`` (default none).
``HWGP_S3_PUBLIC_BASE_URL``        public URL of objects: ``https://cdn.example.com/{key}`` or a base that
                                   the key is appended to. Unset: ``output_location`` is ``s3://bucket/key``.
``AWS_ACCESS_KEY_ID``              S3 credentials; unset: pyarrow's default AWS credential chain.
``AWS_SECRET_ACCESS_KEY``
``AWS_SESSION_TOKEN``              optional.
``AWS_REGION``                     region (falls back to ``AWS_DEFAULT_REGION``, then ``us-east-1``).
``SUPABASE_URL``                   project URL, e.g. ``https://abc.supabase.co``.
``SUPABASE_VIDEO_BUCKET``          bucket (default ``image_uploads``).
``SUPABASE_S3_ACCESS_KEY_ID``      S3 access keys from the project's storage settings (server-side, full
``SUPABASE_S3_SECRET_ACCESS_KEY``  access). Preferred.
``SUPABASE_SERVICE_KEY``           without S3 access keys: Supabase's session-token scheme, with the
``SUPABASE_ANON_KEY``              service key as session token, the anon key as secret and the project
                                   ref (first label of the URL's host) as access key id.
``SUPABASE_S3_REGION``             region shown in the project's S3 settings (default ``us-east-1``).
``SUPABASE_S3_ENDPOINT``           override of ``{SUPABASE_URL}/storage/v1/s3`` (e.g. the direct
                                   ``https://<ref>.storage.supabase.co/storage/v1/s3`` host).
=================================  ==========================================================================
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Backend = Literal["local", "s3", "supabase"]

_BUCKET_RE = re.compile(
    r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$"
)  # S3 rules, plus '_' (Supabase: image_uploads)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._/-]*$")


def _split_endpoint(endpoint: str) -> tuple[str | None, str]:
    """``http://host:9000/path`` → (``http``, ``host:9000/path``); no scheme → (None, endpoint)."""
    endpoint = endpoint.strip().rstrip("/")
    if "://" in endpoint:
        scheme, _, rest = endpoint.partition("://")
        return scheme.lower(), rest
    return None, endpoint


class S3Settings(BaseModel):
    """An S3-compatible bucket that outputs are uploaded to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str
    endpoint: str | None = Field(None, description="host[:port][/path] of the server; None = AWS S3")
    scheme: Literal["http", "https"] = "https"
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: SecretStr | None = None
    session_token: SecretStr | None = None
    prefix: str = ""
    public_base_url: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _scheme_from_endpoint(cls, data: Any) -> Any:
        # "http://minio:9000" is how people write endpoints; keep the scheme in its own field.
        if isinstance(data, dict) and isinstance(data.get("endpoint"), str):
            scheme, rest = _split_endpoint(data["endpoint"])
            data = {**data, "endpoint": rest or None}
            if scheme is not None:
                if data.get("scheme") not in (None, scheme):
                    raise ValueError(f"endpoint scheme {scheme!r} contradicts scheme {data['scheme']!r}")
                data["scheme"] = scheme
        return data

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, bucket: str) -> str:
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . - _)")
        return bucket

    @field_validator("prefix")
    @classmethod
    def _normalize_prefix(cls, prefix: str) -> str:
        prefix = prefix.strip("/")
        if not _PREFIX_RE.match(prefix) or any(
            part in ("", ".", "..") for part in prefix.split("/") if prefix
        ):
            raise ValueError(f"{prefix!r} is not a valid key prefix (segments of A-Z a-z 0-9 . _ -, no '..')")
        return f"{prefix}/" if prefix else ""

    @field_validator("public_base_url")
    @classmethod
    def _check_public_base_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"{url!r} must be an http(s) URL")
        names = {name for _, name, _, _ in string.Formatter().parse(url) if name is not None}
        if not names <= {"bucket", "key"}:
            raise ValueError(
                f"{url!r} may only use the placeholders {{bucket}} and {{key}}, not {sorted(names)}"
            )
        return url

    @model_validator(mode="after")
    def _check_credentials(self) -> S3Settings:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError(
                "access_key and secret_key must be given together (or neither, for the AWS chain)"
            )
        return self

    @property
    def public_url_template(self) -> str | None:
        """``public_base_url`` with a ``{key}`` placeholder, or None when outputs get ``s3://`` locations."""
        if self.public_base_url is None:
            return None
        if "{key}" in self.public_base_url:
            return self.public_base_url
        return self.public_base_url.rstrip("/") + "/{key}"


class SupabaseSettings(BaseModel):
    """Supabase Storage, reached through its S3-compatible endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    bucket: str = "image_uploads"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    service_key: SecretStr | None = None
    anon_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    s3_endpoint: str | None = None
    project_ref: str | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL (SUPABASE_URL, e.g. https://abc.supabase.co)")
        return url.strip().rstrip("/")

    @model_validator(mode="after")
    def _check_credentials(self) -> SupabaseSettings:
        has_keys = self.s3_access_key_id is not None and self.s3_secret_access_key is not None
        has_session = self.service_key is not None and self.anon_key is not None
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "s3_access_key_id and s3_secret_access_key (SUPABASE_S3_ACCESS_KEY_ID / "
                "SUPABASE_S3_SECRET_ACCESS_KEY) must be given together"
            )
        if not (has_keys or has_session):
            raise ValueError(
                "Supabase Storage uploads need credentials: SUPABASE_S3_ACCESS_KEY_ID + "
                "SUPABASE_S3_SECRET_ACCESS_KEY (S3 access keys from the project's storage settings), "
                "or SUPABASE_SERVICE_KEY + SUPABASE_ANON_KEY (S3 session token)"
            )
        return self

    def to_s3(self) -> S3Settings:
        """The equivalent S3 settings: Supabase's S3 endpoint, public object URLs, no key prefix."""
        endpoint = self.s3_endpoint or f"{self.url}/storage/v1/s3"
        if self.s3_access_key_id is not None:
            access_key, secret_key, session_token = (
                self.s3_access_key_id,
                self.s3_secret_access_key,
                None,
            )
        else:
            ref = self.project_ref or urlsplit(self.url).hostname.split(".")[0]
            access_key, secret_key, session_token = ref, self.anon_key, self.service_key
        return S3Settings(
            bucket=self.bucket,
            endpoint=endpoint,
            region=self.s3_region,
            access_key=access_key,
            secret_key=secret_key,
            session_token=session_token,
            public_base_url=f"{self.url}/storage/v1/object/public/{{bucket}}/{{key}}",
        )


class StorageConfig(BaseModel):
    """Everything :class:`storage.OutputStorage` needs. Build it directly, from a dict, or from the env."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Path("public/files")
    # Local output_location = f"{location_prefix}/{task_id}/{filename}": a path relative to the public
    # root (the parent of `root` in the default layout), as the original's SQLite mode stored them.
    location_prefix: str = "files"
    backend: Backend = "local"  # when not given: inferred from which settings are given
    s3: S3Settings | None = None
    supabase: SupabaseSettings | None = None
    upload_attempts: int = Field(4, ge=1, le=20)
    upload_base_delay: float = Field(0.5, ge=0, le=60)
    upload_max_delay: float = Field(8.0, ge=0, le=600)
    connect_timeout: float = Field(5.0, gt=0)
    request_timeout: float = Field(60.0, gt=0)

    @field_validator("location_prefix")
    @classmethod
    def _check_location_prefix(cls, prefix: str) -> str:
        prefix = prefix.strip("/")
        if not prefix or not _PREFIX_RE.match(prefix) or ".." in prefix.split("/") or "://" in prefix:
            raise ValueError(f"{prefix!r} is not a valid relative location prefix (e.g. 'files')")
        return prefix

    @model_validator(mode="before")
    @classmethod
    def _infer_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") is None:
            has_s3, has_supabase = data.get("s3") is not None, data.get("supabase") is not None
            if has_s3 and has_supabase:
                raise ValueError("both s3 and supabase settings are given: set backend to choose one")
            data = {**data, "backend": "supabase" if has_supabase else "s3" if has_s3 else "local"}
        return data

    @model_validator(mode="after")
    def _check_backend(self) -> StorageConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend 's3' needs s3 settings (HWGP_S3_BUCKET, ...)")
        if self.backend == "supabase" and self.supabase is None:
            raise ValueError("backend 'supabase' needs supabase settings (SUPABASE_URL, ...)")
        if self.backend == "local" and (self.s3 is not None or self.supabase is not None):
            raise ValueError(
                "backend 'local' was chosen but upload settings are given: drop them or pick a backend"
            )
        return self

    def upload_target(self) -> S3Settings | None:
        """The bucket outputs are uploaded to, or None for local-only storage."""
        if self.backend == "s3":
            return self.s3
        if self.backend == "supabase":
            return self.supabase.to_s3()
        return None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageConfig:
        """Read the variables listed in this module's docstring (``os.environ`` by default)."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value and value.strip() else None

        data: dict[str, Any] = {}
        if get("HWGP_OUTPUT_DIR"):
            data["root"] = get("HWGP_OUTPUT_DIR")
        if get("HWGP_UPLOAD_ATTEMPTS"):
            data["upload_attempts"] = get("HWGP_UPLOAD_ATTEMPTS")
        if get("HWGP_UPLOAD_BASE_DELAY"):
            data["upload_base_delay"] = get("HWGP_UPLOAD_BASE_DELAY")

        backend = get("HWGP_STORAGE_BACKEND")
        if backend is None:
            if get("HWGP_S3_BUCKET") and get("SUPABASE_URL"):
                raise ValueError(
                    "both HWGP_S3_BUCKET and SUPABASE_URL are set: set HWGP_STORAGE_BACKEND to s3 or supabase"
                )
            backend = "s3" if get("HWGP_S3_BUCKET") else "supabase" if get("SUPABASE_URL") else "local"
        data["backend"] = backend.lower()

        if data["backend"] == "s3":
            s3: dict[str, Any] = {
                "bucket": get("HWGP_S3_BUCKET") or "",
                "region": get("AWS_REGION") or get("AWS_DEFAULT_REGION") or "us-east-1",
            }
            optional = {
                "endpoint": "HWGP_S3_ENDPOINT",
                "prefix": "HWGP_S3_PREFIX",
                "public_base_url": "HWGP_S3_PUBLIC_BASE_URL",
                "access_key": "AWS_ACCESS_KEY_ID",
                "secret_key": "AWS_SECRET_ACCESS_KEY",
                "session_token": "AWS_SESSION_TOKEN",
            }
            s3.update({field: get(name) for field, name in optional.items() if get(name)})
            data["s3"] = s3
        elif data["backend"] == "supabase":
            supabase: dict[str, Any] = {"url": get("SUPABASE_URL") or ""}
            optional = {
                "bucket": "SUPABASE_VIDEO_BUCKET",
                "s3_access_key_id": "SUPABASE_S3_ACCESS_KEY_ID",
                "s3_secret_access_key": "SUPABASE_S3_SECRET_ACCESS_KEY",
                "service_key": "SUPABASE_SERVICE_KEY",
                "anon_key": "SUPABASE_ANON_KEY",
                "s3_region": "SUPABASE_S3_REGION",
                "s3_endpoint": "SUPABASE_S3_ENDPOINT",
            }
            supabase.update({field: get(name) for field, name in optional.items() if get(name)})
            data["supabase"] = supabase
        return cls.model_validate(data)
