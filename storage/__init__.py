"""Local-first output storage, uploads to S3-compatible stores (incl. Supabase Storage), input fetching.

Typical use by the ingress::

    storage = OutputStorage.from_env()                 # or OutputStorage(StorageConfig(...))
    saved = storage.save(task_id, artifact)            # SavedOutput(local_path, output_location, uploaded)
    storage.resolve_local(saved.output_location)       # -> Path of the local copy, or None
    storage.find_saved(task_id)                        # -> the SavedOutput an earlier save stored, or None

    fetcher = InputFetcher(allowed_dirs=["inputs"], cache_dir="cache/inputs", outputs=storage,
                           input_url_allow=["minio.internal:9000"])
    fetcher.check(params["image_start"], field="image_start")          # at POST: no download
    path = await fetcher.fetch_async(params["image_start"], field="image_start", cancel=event)

Configuration and environment variables: :mod:`storage.config`; location rules: :mod:`storage.outputs`;
which URLs may be fetched and how: :mod:`storage.url_guard`, :mod:`storage.guarded_http`, :mod:`storage.inputs`.
"""

from .config import S3Settings, StorageConfig, SupabaseSettings
from .errors import InputError, StorageError, StorageUnavailable
from .inputs import InputFetcher, InputSettings, content_type_allowed, kind_for_field
from .names import sanitize_filename, validate_task_id
from .outputs import OutputStorage, SavedOutput, atomic_write_bytes
from .uploaders import S3Uploader, backoff_delays, make_s3_filesystem, retry_with_backoff

__all__ = [
    "InputError",
    "InputFetcher",
    "InputSettings",
    "OutputStorage",
    "S3Settings",
    "S3Uploader",
    "SavedOutput",
    "StorageConfig",
    "StorageError",
    "StorageUnavailable",
    "SupabaseSettings",
    "atomic_write_bytes",
    "backoff_delays",
    "content_type_allowed",
    "kind_for_field",
    "make_s3_filesystem",
    "retry_with_backoff",
    "sanitize_filename",
    "validate_task_id",
]
