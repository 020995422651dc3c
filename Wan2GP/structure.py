"""Structure guidance: turn "structure videos" into the VACE control frames of a generation.

A client gives one structure video (``structure_video_path``) or several placed on frame ranges of the
output timeline (``structure_videos[]``), and a ``structure_type`` saying what to extract from them:

    raw    the frames themselves
    canny  edges (OpenCV Canny: white edges on black, like the original's edge annotator)
    flow   optical flow between consecutive frames (OpenCV DIS), drawn with the Middlebury colour wheel
           exactly as the original's RAFT ``flow_to_image`` draws it (no motion = white)
    depth  a depth map from a transformers depth-estimation model in a local folder
           (``WAN2GP_DEPTH_MODEL_DIR``); without one, ``depth`` is refused naming the field

Each video is sampled to its frame range with its ``treatment`` (the original's meanings):

    adjust  stretch or compress the whole (source range of the) video evenly onto the range
    clip    play it at the output frame rate from its start; a short video loops, a long one is cut

Ranges not covered by any video hold a neutral frame (flow and depth: grey 128; raw and canny: black), as
the original composites them. The result is one control video over the output timeline; ``apply_control``
drops its frames into the generated (fully masked) frames of a VACE guide, which is how the original feeds
structure guidance into travel segments (anchors and kept context frames stay as they are).

Strength: ``structure_video_motion_strength`` scales the flow vectors. The original scales them and then
normalises by the largest scaled vector, which cancels the scale; here the normalisation uses the unscaled
largest vector, so 1.0 draws exactly what the original draws, < 1 fades the colours toward white (weaker
motion) and > 1 saturates them. ``structure_canny_intensity`` scales edge brightness and
``structure_depth_contrast`` stretches depth around mid-grey, as in the original.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from Wan2GP.field_errors import field_error
from Wan2GP.video import fit_resolution

STRUCTURE_TYPES = ("raw", "canny", "flow", "depth")
TREATMENTS = ("adjust", "clip")
# The original's neutral ("no guidance") frame of each type.
NEUTRAL_LEVEL = {"raw": 0, "canny": 0, "flow": 128, "depth": 128}
CANNY_LOW, CANNY_HIGH = 100, 200
DEPTH_MODEL_ENV = "WAN2GP_DEPTH_MODEL_DIR"
MAX_STRUCTURE_VIDEOS = 64

StructureType = Literal["raw", "canny", "flow", "depth"]
Treatment = Literal["adjust", "clip"]
VideoLoader = Callable[[str], tuple[np.ndarray, float]]


# ---------------------------------------------------------------------------------------------------------
# Preprocessors: (T, H, W, 3) uint8 frames in, the same number of control frames out
# ---------------------------------------------------------------------------------------------------------


def _scale_levels(frames: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return frames
    return np.clip(frames.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def canny_edges(frames: np.ndarray, intensity: float = 1.0) -> np.ndarray:
    """White (255) edges on black, three channels; ``intensity`` scales the edge brightness."""
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        edges = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH)
        out[t] = edges[..., np.newaxis]
    return _scale_levels(out, intensity)


def gray_levels(frames: np.ndarray) -> np.ndarray:
    """Grey-level frames (three equal channels): Wan2GP's "C" preprocessor."""
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        out[t] = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)[..., np.newaxis]
    return out


def optical_flow(frames: np.ndarray) -> np.ndarray:
    """Dense flow from each frame to the next: float32 (T - 1, H, W, 2), (dx, dy) in pixels."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    flows = np.empty((max(len(frames) - 1, 0), *frames.shape[1:3], 2), dtype=np.float32)
    for t in range(len(frames) - 1):
        flows[t] = dis.calc(grey[t], grey[t + 1], None)
    return flows


def _colour_wheel() -> np.ndarray:
    """The Middlebury flow colour wheel (Baker et al., ICCV 2007): 55 hues, red → yellow → ... → magenta."""
    segments = (
        (15, (255, 0, 0), (255, 255, 0)),
        (6, (255, 255, 0), (0, 255, 0)),
        (4, (0, 255, 0), (0, 255, 255)),
    )
    segments += (
        (11, (0, 255, 255), (0, 0, 255)),
        (13, (0, 0, 255), (255, 0, 255)),
        (6, (255, 0, 255), (255, 0, 0)),
    )
    rows = []
    for count, start, end in segments:
        steps = np.floor(255 * np.arange(count) / count)
        for i in range(count):
            # Each channel moves from its start level toward its end level by floor(255 * i / count).
            rows.append([s + np.sign(e - s) * steps[i] for s, e in zip(start, end, strict=True)])
    return np.asarray(rows, dtype=np.float64)


_WHEEL = _colour_wheel()


def flow_to_colour(flow: np.ndarray, max_radius: float | None = None) -> np.ndarray:
    """Draw an (H, W, 2) flow as RGB: hue = direction, saturation = speed / ``max_radius``, white = still.

    ``max_radius`` defaults to the largest vector of this flow (the original's normalisation); vectors
    longer than it are drawn at 75 % brightness, as the original does for out-of-range flow.
    """
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    if max_radius is None:
        max_radius = float(np.sqrt(u * u + v * v).max())
    u, v = u / (max_radius + 1e-5), v / (max_radius + 1e-5)
    radius = np.sqrt(u * u + v * v)
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (len(_WHEEL) - 1)
    k0 = np.floor(position).astype(np.int32)
    k1 = (k0 + 1) % len(_WHEEL)
    f = (position - k0)[..., np.newaxis]
    colour = ((1 - f) * _WHEEL[k0] + f * _WHEEL[k1]) / 255.0
    inside = (radius <= 1)[..., np.newaxis]
    colour = np.where(inside, 1 - radius[..., np.newaxis] * (1 - colour), colour * 0.75)
    return np.floor(255 * colour).astype(np.uint8)


def flow_visualisation(frames: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """One flow picture per frame: frame t >= 1 shows the motion t-1 → t; frame 0 repeats frame 1's picture
    (the original's FlowVisAnnotator). ``strength`` scales the vectors against the unscaled normalisation."""
    if len(frames) < 2:
        return np.full_like(frames, 255)  # one frame has no motion: white is "still" on the wheel
    flows = optical_flow(frames)
    pictures = []
    for flow in flows:
        largest = float(np.sqrt((flow.astype(np.float64) ** 2).sum(axis=-1)).max())
        pictures.append(flow_to_colour(flow * strength, max_radius=largest))
    return np.stack([pictures[0], *pictures])


class DepthEstimator:
    """A transformers depth-estimation model loaded from a local folder (no download), run on CPU or GPU."""

    def __init__(self, folder: str, device: str | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.folder = folder
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        self.model = self.model.to(self.device).eval()

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Per-frame depth normalised to [0, 255] (min → 0, max → 255, as Wan2GP's depth annotator), RGB."""
        import torch

        out = np.empty_like(frames)
        height, width = frames.shape[1:3]
        for t, frame in enumerate(frames):
            inputs = self.processor(images=frame, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                predicted = self.model(**inputs).predicted_depth  # (1, h, w)
            depth = (
                torch.nn.functional.interpolate(
                    predicted[:, None].float(), size=(height, width), mode="bicubic", align_corners=False
                )[0, 0]
                .cpu()
                .numpy()
            )
            low, high = float(depth.min()), float(depth.max())
            scaled = (depth - low) / (high - low) * 255.0 if high > low else np.zeros_like(depth)
            out[t] = np.clip(scaled, 0, 255).astype(np.uint8)[..., np.newaxis]
        return out


_DEPTH_LOCK = threading.Lock()
_DEPTH_CACHE: dict[str, DepthEstimator] = {}


def depth_model_dir() -> str | None:
    """The configured local depth model folder, if it exists (``WAN2GP_DEPTH_MODEL_DIR``)."""
    folder = os.environ.get(DEPTH_MODEL_ENV, "").strip()
    return folder if folder and os.path.isdir(folder) else None


def load_depth_estimator(folder: str | None = None) -> DepthEstimator | None:
    """The depth estimator of ``folder`` (default: the configured one), loaded once per process; None if
    no folder is configured."""
    folder = folder or depth_model_dir()
    if folder is None:
        return None
    with _DEPTH_LOCK:
        if folder not in _DEPTH_CACHE:
            _DEPTH_CACHE[folder] = DepthEstimator(folder)
        return _DEPTH_CACHE[folder]


def depth_maps(frames: np.ndarray, estimator: DepthEstimator, contrast: float = 1.0) -> np.ndarray:
    """Depth frames; ``contrast`` stretches them around mid-grey, as the original's depth_contrast."""
    depth = estimator(frames)
    if contrast == 1.0:
        return depth
    stretched = (depth.astype(np.float32) / 255.0 - 0.5) * contrast + 0.5
    return (np.clip(stretched, 0.0, 1.0) * 255).astype(np.uint8)


def preprocess(
    frames: np.ndarray,
    structure_type: str,
    strength: float = 1.0,
    canny_intensity: float = 1.0,
    depth_contrast: float = 1.0,
    depth_estimator: DepthEstimator | None = None,
) -> np.ndarray:
    """Control frames of ``structure_type`` for ``frames`` (same count, same size)."""
    if structure_type == "raw":
        return frames
    if structure_type == "canny":
        return canny_edges(frames, canny_intensity)
    if structure_type == "flow":
        return flow_visualisation(frames, strength)
    if structure_type == "depth":
        if depth_estimator is None:
            raise ValueError("structure_type 'depth' needs a depth model; none is installed")
        return depth_maps(frames, depth_estimator, depth_contrast)
    raise ValueError(f"structure_type must be one of {', '.join(STRUCTURE_TYPES)}, got {structure_type!r}")


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------


class StructureVideo(BaseModel):
    """One structure video placed on [start_frame, end_frame) of the output timeline (end None = to the end);
    [source_start_frame, source_end_frame) selects the part of the source video to use."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    path: str = Field(min_length=1)
    start_frame: int = Field(0, ge=0)
    end_frame: int | None = Field(None, ge=1)
    treatment: Treatment = "adjust"
    source_start_frame: int = Field(0, ge=0)
    source_end_frame: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> StructureVideo:
        if self.end_frame is not None and self.end_frame <= self.start_frame:
            raise ValueError(
                f"end_frame {self.end_frame} must be greater than start_frame {self.start_frame}"
            )
        if self.source_end_frame is not None and self.source_end_frame <= self.source_start_frame:
            raise ValueError(
                f"source_end_frame {self.source_end_frame} must be greater than source_start_frame "
                f"{self.source_start_frame}"
            )
        return self


class StructureGuidance(BaseModel):
    """Validated structure guidance of one generation (or one travel run)."""

    model_config = ConfigDict(frozen=True)

    structure_type: StructureType = "flow"
    videos: list[StructureVideo] = Field(default_factory=list, max_length=MAX_STRUCTURE_VIDEOS)
    strength: float = Field(1.0, ge=0.0, le=10.0)
    canny_intensity: float = Field(1.0, ge=0.0, le=10.0)
    depth_contrast: float = Field(1.0, ge=0.0, le=10.0)
    # A control video the original's orchestrator already computed (``structure_guidance_video_url`` /
    # ``_guidance_video_url``): used as it is, timeline frame t being its frame precomputed_offset + t.
    precomputed_video: str | None = None
    precomputed_offset: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _has_source(self) -> StructureGuidance:
        if not self.videos and not self.precomputed_video:
            raise ValueError("needs structure videos or a precomputed guidance video")
        return self


_UNI3C_KEYS = ("use_uni3c", "uni3c_guide_video", "uni3c_strength")
# StructureGuidance field -> the original's top-level key for it
# Every top-level key parse_structure_guidance reads: honoured wherever structure guidance is applied
# (travel, individual_travel_segment), so those payloads do not refuse or report them as ignored.
STRUCTURE_KEYS = frozenset({
    "structure_video_path", "structure_videos", "structure_guidance", "structure_type", "structure_video_type",
    "structure_video_treatment", "structure_video_motion_strength", "structure_canny_intensity",
    "structure_depth_contrast", "structure_guidance_video_url", "structure_guidance_frame_offset",
    "structure_motion_video_url", "structure_motion_frame_offset",
})  # fmt: skip

_LEGACY_KEYS = {
    "strength": "structure_video_motion_strength",
    "canny_intensity": "structure_canny_intensity",
    "depth_contrast": "structure_depth_contrast",
}


def _number(params: dict, key: str, loc: tuple, default: float = 1.0) -> float:
    value = params.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise field_error(loc, f"must be a number, got {value!r}", value) from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise field_error(loc, f"must be a finite number, got {value!r}", value)
    return number


def _precomputed(params: dict[str, Any]) -> tuple[str | None, int, tuple]:
    """The original's precomputed control video and its frame offset, in either form, if given."""
    nested = params.get("structure_guidance") if isinstance(params.get("structure_guidance"), dict) else {}
    for source, url_key, offset_key, prefix in (
        (nested, "_guidance_video_url", "_frame_offset", ("structure_guidance",)),
        (params, "structure_guidance_video_url", "structure_guidance_frame_offset", ()),
        (params, "structure_motion_video_url", "structure_motion_frame_offset", ()),
    ):
        url = source.get(url_key)
        if url:
            if not isinstance(url, str):
                raise field_error((*prefix, url_key), "must be a video URL or path", url)
            offset = source.get(offset_key) or 0
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise field_error((*prefix, offset_key), f"must be an integer, got {offset!r}", offset)
            return url, offset, (*prefix, offset_key)
    return None, 0, ()


def parse_structure_guidance(params: dict[str, Any]) -> StructureGuidance | None:
    """Read structure guidance from task params in any of the original's forms, or None if there is none.

    Forms: ``structure_guidance: {videos, target, preprocessing, strength, canny_intensity,
    depth_contrast}``; ``structure_videos: [{path, start_frame, end_frame, treatment, source_start_frame,
    source_end_frame, structure_type?}]``; ``structure_video_path`` + ``structure_video_treatment``; with
    ``structure_type`` (or ``structure_video_type``), ``structure_video_motion_strength``,
    ``structure_canny_intensity``, ``structure_depth_contrast``. Uni3C guidance is refused (no Uni3C model
    here). ``depth`` is refused unless a depth model is installed. Errors name the key.
    """
    for key in _UNI3C_KEYS:
        if params.get(key):
            raise field_error(
                (key,),
                "Uni3C structure guidance is not available here (use structure_type "
                "raw, canny, flow or depth with a VACE model)",
                params[key],
            )

    precomputed, offset, offset_loc = _precomputed(params)
    if isinstance(params.get("structure_guidance"), dict):
        nested = params["structure_guidance"]
        prefix: tuple = ("structure_guidance",)
        if nested.get("target", "vace") != "vace":
            raise field_error((*prefix, "target"), "only 'vace' is available here", nested.get("target"))
        raw_videos = nested.get("videos") or []
        type_key, type_value = "preprocessing", nested.get("preprocessing", "flow")
        if type_value == "none":
            type_value = "raw"
        values = {name: _number(nested, name, (*prefix, name)) for name in _LEGACY_KEYS}
        videos_loc: tuple = (*prefix, "videos")
    else:
        prefix = ()
        type_key = "structure_type" if "structure_type" in params else "structure_video_type"
        type_value = params.get(type_key)
        if params.get("structure_videos"):
            raw_videos, videos_loc = params["structure_videos"], ("structure_videos",)
            if not isinstance(raw_videos, list):
                raise field_error(
                    videos_loc, "must be a list of {path, start_frame, end_frame, ...}", raw_videos
                )
            kinds = {v.get("structure_type", v.get("type")) for v in raw_videos if isinstance(v, dict)} - {
                None
            }
            if len(kinds) > 1:
                raise field_error(
                    videos_loc, f"all structure videos must have one structure_type, got {sorted(kinds)}"
                )
            if type_value is None and kinds:
                type_value, type_key = kinds.pop(), "structure_videos"
        elif params.get("structure_video_path"):
            videos_loc = ("structure_video_path",)
            raw_videos = [
                {
                    "path": params["structure_video_path"],
                    "treatment": params.get("structure_video_treatment", "adjust"),
                }
            ]
        else:
            raw_videos, videos_loc = [], ("structure_videos",)
            if precomputed is None:
                if type_value not in (None, ""):
                    raise field_error(
                        (type_key,), "needs structure_video_path or structure_videos", type_value
                    )
                return None
        values = {name: _number(params, key, (key,)) for name, key in _LEGACY_KEYS.items()}
    if type_value in (None, ""):
        type_value = "flow"  # the original's default preprocessing
    if type_value == "uni3c":
        raise field_error((*prefix, type_key), "Uni3C structure guidance is not available here", type_value)
    if type_value not in STRUCTURE_TYPES:
        raise field_error(
            (*prefix, type_key),
            f"must be one of {', '.join(STRUCTURE_TYPES)}, got {type_value!r}",
            type_value,
        )
    if type_value == "depth" and raw_videos and depth_model_dir() is None:
        raise field_error(
            (*prefix, type_key),
            f"structure_type 'depth' needs a depth model; none is installed (set {DEPTH_MODEL_ENV} to a "
            "local transformers depth-estimation model folder)",
            type_value,
        )
    if not raw_videos and precomputed is None:
        raise field_error(videos_loc, "is empty", raw_videos)
    single = videos_loc == ("structure_video_path",)
    videos = []
    for i, raw in enumerate(raw_videos):
        loc = videos_loc if single else (*videos_loc, i)
        if not isinstance(raw, dict):
            raise field_error(loc, "must be an object {path, start_frame, end_frame, treatment, ...}", raw)
        try:
            videos.append(StructureVideo.model_validate(raw))
        except ValidationError as error:
            first = error.errors()[0]
            if single:  # the one legacy video: blame the top-level key the value came from
                where = ("structure_video_treatment",) if first["loc"] == ("treatment",) else loc
            else:
                where = (*loc, *first["loc"])
            raise field_error(where, first["msg"], first.get("input")) from None
    ordered = sorted(range(len(videos)), key=lambda i: videos[i].start_frame)
    for previous, current in zip(ordered, ordered[1:], strict=False):
        end = videos[previous].end_frame
        if end is None or end > videos[current].start_frame:
            raise field_error(
                (*videos_loc, current, "start_frame"),
                f"range [{videos[current].start_frame}, ...) overlaps structure video {previous} "
                f"[{videos[previous].start_frame}, {end if end is not None else 'end'})",
                videos[current].start_frame,
            )
    if offset < 0:
        raise field_error(offset_loc, f"must be >= 0, got {offset}", offset)
    try:
        return StructureGuidance(
            structure_type=type_value,
            videos=videos,
            precomputed_video=None if videos else precomputed,  # the videos make the same control again
            precomputed_offset=offset,
            **values,
        )
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0])
        loc = (*prefix, name) if prefix else (_LEGACY_KEYS.get(name, name),)
        raise field_error(loc, first["msg"], first.get("input")) from None


# ---------------------------------------------------------------------------------------------------------
# Sampling a structure video onto a frame range
# ---------------------------------------------------------------------------------------------------------


def source_indices(
    source_count: int,
    needed: int,
    treatment: str,
    source_fps: float = 16.0,
    target_fps: float = 16.0,
    source_start: int = 0,
    source_end: int | None = None,
) -> list[int]:
    """Which source frames fill ``needed`` output frames, from [source_start, source_end) of the video.

    adjust: evenly spaced over the range, first and last included (frames repeat when stretching).
    clip: frame k is the first source frame at or after time k / target_fps (the source frame rate rounded,
    as the original reads it); when the range runs out the indices loop from its start.
    """
    if source_count < 1:
        raise ValueError("the structure video has no frames")
    if needed < 1:
        raise ValueError(f"needed must be >= 1, got {needed}")
    if source_start >= source_count:
        raise ValueError(f"source_start_frame {source_start} is past the video's {source_count} frames")
    end = source_count if source_end is None else min(source_end, source_count)
    available = end - source_start
    if treatment == "adjust":
        if needed == 1:
            return [source_start]
        return [source_start + (i * (available - 1)) // (needed - 1) for i in range(needed)]
    if treatment != "clip":
        raise ValueError(f"treatment must be 'adjust' or 'clip', got {treatment!r}")
    step = round(source_fps) / target_fps
    indices = []
    for k in range(needed):
        index = math.ceil(round(k * step, 5))
        if index >= available:
            break
        indices.append(index)
    while len(indices) < needed:  # loop back to the start of the range
        indices.extend(indices[: needed - len(indices)])
    return [source_start + i for i in indices]


@dataclass
class ControlVideo:
    """Control frames over the output timeline; ``covered[t]`` is True where a structure video guides t."""

    frames: np.ndarray
    covered: np.ndarray
    notes: list[str] = field(default_factory=list)


def build_control_video(
    guidance: StructureGuidance,
    total_frames: int,
    width: int,
    height: int,
    fps: float,
    load_video: VideoLoader,
    depth_estimator: DepthEstimator | None = None,
) -> ControlVideo:
    """Composite the structure videos of ``guidance`` into one control video of ``total_frames`` frames.

    ``load_video(path)`` returns (uint8 frames, fps) of a structure video (the caller resolves URLs).
    Each video is sampled (one extra frame, so flow has a motion for its last frame), centre-cropped and
    resized to width x height, preprocessed, and placed on its range; a range starting past the timeline is
    skipped and one ending past it is cut, both recorded in ``notes`` (the original does the same).
    """
    if guidance.structure_type == "depth" and guidance.videos and depth_estimator is None:
        depth_estimator = load_depth_estimator()
        if depth_estimator is None:
            raise field_error(
                ("structure_type",), "structure_type 'depth' needs a depth model; none is installed"
            )
    neutral = NEUTRAL_LEVEL[guidance.structure_type]
    frames = np.full((total_frames, height, width, 3), neutral, dtype=np.uint8)
    covered = np.zeros(total_frames, dtype=bool)
    notes: list[str] = []
    if guidance.precomputed_video is not None:
        source, _ = load_video(guidance.precomputed_video)
        taken = source[guidance.precomputed_offset : guidance.precomputed_offset + total_frames]
        if len(taken) < total_frames:
            notes.append(
                f"precomputed guidance video has {len(source)} frames: frames {len(taken)} to {total_frames - 1} "
                "after its offset are left neutral"
            )
        if len(taken):
            frames[: len(taken)] = fit_resolution(taken, width, height, "crop")
            covered[: len(taken)] = True
    for i, video in enumerate(guidance.videos):
        start = video.start_frame
        end = total_frames if video.end_frame is None else video.end_frame
        if start >= total_frames:
            notes.append(
                f"structure video {i} starts at frame {start}, past the {total_frames} frames: skipped"
            )
            continue
        if end > total_frames:
            notes.append(f"structure video {i} ends at frame {end}, cut to the {total_frames} frames")
            end = total_frames
        source, source_fps = load_video(video.path)
        try:
            indices = source_indices(
                len(source),
                end - start + 1,
                video.treatment,
                source_fps,
                fps,
                video.source_start_frame,
                video.source_end_frame,
            )
        except ValueError as error:
            raise field_error(
                ("structure_videos", i, "source_start_frame"), str(error), video.source_start_frame
            ) from None
        sampled = fit_resolution(source[indices], width, height, "crop")
        processed = preprocess(
            sampled,
            guidance.structure_type,
            guidance.strength,
            guidance.canny_intensity,
            guidance.depth_contrast,
            depth_estimator,
        )
        frames[start:end] = processed[: end - start]
        covered[start:end] = True
    return ControlVideo(frames=frames, covered=covered, notes=notes)


def apply_control(guide: np.ndarray, mask: np.ndarray, control: ControlVideo, offset: int = 0) -> np.ndarray:
    """A copy of ``guide`` whose fully generated frames (mask all 255) take the control frame at the same
    timeline position (``offset`` + index); kept frames (anchors, context) and uncovered frames stay."""
    if guide.shape[:3] != mask.shape[:3]:
        raise ValueError(f"guide {guide.shape} and mask {mask.shape} differ in frames or size")
    if control.frames.shape[1:3] != guide.shape[1:3]:
        raise ValueError(f"control frames are {control.frames.shape[1:3]}, the guide is {guide.shape[1:3]}")
    out = guide.copy()
    for t in range(len(guide)):
        position = offset + t
        if 0 <= position < len(control.frames) and control.covered[position] and (mask[t] == 255).all():
            out[t] = control.frames[position]
    return out
