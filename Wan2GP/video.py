"""Video and image utilities of the engine: encoding, decoding, and the frame operations of travel runs.

Frames are always numpy arrays of uint8 RGB, shaped (T, H, W, 3) for videos and (H, W, 3) for images.
Encoding and decoding go through the ffmpeg binary bundled with imageio-ffmpeg, so no system ffmpeg is
needed. This module imports neither torch nor ray: tensors are recognised by duck typing.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# imageio-ffmpeg starts its decoder with preexec_fn, which makes Python fork() instead of vfork(). In a
# Ray worker the fork runs gRPC's at-fork handlers, whose restarted poller can abort the child before it
# reaches exec (seen here as "Epoll1Poller ... Bad file descriptor"). Without preexec_fn there is no fork.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

VideoSource = bytes | str | os.PathLike
FIT_MODES = ("letterbox", "crop", "stretch")


# ---------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------


def _check_frames(frames: Any, name: str = "frames", allow_empty: bool = False) -> np.ndarray:
    """Return ``frames`` if it is a uint8 (T, H, W, 3) array, else raise a ValueError naming the problem."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape (T, H, W, 3), got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (T, H, W, 3), got {frames.shape}")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"{name} must have a non-zero height and width, got {frames.shape}")
    if not allow_empty and frames.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 frames)")
    return frames


def _check_image(image: Any, name: str = "image") -> np.ndarray:
    """Return ``image`` if it is a uint8 (H, W, 3) array, else raise a ValueError naming the problem."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape (H, W, 3), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must have a non-zero height and width, got {image.shape}")
    return image


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_finite_number(value: Any, name: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Replicate the last row/column where height/width is odd, because yuv420p needs even sizes."""
    pad_h = frames.shape[1] % 2
    pad_w = frames.shape[2] % 2
    if pad_h == 0 and pad_w == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """Encode RGB frames to an H.264 (libx264, yuv420p, +faststart) MP4 and return its bytes.

    ``frames`` is uint8 (T, H, W, 3) RGB. yuv420p needs even sizes, so an odd height or width is padded by
    one pixel (the last row/column repeated): the decoded video is then one pixel larger on that side.
    ``crf`` is libx264's quality (0 = lossless luma, 51 = worst).
    """
    frames = _check_frames(frames)
    fps = _check_positive_int(fps, "fps")
    if isinstance(crf, bool) or not isinstance(crf, int | np.integer) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")

    frames = np.ascontiguousarray(_pad_to_even(frames))
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="wan2gp_encode_") as tmp:
        # ffmpeg writes to a seekable file: +faststart rewrites the file to move the index to the front.
        out_path = os.path.join(tmp, "out.mp4")
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            str(fps),
            "-i",
            "-",
            "-an",
            "-c:v",
            "libx264",
            "-crf",
            str(int(crf)),
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            out_path,
        ]
        result = subprocess.run(command, input=frames.tobytes(), capture_output=True, check=False)
        if result.returncode != 0:
            message = result.stderr.decode("utf-8", errors="replace").strip()
            raise RuntimeError(f"ffmpeg failed to encode {len(frames)} frames of {width}x{height}: {message}")
        with open(out_path, "rb") as handle:
            return handle.read()


# Every piece joined must have the same decode delay: libx264's B-frames delay a piece of 3 frames or more
# by two frames, while 1 or 2 frames have none, and the concat demuxer then gives clashing timestamps.
MIN_JOIN_FRAMES = 3


def join_mp4(pieces: Sequence[bytes], frames: Sequence[int], fps: int) -> bytes:
    """One MP4 from MP4s that :func:`encode_mp4` made of consecutive frames (``frames[i]`` in ``pieces[i]``;
    same size, ``fps`` and settings), joined by ffmpeg's concat demuxer as a stream copy: nothing is
    re-encoded, so joining costs a file copy. The result differs from one encode of all the frames only in
    its key frames (one at each join). Each piece's duration is given to the demuxer: read from the files,
    B-frame pieces would overlap by their decode delay and some frames would get wrong timestamps.
    """
    if not pieces or len(pieces) != len(frames):
        raise ValueError(
            f"pieces ({len(pieces)}) and frames ({len(frames)}) must be equally long, at least 1"
        )
    if len(pieces) == 1:
        return bytes(pieces[0])
    if min(frames) < MIN_JOIN_FRAMES:
        raise ValueError(f"every piece needs at least {MIN_JOIN_FRAMES} frames to join, got {list(frames)}")
    fps = _check_positive_int(fps, "fps")
    with tempfile.TemporaryDirectory(prefix="wan2gp_join_") as tmp:
        listing = []
        for index, (piece, count) in enumerate(zip(pieces, frames, strict=True)):
            path = os.path.join(tmp, f"piece{index}.mp4")
            with open(path, "wb") as handle:
                handle.write(piece)
            listing += [f"file '{path}'", f"duration {count / fps:.9f}"]
        list_path = os.path.join(tmp, "pieces.txt")
        with open(list_path, "w") as handle:
            handle.write("\n".join(listing) + "\n")
        out_path = os.path.join(tmp, "out.mp4")
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                   "-f", "concat", "-safe", "0", "-i", list_path, "-c", "copy",
                   "-movflags", "+faststart", out_path]  # fmt: skip
        result = subprocess.run(command, capture_output=True, check=False)
        message = result.stderr.decode("utf-8", errors="replace").strip()
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg failed to join {len(pieces)} encoded pieces: {message}")
        # The demuxer skips a piece it cannot open and still succeeds: count what came out.
        counted = _count_packets(out_path)
        if counted != sum(frames):
            raise RuntimeError(
                f"ffmpeg failed to join {len(pieces)} encoded pieces: {counted} frames came out of "
                f"{sum(frames)}{': ' + message if message else ''}"
            )
        with open(out_path, "rb") as handle:
            return handle.read()


def _count_packets(path: str) -> int:
    """The video packets (frames) of an MP4, read without decoding them: one line per packet from ffmpeg's
    framecrc muxer, a stream copy (imageio_ffmpeg.count_frames_and_secs decodes every frame, 10x slower;
    the progress report's frame count of a stream copy differs between ffmpeg builds). 0 if unreadable."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
               "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        return 0
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith(b"#"))


def encode_png(frame: np.ndarray) -> bytes:
    """Encode one uint8 (H, W, 3) RGB frame as PNG bytes (lossless)."""
    frame = _check_image(frame, "frame")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def _as_path(source: VideoSource, name: str = "source") -> Iterator[str]:
    """Yield a file path for ``source``: bytes are written to a temporary file (ffmpeg needs to seek in mp4)."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise ValueError(f"{name} is empty (0 bytes)")
        with tempfile.TemporaryDirectory(prefix="wan2gp_decode_") as tmp:
            path = os.path.join(tmp, "input.mp4")
            with open(path, "wb") as handle:
                handle.write(data)
            yield path
    elif isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: no such video file: {path}")
        yield path
    else:
        raise ValueError(f"{name} must be bytes or a file path, got {type(source).__name__}")


def _describe(source: VideoSource) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return repr(source)  # not a valid source: _as_path raises the error naming it


class _FrameStream:
    """Frames of a video file decoded by ffmpeg one at a time; ``close`` stops the ffmpeg process."""

    def __init__(self, path: str, description: str) -> None:
        self._description = description
        self._generator = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        try:
            meta = next(self._generator)  # the first item imageio-ffmpeg yields is the stream metadata
        except (OSError, RuntimeError, StopIteration) as error:
            self._generator.close()
            raise ValueError(f"source {description} is not a decodable video: {error}") from error
        self.width, self.height = (int(v) for v in meta["size"])
        self.fps = float(meta["fps"])

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            for raw in self._generator:
                yield np.frombuffer(raw, dtype=np.uint8).reshape(self.height, self.width, 3)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"source {self._description} could not be decoded: {error}") from error

    def close(self) -> None:
        self._generator.close()

    def __enter__(self) -> _FrameStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def decode_video(source: VideoSource) -> tuple[np.ndarray, float]:
    """Decode a video (bytes or a file path) into uint8 (T, H, W, 3) RGB frames and its frame rate."""
    description = _describe(source)
    with _as_path(source) as path, _FrameStream(path, description) as stream:
        frames = list(stream)
        fps = stream.fps
    if not frames:
        raise ValueError(f"source {description} contains no video frames")
    return np.stack(frames), fps


def probe_video(source: VideoSource) -> dict[str, Any]:
    """Describe a video without decoding its pixels: {"frames": int, "fps": float, "width": int, "height": int}."""
    description = _describe(source)
    with _as_path(source) as path:
        with _FrameStream(path, description) as stream:  # only its metadata is read
            info = {"fps": stream.fps, "width": stream.width, "height": stream.height}
        try:
            # Decodes every frame into a null muxer: the frames a reader gets (slow for long videos).
            frame_count, _ = imageio_ffmpeg.count_frames_and_secs(path)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"source {description}: could not count frames: {error}") from error
    return {"frames": int(frame_count), **info}


def load_image(source: bytes | str | os.PathLike) -> np.ndarray:
    """Load an image (bytes or a file path) as uint8 (H, W, 3) RGB; any mode (RGBA, L, P, ...) is converted."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ValueError("source is empty (0 bytes)")
        opened: Any = io.BytesIO(bytes(source))
        description = f"<{len(source)} bytes>"
    elif isinstance(source, str | os.PathLike):
        description = os.fspath(source)
        if not os.path.isfile(description):
            raise FileNotFoundError(f"source: no such image file: {description}")
        opened = description
    else:
        raise ValueError(f"source must be bytes or a file path, got {type(source).__name__}")
    try:
        with Image.open(opened) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"source {description} is not a decodable image: {error}") from error


# ---------------------------------------------------------------------------------------------------------
# Pipeline outputs -> uint8 frames
# ---------------------------------------------------------------------------------------------------------


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ValueError("video contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    # Small excursions past [0, 1] are VAE rounding; anything larger means the caller used another range.
    if low < -0.01 or high > 1.01:
        raise ValueError(
            f"video of floats must hold values in [0, 1] (diffusers output_type='np'), got range [{low}, {high}]"
        )
    return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def _tensor_to_uint8(video: torch.Tensor) -> np.ndarray:
    """A torch tensor converted to uint8 on its own device (the GPU, in the engine) before the copy to the
    host: a quarter of the bytes of float32 cross. The same values as the numpy path (clip, x255, round half
    to even), then the same shape handling."""
    import torch

    tensor = video.detach()
    if tensor.numel() == 0 or tensor.dtype == torch.uint8 or not tensor.is_floating_point():
        return to_uint8_frames(tensor.cpu().numpy())  # its checks name the problem
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("video contains NaN or infinite values")
    low, high = float(tensor.min()), float(tensor.max())
    if low < -0.01 or high > 1.01:
        raise ValueError(
            f"video of floats must hold values in [0, 1] (diffusers output_type='np'), got range [{low}, {high}]"
        )
    return to_uint8_frames(torch.round(tensor.clamp(0.0, 1.0) * 255.0).to(torch.uint8).cpu().numpy())


def to_uint8_frames(
    video: np.ndarray | torch.Tensor | Sequence[Image.Image] | Sequence[np.ndarray],
) -> np.ndarray:
    """Convert a pipeline's video output to uint8 (T, H, W, 3) RGB frames.

    Accepts what diffusers returns: ``output_type="np"`` (float in [0, 1], (T, H, W, 3)), ``"pil"`` (a list
    of PIL images), ``"pt"`` tensors (channels last, or channels first (T, 3, H, W)), and uint8 arrays.
    A leading batch dimension of size 1 is dropped; a single (H, W, 3) image becomes one frame.
    """
    if isinstance(video, list | tuple):
        if len(video) == 0:
            raise ValueError("video is empty (0 frames)")
        if all(isinstance(item, Image.Image) for item in video):
            arrays = [np.asarray(item.convert("RGB"), dtype=np.uint8) for item in video]
        else:
            arrays = [to_uint8_frames(item)[0] if np.ndim(item) == 3 else None for item in video]
            if any(item is None for item in arrays):
                raise ValueError("video as a list must hold PIL images or (H, W, 3) arrays")
        sizes = {item.shape for item in arrays}
        if len(sizes) != 1:
            raise ValueError(f"video frames must all have the same size, got {sorted(sizes)}")
        return np.stack(arrays)

    if hasattr(video, "detach") and hasattr(video, "cpu"):  # a torch tensor, without importing torch
        return _tensor_to_uint8(video)
    if not isinstance(video, np.ndarray):
        raise ValueError(
            f"video must be a numpy array, a torch tensor or a list of PIL images, got {type(video).__name__}"
        )

    array = video
    if array.ndim == 5:
        if array.shape[0] != 1:
            raise ValueError(
                f"video has a batch of {array.shape[0]} videos; pass one video, got {array.shape}"
            )
        array = array[0]
    if array.ndim == 3:
        array = array[np.newaxis]
    if array.ndim != 4:
        raise ValueError(f"video must have shape (T, H, W, 3), got {video.shape}")
    if array.shape[-1] != 3 and array.shape[1] == 3:
        array = np.moveaxis(array, 1, -1)  # channels first (T, 3, H, W), as torch tensors are laid out
    if array.shape[-1] != 3:
        raise ValueError(f"video must have 3 (RGB) channels, got shape {video.shape}")
    if array.shape[0] == 0:
        raise ValueError("video is empty (0 frames)")

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(_float_to_uint8(array.astype(np.float32)))
    raise ValueError(f"video must be uint8 or floats in [0, 1], got dtype {array.dtype}")


# ---------------------------------------------------------------------------------------------------------
# Frame access
# ---------------------------------------------------------------------------------------------------------


def _normalise_index(index: int, count: int, name: str = "index") -> int:
    """Map a possibly negative index into [0, count); raise an IndexError naming it and the frame count."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {index!r}")
    position = int(index) + count if index < 0 else int(index)
    if not 0 <= position < count:
        raise IndexError(f"{name} {index} is out of range for {count} frames")
    return position


def extract_frame(source: VideoSource | np.ndarray, index: int) -> np.ndarray:
    """Return frame ``index`` (negative = from the end) of a video (bytes, path, or (T, H, W, 3) frames).

    Encoded videos are streamed, so only the requested frame (or the last ``-index`` frames) is kept in memory.
    """
    if isinstance(source, np.ndarray):
        frames = _check_frames(source, "source", allow_empty=True)
        return frames[_normalise_index(index, len(frames))].copy()

    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise ValueError(f"index must be an integer, got {index!r}")
    description = _describe(source)
    with _as_path(source) as path, _FrameStream(path, description) as stream:
        count = 0
        found: np.ndarray | None = None
        # For a negative index, keep a window of the last -index frames: its first element is the answer.
        tail: deque[np.ndarray] = deque(maxlen=-int(index) if index < 0 else 1)
        for frame in stream:
            if index >= 0 and count == index:
                found = frame
                break
            tail.append(frame)
            count += 1
    if index >= 0:
        if found is None:
            raise IndexError(f"index {index} is out of range for {count} frames")
        return found.copy()
    if count < -index:
        raise IndexError(f"index {index} is out of range for {count} frames")
    return tail[0].copy()


# ---------------------------------------------------------------------------------------------------------
# Cross-fading and stitching
# ---------------------------------------------------------------------------------------------------------


def crossfade_weights(overlap: int, sharpness: float = 0.0) -> np.ndarray:
    """Weights of the incoming clip over an overlap of ``overlap`` frames, strictly increasing in (0, 1).

    The linear ramp is (i + 1) / (overlap + 1), so no blended frame is a pure copy of either clip.
    ``sharpness`` > 0 turns it into a symmetric S-curve t^p / (t^p + (1 - t)^p) with p = 1 + 3 * sharpness:
    the hand-over happens faster around the middle of the overlap (the original's crossfade_sharp_amt,
    usually 0 to 1). sharpness 0 is exactly linear.
    """
    overlap = _check_non_negative_int(overlap, "overlap")
    sharpness = _check_finite_number(sharpness, "sharpness", minimum=0.0)
    t = np.arange(1, overlap + 1, dtype=np.float64) / (overlap + 1)
    if sharpness == 0.0:
        return t
    power = 1.0 + 3.0 * sharpness
    return t**power / (t**power + (1.0 - t) ** power)


def _blend(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Blend frames a[i] and b[i] with weight weights[i] on b, rounding to uint8."""
    w = weights.reshape(-1, 1, 1, 1).astype(np.float32)
    mixed = (1.0 - w) * a.astype(np.float32) + w * b.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def crossfade(a: np.ndarray, b: np.ndarray, overlap: int, sharpness: float = 0.0) -> np.ndarray:
    """Join two clips, blending the last ``overlap`` frames of ``a`` with the first ``overlap`` of ``b``.

    The result has len(a) + len(b) - overlap frames; frames outside the overlap are copied unchanged.
    overlap 0 concatenates. See crossfade_weights for the ramp and ``sharpness``.
    """
    # Validate here too, so errors name this function's arguments rather than stitch's.
    a = _check_frames(a, "a")
    b = _check_frames(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"b has frame size {b.shape[1:3]}, expected {a.shape[1:3]} like a")
    overlap = _check_non_negative_int(overlap, "overlap")
    if overlap > min(len(a), len(b)):
        raise ValueError(f"overlap {overlap} exceeds the shorter clip ({min(len(a), len(b))} frames)")
    return stitch([a, b], [overlap], sharpness=sharpness)


def stitch(clips: Sequence[np.ndarray], overlaps: Sequence[int], sharpness: float = 0.0) -> np.ndarray:
    """Cross-fade each consecutive pair of clips; the result has sum(len(clips)) - sum(overlaps) frames.

    overlaps[i] joins clips[i] and clips[i + 1] and may not exceed the shorter of the two. When a clip is
    shorter than its two overlaps together, the second cross-fade blends into already blended frames, exactly
    as folding crossfade over the clips would.
    """
    if not isinstance(clips, Sequence) or len(clips) == 0:
        raise ValueError("clips must be a non-empty list of (T, H, W, 3) arrays")
    if not isinstance(overlaps, Sequence) or len(overlaps) != len(clips) - 1:
        count = len(overlaps) if isinstance(overlaps, Sequence) else type(overlaps).__name__
        raise ValueError(
            f"overlaps must be a list of len(clips) - 1 = {len(clips) - 1} integers, got {count}"
        )
    checked = [_check_frames(clip, f"clips[{i}]") for i, clip in enumerate(clips)]
    size = checked[0].shape[1:]
    for i, clip in enumerate(checked[1:], start=1):
        if clip.shape[1:] != size:
            raise ValueError(
                f"clips[{i}] has frame size {clip.shape[1:3]}, expected {size[:2]} like clips[0]"
            )
    values = []
    for i, overlap in enumerate(overlaps):
        value = _check_non_negative_int(overlap, f"overlaps[{i}]")
        shorter = min(len(checked[i]), len(checked[i + 1]))
        if value > shorter:
            raise ValueError(f"overlaps[{i}] = {value} exceeds the shorter clip it joins ({shorter} frames)")
        values.append(value)
    sharpness = _check_finite_number(sharpness, "sharpness", minimum=0.0)

    total = sum(len(clip) for clip in checked) - sum(values)
    out = np.empty((total, *size), dtype=np.uint8)
    out[: len(checked[0])] = checked[0]
    end = len(checked[0])
    for clip, overlap in zip(checked[1:], values, strict=True):
        start = end - overlap
        if overlap:
            out[start:end] = _blend(out[start:end], clip[:overlap], crossfade_weights(overlap, sharpness))
        out[end : start + len(clip)] = clip[overlap:]
        end = start + len(clip)
    return out


# ---------------------------------------------------------------------------------------------------------
# Colour and brightness
# ---------------------------------------------------------------------------------------------------------


def _frames_or_image(value: Any, name: str) -> tuple[np.ndarray, bool]:
    """Accept (T, H, W, 3) frames or one (H, W, 3) image; return frames and whether the input was an image."""
    if isinstance(value, np.ndarray) and value.ndim == 3:
        return _check_image(value, name)[np.newaxis], True
    return _check_frames(value, name), False


def _check_reference(reference: Any, name: str, width: int, height: int) -> np.ndarray:
    """A reference image resized (stretched) to the frames' size, as the original resizes it."""
    reference = _check_image(reference, name)
    if reference.shape[:2] != (height, width):
        reference = cv2.resize(reference, (width, height), interpolation=cv2.INTER_LINEAR)
    return reference


def _halve_saturation(frame: np.ndarray) -> np.ndarray:
    """HSV saturation x 0.5 in 8-bit HSV: the original desaturates before matching so that the transfer
    does not amplify colour casts of the generated frames."""
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * 0.5, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


# The smallest std ratio the transfer may apply (lightness, colour): a flat reference never flattens a frame.
_MIN_STD_RATIO = (0.1, 0.4)


def _transfer_lab_mean_std(frame: np.ndarray, reference_lab: np.ndarray) -> np.ndarray:
    """Give ``frame`` the per-channel LAB mean and standard deviation of the reference (Reinhard transfer)."""
    lab = cv2.cvtColor(frame, cv2.COLOR_RGB2LAB).astype(np.float32)
    out = np.empty_like(lab)
    for c in range(3):
        source, target = lab[..., c], reference_lab[..., c]
        source_mean, source_std = float(source.mean()), float(source.std())
        target_mean, target_std = float(target.mean()), float(target.std())
        if source_std > 1e-5:
            ratio = max(target_std / source_std, _MIN_STD_RATIO[0 if c == 0 else 1])
            out[..., c] = (source - source_mean) * ratio + target_mean
        else:
            out[..., c] = target_mean
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def colour_match(frames: np.ndarray, start_reference: np.ndarray, end_reference: np.ndarray) -> np.ndarray:
    """Pull a clip's colours toward its start and end reference images, as the original's
    ``colour_match_videos`` does.

    Each frame is desaturated by half, then given the LAB mean and standard deviation of each reference
    (OpenCV's 8-bit LAB); the two corrected frames are blended by the frame's position t in [0, 1] (start
    reference at t=0, end reference at t=1), with up to 25% of the original frame mixed back in around
    the middle (weight 0.5·t before t=0.5, 0.5 − 0.5·t after). References are resized to the frame size.
    """
    frames, was_image = _frames_or_image(frames, "frames")
    height, width = frames.shape[1:3]
    references_lab = [
        cv2.cvtColor(_check_reference(ref, name, width, height), cv2.COLOR_RGB2LAB).astype(np.float32)
        for ref, name in ((start_reference, "start_reference"), (end_reference, "end_reference"))
    ]
    count = len(frames)
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        desaturated = _halve_saturation(frame)
        from_start, from_end = (_transfer_lab_mean_std(desaturated, lab) for lab in references_lab)
        t = i / (count - 1) if count > 1 else 1.0
        w_original = 0.5 * t if t < 0.5 else 0.5 - 0.5 * t
        w_start, w_end = (1.0 - t) * (1.0 - w_original), t * (1.0 - w_original)
        blend = (
            w_start * from_start.astype(np.float32)
            + w_end * from_end.astype(np.float32)
            + w_original * frame.astype(np.float32)
        )
        out[i] = np.clip(blend, 0, 255).astype(np.uint8)
    return out[0] if was_image else out


SATURATION_RANGE = (0.0, 3.0)  # ffmpeg's eq=saturation range, which the original used
BRIGHTNESS_RANGE = (-1.0, 10.0)  # -1 is black; the original allows any number, factors past 11 are no use


def adjust_saturation(frames: np.ndarray, level: float) -> np.ndarray:
    """Scale chroma by ``level`` (1.0 unchanged, 0.0 grey), the original's ffmpeg ``eq=saturation``:
    Cb and Cr move toward or away from neutral (128) in BT.601 YCbCr while luma stays the same."""
    frames, was_image = _frames_or_image(frames, "frames")
    level = _check_finite_number(level, "saturation", minimum=SATURATION_RANGE[0])
    if level > SATURATION_RANGE[1]:
        raise ValueError(f"saturation must be <= {SATURATION_RANGE[1]}, got {level!r}")
    if level == 1.0:
        return frames[0].copy() if was_image else frames.copy()  # the YCbCr round trip is not bit exact
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        ycc = cv2.cvtColor(frame, cv2.COLOR_RGB2YCrCb).astype(np.float32)
        ycc[..., 1:] = (ycc[..., 1:] - 128.0) * level + 128.0
        out[t] = cv2.cvtColor(np.clip(np.rint(ycc), 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2RGB)
    return out[0] if was_image else out


def adjust_brightness(frames: np.ndarray, delta: float) -> np.ndarray:
    """Multiply every channel by ``1 + delta`` (0 unchanged, negative darkens, -1 black), clipped to
    [0, 255] and truncated, the original's ``after_first_post_generation_brightness``."""
    frames, was_image = _frames_or_image(frames, "frames")
    delta = _check_finite_number(delta, "brightness", minimum=BRIGHTNESS_RANGE[0])
    if delta > BRIGHTNESS_RANGE[1]:
        raise ValueError(f"brightness must be <= {BRIGHTNESS_RANGE[1]}, got {delta!r}")
    out = (
        frames.copy()
        if delta == 0
        else np.clip(frames.astype(np.float32) * (1.0 + delta), 0, 255).astype(np.uint8)
    )
    return out[0] if was_image else out


def fade(
    frames: np.ndarray,
    fade_in: int = 0,
    fade_out: int = 0,
    colour: tuple[int, int, int] = (0, 0, 0),
    start: int = 0,
    total: int | None = None,
) -> np.ndarray:
    """Fade the first ``fade_in`` frames in from ``colour`` and the last ``fade_out`` frames out to it.

    The first frame of a fade-in is pure ``colour`` and the ramp rises linearly over ``fade_in`` frames;
    the last frame of a fade-out is pure ``colour``. The fades may not overlap.

    ``frames`` may be a part of the video: frames ``[start, start + len(frames))`` of a video of ``total``
    frames (default: the whole video). Each frame gets exactly what fading the whole video gives it.
    """
    frames = _check_frames(frames)
    fade_in = _check_non_negative_int(fade_in, "fade_in")
    fade_out = _check_non_negative_int(fade_out, "fade_out")
    start = _check_non_negative_int(start, "start")
    total = len(frames) + start if total is None else _check_non_negative_int(total, "total")
    if start + len(frames) > total:
        raise ValueError(f"frames [{start}, {start + len(frames)}) run past the video's {total} frames")
    if fade_in + fade_out > total:
        raise ValueError(f"fade_in + fade_out = {fade_in + fade_out} exceeds the {total} frames")
    if (
        not isinstance(colour, Sequence)
        or len(colour) != 3
        or not all(
            isinstance(c, int | np.integer) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour
        )
    ):
        raise ValueError(f"colour must be three integers in [0, 255], got {colour!r}")

    out = frames.copy()
    solid = np.asarray(colour, dtype=np.uint8)
    # Positions in the whole video: 0, 1/n, ..., (n-1)/n of the content in; (n-1)/n, ..., 0 out.
    positions = np.arange(start, start + len(frames))
    fading_in = positions < fade_in
    fading_out = positions >= total - fade_out
    for mask, content in (
        (fading_in, positions[fading_in].astype(np.float64) / max(fade_in, 1)),
        (
            fading_out,
            1.0 - (positions[fading_out] - (total - fade_out) + 1).astype(np.float64) / max(fade_out, 1),
        ),
    ):
        if mask.any():
            solids = np.broadcast_to(solid, (int(mask.sum()), *frames.shape[1:]))
            out[mask] = _blend(solids, frames[mask], content)
    return out


# ---------------------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, width: int, height: int, interpolation: int | None = None) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image.copy()
    if interpolation is None:
        shrinking = width * height < image.shape[0] * image.shape[1]
        # INTER_AREA avoids aliasing when shrinking; Lanczos keeps detail when enlarging.
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    return cv2.resize(image, (width, height), interpolation=interpolation)


def fit_resolution(
    image_or_frames: np.ndarray, width: int, height: int, mode: str = "letterbox"
) -> np.ndarray:
    """Resize an (H, W, 3) image or (T, H, W, 3) frames to exactly ``width`` x ``height``.

    mode "letterbox" keeps the aspect ratio and pads with black (centred), "crop" keeps the aspect ratio
    and cuts the overflow (centred), "stretch" ignores the aspect ratio.
    """
    frames, was_image = _frames_or_image(image_or_frames, "image_or_frames")
    width = _check_positive_int(width, "width")
    height = _check_positive_int(height, "height")
    if mode not in FIT_MODES:
        raise ValueError(f"mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")

    source_h, source_w = frames.shape[1:3]
    out = np.zeros((len(frames), height, width, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        if mode == "stretch":
            out[t] = _resize(frame, width, height)
            continue
        pick = min if mode == "letterbox" else max
        scale = pick(width / source_w, height / source_h)
        scaled_w = max(1, round(source_w * scale))
        scaled_h = max(1, round(source_h * scale))
        if mode == "letterbox":
            scaled_w, scaled_h = min(scaled_w, width), min(scaled_h, height)
            top, left = (height - scaled_h) // 2, (width - scaled_w) // 2
            out[t, top : top + scaled_h, left : left + scaled_w] = _resize(frame, scaled_w, scaled_h)
        else:
            scaled_w, scaled_h = max(scaled_w, width), max(scaled_h, height)
            top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
            out[t] = _resize(frame, scaled_w, scaled_h)[top : top + height, left : left + width]
    return out[0] if was_image else out


def upscale(frames: np.ndarray, factor: float) -> np.ndarray:
    """Resize frames by ``factor`` with Lanczos; the new sizes are rounded to even numbers (for yuv420p)."""
    frames, was_image = _frames_or_image(frames, "frames")
    factor = _check_finite_number(factor, "factor")
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    height, width = frames.shape[1:3]
    new_w = max(2, 2 * round(width * factor / 2))
    new_h = max(2, 2 * round(height * factor / 2))
    out = np.empty((len(frames), new_h, new_w, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        out[t] = _resize(frame, new_w, new_h, cv2.INTER_LANCZOS4)
    return out[0] if was_image else out


# ---------------------------------------------------------------------------------------------------------
# VACE guide and mask
# ---------------------------------------------------------------------------------------------------------

MASK_GENERATE = 255
MASK_KEEP = 0


def build_vace_guide(
    total_frames: int,
    width: int,
    height: int,
    leading_frames: np.ndarray | None,
    anchors: Sequence[tuple[int, np.ndarray]],
    grey: int = 127,
    fit_mode: str = "crop",
) -> tuple[np.ndarray, np.ndarray]:
    """Build the guide video and mask of one travel segment for a VACE pipeline.

    Returns (guide uint8 (T, H, W, 3), mask uint8 (T, H, W)); mask 255 = generate, 0 = keep. The
    ``leading_frames`` (the previous segment's last frames, already width x height) fill indices 0..k-1;
    each anchor image is resized with fit_resolution(``fit_mode``, default "crop" so no bars are
    generated into the video) and placed at its index (negative = from the end); every other frame is
    ``grey`` and generated.
    """
    total_frames = _check_positive_int(total_frames, "total_frames")
    width = _check_positive_int(width, "width")
    height = _check_positive_int(height, "height")
    if isinstance(grey, bool) or not isinstance(grey, int | np.integer) or not 0 <= grey <= 255:
        raise ValueError(f"grey must be an integer in [0, 255], got {grey!r}")

    guide = np.full((total_frames, height, width, 3), grey, dtype=np.uint8)
    mask = np.full((total_frames, height, width), MASK_GENERATE, dtype=np.uint8)

    leading_count = 0
    if leading_frames is not None:
        leading_frames = _check_frames(leading_frames, "leading_frames", allow_empty=True)
        if leading_frames.shape[1:3] != (height, width):
            raise ValueError(
                f"leading_frames are {leading_frames.shape[2]}x{leading_frames.shape[1]}, "
                f"expected width x height = {width}x{height}"
            )
        leading_count = len(leading_frames)
        if leading_count > total_frames:
            raise ValueError(
                f"leading_frames has {leading_count} frames, more than total_frames = {total_frames}"
            )
        guide[:leading_count] = leading_frames
        mask[:leading_count] = MASK_KEEP

    if not isinstance(anchors, Sequence):
        raise ValueError(f"anchors must be a list of (index, image) pairs, got {type(anchors).__name__}")
    placed: dict[int, int] = {}
    for i, anchor in enumerate(anchors):
        if not isinstance(anchor, tuple | list) or len(anchor) != 2:
            raise ValueError(f"anchors[{i}] must be an (index, image) pair, got {anchor!r}")
        index, image = anchor
        try:
            position = _normalise_index(index, total_frames, f"anchors[{i}] index")
        except IndexError as error:
            raise ValueError(str(error)) from error
        if position < leading_count:
            raise ValueError(
                f"anchors[{i}] index {index} (frame {position}) overlaps the {leading_count} leading frames"
            )
        if position in placed:
            raise ValueError(
                f"anchors[{i}] index {index} (frame {position}) is also used by anchors[{placed[position]}]"
            )
        placed[position] = i
        guide[position] = fit_resolution(_check_image(image, f"anchors[{i}] image"), width, height, fit_mode)
        mask[position] = MASK_KEEP
    return guide, mask


def mask_to_video(mask: np.ndarray) -> np.ndarray:
    """Turn a (T, H, W) mask into a (T, H, W, 3) video (the same value in each channel), as VACE expects."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 3:
        shape = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask must be a numpy array of shape (T, H, W), got {shape}")
    if mask.dtype == np.bool_:
        mask = np.where(mask, MASK_GENERATE, MASK_KEEP).astype(np.uint8)
    elif mask.dtype != np.uint8:
        raise ValueError(f"mask must have dtype uint8 or bool, got {mask.dtype}")
    return np.repeat(mask[..., np.newaxis], 3, axis=-1)
