"""Safe names for stored outputs: task ids and filenames end up in local paths, object keys and URLs."""

from __future__ import annotations

import mimetypes
import re
import unicodedata

MAX_FILENAME_LENGTH = 128
MAX_EXTENSION_LENGTH = 10

# Task ids are UUIDs in practice; anything that could climb out of a folder or need URL quoting is refused.
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Only characters that need no quoting in a URL path and mean nothing special to a shell or a filesystem.
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSION_RE = re.compile(rf"^[A-Za-z0-9]{{1,{MAX_EXTENSION_LENGTH}}}$")

# mimetypes knows these, but some platforms map them to odd extensions (".mp4v", ".jpe").
_PREFERRED_EXTENSIONS = {
    "video/mp4": ".mp4",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "video/webm": ".webm",
}


def validate_task_id(task_id: str) -> str:
    """Return ``task_id`` unchanged if it is safe as one path segment, else raise ``ValueError``."""
    if not isinstance(task_id, str) or not _TASK_ID_RE.match(task_id) or ".." in task_id:
        raise ValueError(
            f"task_id {task_id!r} is not a valid task id "
            "(1-128 characters: letters, digits, '_', '-', '.', starting with a letter or digit, no '..')"
        )
    return task_id


def extension_for(media_type: str | None) -> str:
    """The usual file extension (with the dot) of a media type, or '' when unknown."""
    if not media_type:
        return ""
    media_type = media_type.split(";")[0].strip().lower()
    return _PREFERRED_EXTENSIONS.get(media_type) or mimetypes.guess_extension(media_type) or ""


def sanitize_filename(filename: str, media_type: str | None = None) -> str:
    """Turn any filename into a safe, single path segment that keeps its extension.

    Path separators become '_', control characters are dropped, other unsafe characters become '_',
    leading dots are stripped (no hidden files, no '..'), and the result is at most
    ``MAX_FILENAME_LENGTH`` characters. A name without a usable extension gets one from
    ``media_type`` when that is known. An empty result becomes ``output``.
    """
    name = unicodedata.normalize("NFKC", str(filename))
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")  # control, format, unassigned
    name = name.replace("/", "_").replace("\\", "_")
    name = _UNSAFE_CHARS_RE.sub("_", name)
    name = re.sub(r"_{2,}", "_", name)
    # Trailing separators go before the extension is looked for, so what ends the result is what a second
    # pass would find there too: "0:.0:" -> "0_.0_" -> "0_.0" -> "0.0" in one pass (stable, as storage relies).
    name = name.rstrip("._- ")

    stem, dot, ext = name.rpartition(".")
    if not dot or not _EXTENSION_RE.match(ext):
        stem, ext = name, ""
    stem = stem.strip("._- ")
    ext = ext.lower()
    if not ext:
        ext = extension_for(media_type).lstrip(".")

    suffix = f".{ext}" if ext else ""
    stem = stem[: MAX_FILENAME_LENGTH - len(suffix)].rstrip("._- ") or "output"
    return stem + suffix
