"""The result of one generation: encoded bytes plus what a caller needs to store and describe them.

Two stages, so the GPU replica is free as soon as its GPU work ends (issue 21.5):

    Rendered   raw uint8 frames (T, H, W, 3) + fps + metadata: what the replica returns
    Artifact   the encoded file (MP4 / PNG) + metadata: what storage and the task's result take

`Rendered.encode()` turns the first into the second; it runs wherever the caller decides (a CPU Ray
task in the served path, in process for the plain-library `Engine.generate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from Wan2GP.postprocess import PostProcess


@dataclass
class Artifact:
    """An encoded output file, produced by the engine and stored by the ingress.

    Deployments return artifacts instead of paths so they never touch storage or the database.
    """

    data: bytes
    filename: str
    media_type: str  # "video/mp4" or "image/png"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)


# (frames, fps) -> MP4 bytes: Wan2GP.video.encode_mp4 unless a caller swaps in another (Wan2GP.parallel).
VideoEncoder = Callable[..., bytes]


@dataclass
class Rendered:
    """A generation's frames before encoding: uint8 (T, H, W, 3) RGB, one frame for an image."""

    frames: np.ndarray
    fps: int
    stem: str  # the output's file name without its extension (the task id)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.frames, np.ndarray) or self.frames.dtype != np.uint8 or self.frames.ndim != 4:
            raise ValueError(f"frames: must be a uint8 (T, H, W, 3) array, got {type(self.frames).__name__}")

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes)

    def encode(self, video_encoder: VideoEncoder | None = None) -> Artifact:
        """The encoded file: a PNG for one frame, else an MP4 at `fps`. Its time goes in the metadata's
        `timings["encode_file"]` (the result's `encode`)."""
        from Wan2GP.video import encode_mp4, encode_png

        started_at, start = time.time(), time.perf_counter()
        if len(self.frames) == 1:
            data, extension, media_type = encode_png(self.frames[0]), "png", "image/png"
        else:
            encode = video_encoder or encode_mp4
            data, extension, media_type = encode(self.frames, fps=self.fps), "mp4", "video/mp4"
        metadata = dict(self.metadata)
        metadata["encode_started_at"] = round(started_at, 3)  # epoch s: after the replica handed it back
        metadata["timings"] = {
            **metadata.get("timings", {}),
            "encode_file": round(time.perf_counter() - start, 4),
        }
        return Artifact(
            data=data, filename=f"{self.stem}.{extension}", media_type=media_type, metadata=metadata
        )


def encode_rendered(rendered: Rendered | Artifact, post: PostProcess | None = None) -> Artifact:
    """`rendered.encode()` as a plain function: the body of the CPU Ray task the runner starts. With `post`
    (the task's output post-processing, `Wan2GP.postprocess`) the frames are post-processed first, here on
    the CPU; an artifact a replica already encoded is decoded for it unless `Engine.generate` post-processed
    it (its metadata has `postprocess`), and returned as is when there is nothing to do."""
    if post is None or not post.active:
        return rendered if isinstance(rendered, Artifact) else rendered.encode()
    from Wan2GP.postprocess import apply_postprocess, rendered_from_artifact

    if isinstance(rendered, Artifact):
        if "postprocess" in rendered.metadata:  # Engine.generate post-processed it already (multi-GPU)
            return rendered
        rendered = rendered_from_artifact(rendered)
    return apply_postprocess(rendered, post).encode()
