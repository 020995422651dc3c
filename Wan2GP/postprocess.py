"""Output post-processing of a generation, as Wan2GP's ``wgp.py`` runs it after decoding (Ray-free).

Three of the original's keys, applied in Wan2GP's order to the uint8 frames a replica hands back, on the
CPU stage that encodes them (``Wan2GP.artifact.encode_rendered``), so the GPU replica never spends time
on them:

    temporal_upsampling   "rife2" / "rife4": 2x / 4x the frames and the fps. Between each pair of frames
                          1 / 3 new ones are made, so T frames become (T - 1) * factor + 1 (Wan2GP's
                          ``process_frames``), and fps * factor. RIFE (``Wan2GP/rife.py``) when
                          ``flownet.pkl`` is installed (``$HWGP_ANNOTATORS_DIR``), else the weight-free DIS
                          flow interpolator (``dag/interpolate.py``); the result's ``interpolator`` says which.
    spatial_upsampling    "lanczos1.5" / "lanczos2": each frame resized with Lanczos to int(side * scale)
                          (Wan2GP's rounding: ``int(h * scale)``).
    film_grain_intensity  Wan2GP's ``add_film_grain`` with ``film_grain_saturation`` (default 0.5): gaussian
                          grain, red x2 and blue x3, mixed with the green channel's by 1 - saturation, added
                          at ``intensity`` to the [0, 1] image and clipped. Seeded from the task's seed (the
                          seed the engine used), so the output is reproducible.

"" (or None) turns each off, as in Wan2GP.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from Wan2GP.artifact import Artifact, Rendered

SPATIAL_SCALES: dict[str, float] = {"lanczos1.5": 1.5, "lanczos2": 2.0}
TEMPORAL_FACTORS: dict[str, int] = {"rife2": 2, "rife4": 4}
DEFAULT_GRAIN_SATURATION = 0.5  # Wan2GP's default
POSTPROCESS_KEYS = (
    "temporal_upsampling",
    "spatial_upsampling",
    "film_grain_intensity",
    "film_grain_saturation",
)


def check_choice(key: str, value: Any, choices: Mapping[str, Any]) -> str:
    """``value`` of ``key`` as one of ``choices`` or "" (off; None too). ValueError names the key."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f'{key}: must be one of {allowed} or "" (off), got {value!r}')
    return value


def check_fraction(key: str, value: Any, default: float) -> float:
    """A number in [0, 1] (None -> ``default``). ValueError names the key."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{key}: must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PostProcess:
    """What a task asks to be done to its output frames (all off by default)."""

    temporal_upsampling: str = ""
    spatial_upsampling: str = ""
    film_grain_intensity: float = 0.0
    film_grain_saturation: float = DEFAULT_GRAIN_SATURATION

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PostProcess:
        """The request in a task's params; ValueError naming the key for a bad value."""
        return cls(
            temporal_upsampling=check_choice(
                "temporal_upsampling", params.get("temporal_upsampling"), TEMPORAL_FACTORS
            ),
            spatial_upsampling=check_choice(
                "spatial_upsampling", params.get("spatial_upsampling"), SPATIAL_SCALES
            ),
            film_grain_intensity=check_fraction(
                "film_grain_intensity", params.get("film_grain_intensity"), 0.0
            ),
            film_grain_saturation=check_fraction(
                "film_grain_saturation", params.get("film_grain_saturation"), DEFAULT_GRAIN_SATURATION
            ),
        )

    @property
    def active(self) -> bool:
        return bool(self.temporal_upsampling or self.spatial_upsampling or self.film_grain_intensity > 0)

    @property
    def frame_factor(self) -> int:
        return TEMPORAL_FACTORS.get(self.temporal_upsampling, 1)

    @property
    def scale(self) -> float:
        return SPATIAL_SCALES.get(self.spatial_upsampling, 1.0)

    def output_frames(self, frames: int) -> int:
        """Frames after temporal upsampling: (T - 1) * factor + 1, as Wan2GP's RIFE loop makes them."""
        return (frames - 1) * self.frame_factor + 1 if frames > 1 else frames

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after spatial upsampling, rounded down as Wan2GP does (``int(side * scale)``)."""
        return int(width * self.scale), int(height * self.scale)

    def describe(self) -> dict[str, Any]:
        """The request as the task's result reports it."""
        return {
            "temporal_upsampling": self.temporal_upsampling,
            "spatial_upsampling": self.spatial_upsampling,
            "film_grain_intensity": self.film_grain_intensity,
            "film_grain_saturation": self.film_grain_saturation,
        }


# ---------------------------------------------------------------------------------------------------------
# The transforms: uint8 (T, H, W, 3) RGB in, uint8 out
# ---------------------------------------------------------------------------------------------------------


def temporal_upsample(frames: np.ndarray, factor: int) -> tuple[np.ndarray, str]:
    """(T - 1) * factor + 1 frames: each original frame kept, factor - 1 made between each pair. Returns the
    frames and the interpolator that made them ("rife" with ``flownet.pkl`` installed, else "dis_flow")."""
    from dag.interpolate import DIS_FLOW, RIFE, dis_flow_interpolate
    from Wan2GP.annotators import RIFE_FILE, annotator_file

    weights = annotator_file(RIFE_FILE)
    if weights is not None:
        from Wan2GP.rife import load_rife  # torch only when the weights are there

        rife = load_rife(weights)
        between, name = (lambda a, b: rife(a, b, factor + 1)[0]), RIFE
    else:
        between, name = (lambda a, b: dis_flow_interpolate(a, b, factor + 1)), DIS_FLOW
    if factor <= 1 or len(frames) < 2:
        return frames, name
    out = np.empty(((len(frames) - 1) * factor + 1, *frames.shape[1:]), dtype=np.uint8)
    for i in range(len(frames) - 1):
        out[i * factor : (i + 1) * factor] = between(frames[i], frames[i + 1])[:-1]
    out[-1] = frames[-1]
    return out, name


def spatial_upsample(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Each frame resized to ``width`` x ``height`` with Lanczos (PIL's, as Wan2GP's ``resize_lanczos``)."""
    from PIL import Image

    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.Resampling.LANCZOS))
    return out


def add_film_grain(frames: np.ndarray, intensity: float, saturation: float, seed: int) -> np.ndarray:
    """Wan2GP's film grain on uint8 frames, reproducible for one ``seed``.

    On the image in [0, 1]: grain ~ N(0, 1) per pixel and channel, red x2, blue x3; mixed with the green
    channel's grain as grain * saturation + green * (1 - saturation); image + intensity * grain, clipped."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):  # one frame at a time: float copies of the whole video are large
        grain = rng.standard_normal(frame.shape, dtype=np.float32)
        grain[..., 0] *= 2.0
        grain[..., 2] *= 3.0
        grain = grain * saturation + grain[..., 1:2] * (1.0 - saturation)
        noised = frame.astype(np.float32) / 255.0 + intensity * grain
        out[i] = np.rint(np.clip(noised, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def apply_postprocess(rendered: Rendered, post: PostProcess) -> Rendered:
    """``rendered`` with ``post`` applied (temporal, then spatial, then grain, Wan2GP's order). Its metadata
    gains the output's ``frames`` / ``fps`` / ``width`` / ``height``, ``interpolator`` (with temporal
    upsampling), ``postprocess`` (the request and the generated size) and ``timings["postprocess"]``."""
    from Wan2GP.artifact import Rendered

    if not post.active:
        return rendered
    start = time.perf_counter()
    frames, fps = rendered.frames, rendered.fps
    generated = {
        "frames": int(len(frames)),
        "fps": fps,
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
    }
    metadata = dict(rendered.metadata)
    report: dict[str, Any] = {**post.describe(), "generated": generated}
    if post.temporal_upsampling:
        if len(frames) > 1:
            frames, metadata["interpolator"] = temporal_upsample(frames, post.frame_factor)
            fps = fps * post.frame_factor  # Wan2GP: fps * 2**exp, the duration is kept
        else:
            report["temporal_upsampling_skipped"] = "one frame: nothing to interpolate between"
    if post.spatial_upsampling:
        width, height = post.output_size(frames.shape[2], frames.shape[1])
        frames = spatial_upsample(frames, width, height)
    if post.film_grain_intensity > 0:
        seed = int(metadata.get("seed", 0) or 0)
        frames = add_film_grain(frames, post.film_grain_intensity, post.film_grain_saturation, seed)
        report["film_grain_seed"] = seed
    metadata.update(
        frames=int(len(frames)),
        fps=fps,
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        postprocess=report,
    )
    metadata["timings"] = {
        **metadata.get("timings", {}),
        "postprocess": round(time.perf_counter() - start, 4),
    }
    return Rendered(frames, fps, rendered.stem, metadata)


def rendered_from_artifact(artifact: Artifact) -> Rendered:
    """An encoded video back to frames (a multi-GPU replica encodes itself), to post-process it."""
    from pathlib import PurePath

    from Wan2GP.artifact import Rendered
    from Wan2GP.video import decode_video, load_image

    if artifact.media_type == "image/png":
        frames = load_image(artifact.data)[None]
        fps = 1
    else:
        frames, rate = decode_video(artifact.data)
        fps = int(artifact.metadata.get("fps") or round(rate))
    return Rendered(frames, fps, PurePath(artifact.filename).stem, dict(artifact.metadata))
