"""Thumbnails of outputs, made and recorded as the original does.

The original worker sends every video output's first frame as a JPEG named ``thumb_{task_id[:8]}.jpg``
beside the output (``first_frame_data`` / ``first_frame_filename`` of complete-task); its complete-task
function makes image thumbnails itself (a third of the size, JPEG quality 80). The public URL of the stored
thumbnail is then written into the task's params as ``thumbnail_url`` (where: ``db.thumbnails``, applied by
every store's ``complete``).

Here both kinds are bounded to ``MAX_THUMBNAIL_SIDE`` on the long side (the original sent full-size video
frames), so a 4K output never makes a 4K "thumbnail".
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from Wan2GP.artifact import Artifact
from Wan2GP.video import VideoSource, extract_frame, load_image

MAX_THUMBNAIL_SIDE = 512
VIDEO_JPEG_QUALITY = 90
IMAGE_JPEG_QUALITY = 80  # the original's image thumbnails
IMAGE_SCALE = 1 / 3  # the original's image thumbnails are a third of the image
THUMBNAIL_MEDIA_TYPE = "image/jpeg"


def thumbnail_filename(task_id: str) -> str:
    """The original's thumbnail name: ``thumb_`` + the first 8 characters of the task id + ``.jpg``."""
    return f"thumb_{task_id[:8]}.jpg"


def _bounded_size(width: int, height: int, scale: float, max_side: int) -> tuple[int, int]:
    scale = min(scale, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_thumbnail(frame: np.ndarray, scale: float = 1.0, max_side: int = MAX_THUMBNAIL_SIDE,
                     quality: int = VIDEO_JPEG_QUALITY) -> bytes:  # fmt: skip
    """JPEG bytes of an (H, W, 3) uint8 frame scaled by ``scale``, never larger than ``max_side``."""
    if (
        not isinstance(frame, np.ndarray)
        or frame.dtype != np.uint8
        or frame.ndim != 3
        or frame.shape[-1] != 3
    ):
        raise ValueError(f"frame must be a uint8 (H, W, 3) array, got {getattr(frame, 'shape', type(frame))}")
    if not 0 < scale <= 1 or max_side < 1:
        raise ValueError(f"scale must be in (0, 1] and max_side >= 1, got {scale}, {max_side}")
    image = Image.fromarray(np.ascontiguousarray(frame), mode="RGB")
    size = _bounded_size(image.width, image.height, scale, max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def video_thumbnail(video: VideoSource | np.ndarray, max_side: int = MAX_THUMBNAIL_SIDE) -> bytes:
    """The first frame of a video (bytes, path or (T, H, W, 3) frames) as a bounded JPEG."""
    return encode_thumbnail(extract_frame(video, 0), max_side=max_side)


def image_thumbnail(image: bytes | str | np.ndarray, max_side: int = MAX_THUMBNAIL_SIDE) -> bytes:
    """An image (bytes, path or (H, W, 3) array) at a third of its size, bounded, as JPEG quality 80."""
    frame = image if isinstance(image, np.ndarray) else load_image(image)
    return encode_thumbnail(frame, scale=IMAGE_SCALE, max_side=max_side, quality=IMAGE_JPEG_QUALITY)


def thumbnail_artifact(task_id: str, output: Artifact, max_side: int = MAX_THUMBNAIL_SIDE) -> Artifact | None:
    """The thumbnail of an output artifact (first frame of a video, a reduced image), or None for other
    media (nothing to picture). Its metadata names the output it belongs to."""
    if output.media_type.startswith("video/"):
        data = video_thumbnail(output.data, max_side)
    elif output.media_type.startswith("image/"):
        data = image_thumbnail(output.data, max_side)
    else:
        return None
    width, height = Image.open(io.BytesIO(data)).size
    metadata = {"thumbnail_of": output.filename, "width": width, "height": height}
    return Artifact(
        data=data, filename=thumbnail_filename(task_id), media_type=THUMBNAIL_MEDIA_TYPE, metadata=metadata
    )
