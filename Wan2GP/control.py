"""VACE control preparation: the ``video_prompt_type`` letters, ``mask_expand`` and ``video_guide_outpainting``.

Wan2GP turns a client's guide video and mask video into VACE's control video and mask before generating.
This module does the same with the meanings Wan2GP gives the letters:

    guide process (the first of P E D S L C M U):  P pose, E canny edges, D depth, S scribble (shapes),
        L flow, C grey levels, M inpaint (the masked area becomes flat grey), U identity (keep every
        frame: the mask is all "keep"); none of them: the raw guide frames
    outside-mask process (one of Y W X):  Y depth, W scribble, X inpaint; when given, the area outside
        the mask is processed with it and the whole frame becomes "generate"
    V a guide video is used, A a mask video is used, I reference images are used (the engine's image_refs),
    N negate the mask, H replace the mask by its bounding box

Masks are thresholded at half level (white = generate), then grown (``mask_expand`` > 0: dilated three
times with an ellipse of that many pixels, Wan2GP's operation) or shrunk (< 0: eroded). The guide is
``where(mask, inside-processed, outside-processed)``. ``video_guide_outpainting`` ("top bottom left right"
percentages) shrinks the frame into the output canvas at Wan2GP's position and fills the border with the
inpaint grey; the border is always generated. Without a mask video, outpainting keeps the original area
(mask "keep" inside, "generate" on the border); that is what outpainting asks for (Wan2GP leaves the
unmasked guide as a control signal there).

Letters this engine cannot honour are refused: S and W (the scribble model is not available here),
P without a pose renderer, D and Y without a depth model. Letters that do not concern the control video
(G, K, F, T, Q, B, R and any other capital) are returned in ``ignored`` so the task result can say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from Wan2GP.field_errors import field_error
from Wan2GP.structure import DepthEstimator, canny_edges, depth_maps, flow_visualisation, gray_levels
from Wan2GP.video import fit_resolution

GUIDE_PROCESSES = {"P": "pose", "E": "canny", "D": "depth", "S": "scribble", "L": "flow", "C": "gray",
                   "M": "inpaint", "U": "identity"}  # fmt: skip
OUTSIDE_PROCESSES = {"Y": "depth", "W": "scribble", "X": "inpaint"}
FLAG_LETTERS = "VAINH"
INPAINT_GREY = 127
MASK_EXPAND_RANGE = (-100, 100)

PoseRenderer = Callable[[np.ndarray], np.ndarray]  # (T, H, W, 3) frames -> (T, H, W, 3) pose drawings


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------


def parse_outpainting(value: Any) -> tuple[int, int, int, int] | None:
    """``"top bottom left right"`` percentages (or a list of 4) -> a tuple; "", "0 0 0 0" or a value
    starting with "#" (Wan2GP's "switched off") -> None."""
    if value is None or value == "" or (isinstance(value, str) and value.startswith("#")):
        return None
    parts = value.split() if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        raise ValueError(f"must be 'top bottom left right' percentages like '0 0 20 20', got {value!r}")
    try:
        numbers = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"must be four whole percentages like '0 0 20 20', got {value!r}") from None
    if any(isinstance(p, bool) for p in parts) or not all(0 <= n <= 400 for n in numbers):
        raise ValueError(f"each percentage must be in [0, 400], got {value!r}")
    return None if numbers == (0, 0, 0, 0) else numbers  # type: ignore[return-value]


class VaceControlParams(BaseModel):
    """The control-preparation keys of a VACE task (the rest of the task is validated elsewhere)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    video_prompt_type: str = ""
    mask_expand: int = Field(0, ge=MASK_EXPAND_RANGE[0], le=MASK_EXPAND_RANGE[1])
    video_guide_outpainting: tuple[int, int, int, int] | None = None

    @field_validator("video_prompt_type", mode="before")
    @classmethod
    def _letters(cls, value: Any) -> str:
        if value is None:
            return ""
        if not isinstance(value, str) or not all("A" <= c <= "Z" or c.isdigit() for c in value):
            raise ValueError(f"must be a string of capital letters like 'VM', got {value!r}")
        return value

    @field_validator("video_guide_outpainting", mode="before")
    @classmethod
    def _outpainting(cls, value: Any) -> tuple[int, int, int, int] | None:
        return parse_outpainting(value)


@dataclass(frozen=True)
class PromptLetters:
    """What a ``video_prompt_type`` asks of the control preparation."""

    process: str  # "raw" when no guide-process letter is given
    outside: str | None
    negate: bool
    bounding_box: bool
    uses_guide: bool
    uses_mask: bool
    uses_refs: bool
    ignored: str  # letters with no meaning for the control video, in the order given


def read_letters(video_prompt_type: str) -> PromptLetters:
    """Split ``video_prompt_type`` into its meanings (the first guide-process letter wins, as in Wan2GP)."""
    processes = [GUIDE_PROCESSES[c] for c in video_prompt_type if c in GUIDE_PROCESSES]
    outside = [OUTSIDE_PROCESSES[c] for c in video_prompt_type if c in OUTSIDE_PROCESSES]
    known = set(GUIDE_PROCESSES) | set(OUTSIDE_PROCESSES) | set(FLAG_LETTERS)
    return PromptLetters(
        process=processes[0] if processes else "raw",
        outside=outside[0] if outside else None,
        negate="N" in video_prompt_type,
        bounding_box="H" in video_prompt_type,
        uses_guide="V" in video_prompt_type,
        uses_mask="A" in video_prompt_type,
        uses_refs="I" in video_prompt_type,
        ignored="".join(c for c in video_prompt_type if c not in known),
    )


# ---------------------------------------------------------------------------------------------------------
# Mask operations
# ---------------------------------------------------------------------------------------------------------


def binarise_mask(mask: np.ndarray) -> np.ndarray:
    """(T, H, W) or (T, H, W, 3) mask video -> uint8 (T, H, W) of 0 / 255 (above half level = generate)."""
    if mask.ndim == 4:
        mask = mask.max(axis=-1) if mask.shape[-1] == 3 else mask[..., 0]
    return np.where(mask > 127, 255, 0).astype(np.uint8)


def expand_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow (``pixels`` > 0) or shrink (< 0) the white area of a (T, H, W) 0/255 mask: Wan2GP's mask_expand,
    three passes of an ellipse ``|pixels|`` wide (so the edge moves by about 3 * (|pixels| // 2) pixels)."""
    if pixels == 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (abs(pixels), abs(pixels)))
    operation = cv2.dilate if pixels > 0 else cv2.erode
    return np.stack([operation(frame, kernel, iterations=3) for frame in mask])


def bounding_box_mask(mask: np.ndarray) -> np.ndarray:
    """Each frame's white area replaced by its bounding rectangle (Wan2GP's "H"); empty frames stay empty."""
    out = np.zeros_like(mask)
    for t, frame in enumerate(mask):
        rows, cols = np.nonzero(frame == 255)
        if len(rows):
            out[t, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = 255
    return out


# ---------------------------------------------------------------------------------------------------------
# Outpainting
# ---------------------------------------------------------------------------------------------------------


def outpaint_frame_location(
    canvas_height: int, canvas_width: int, dims: tuple[int, int, int, int]
) -> tuple[int, int, int, int]:
    """Where the original frame goes in the canvas: (height, width, top, left), Wan2GP's arithmetic.

    The frame is the canvas divided by (100 + top% + bottom%) / 100 (and likewise across); its margin on
    each side is proportional to that side's percentage, and sits flush when the far side's is 0.
    """
    top, bottom, left, right = dims
    height = int(canvas_height / ((100 + top + bottom) / 100))
    width = int(canvas_width / ((100 + left + right) / 100))
    margin_top = int(top / (100 + top + bottom) * canvas_height)
    if margin_top + height > canvas_height or bottom == 0:
        margin_top = canvas_height - height
    margin_left = int(left / (100 + left + right) * canvas_width)
    if margin_left + width > canvas_width or right == 0:
        margin_left = canvas_width - width
    return height, width, margin_top, margin_left


# ---------------------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PreparedControl:
    """The control video and mask handed to the VACE pipeline, and what the letters asked that was ignored."""

    guide: np.ndarray  # uint8 (T, H, W, 3)
    mask: np.ndarray | None  # uint8 (T, H, W), 255 = generate; None = generate everything
    process: str
    ignored: str = ""
    notes: list[str] = field(default_factory=list)


def _process(
    frames: np.ndarray,
    process: str,
    letter_loc: tuple,
    depth_estimator: DepthEstimator | None,
    pose_renderer: PoseRenderer | None,
    inpaint_grey: int,
) -> np.ndarray:
    if process in ("raw", "identity"):
        return frames
    if process == "inpaint":
        return np.full_like(frames, inpaint_grey)
    if process == "canny":
        return canny_edges(frames)
    if process == "flow":
        return flow_visualisation(frames)
    if process == "gray":
        return gray_levels(frames)
    if process == "depth":
        if depth_estimator is None:
            raise field_error(letter_loc, "depth (D / Y) needs a depth model; none is installed")
        return depth_maps(frames, depth_estimator)
    if process == "pose":
        if pose_renderer is None:
            raise field_error(letter_loc, "pose (P) needs a pose estimator; none was given to the engine")
        return pose_renderer(frames)
    raise field_error(letter_loc, f"{process} (S / W) needs the scribble model, which is not installed here")


def prepare_vace_control(
    guide: np.ndarray,
    mask: np.ndarray | None,
    width: int,
    height: int,
    params: VaceControlParams,
    depth_estimator: DepthEstimator | None = None,
    pose_renderer: PoseRenderer | None = None,
    inpaint_grey: int = INPAINT_GREY,
) -> PreparedControl:
    """Build VACE's control video and mask from a client's guide (T, H, W, 3) and optional mask video.

    Frames are resized to width x height (or to the inner area when outpainting), with the guide and mask
    cut to the shorter of the two. Errors name ``video_prompt_type`` when a letter cannot be honoured.
    """
    letters = read_letters(params.video_prompt_type)
    letter_loc = ("video_prompt_type",)
    notes = []
    if mask is not None and len(mask) != len(guide):
        notes.append(
            f"guide has {len(guide)} frames and mask {len(mask)}: both cut to {min(len(guide), len(mask))}"
        )
        count = min(len(guide), len(mask))
        guide, mask = guide[:count], mask[:count]

    dims = params.video_guide_outpainting
    if dims is not None:
        inner_h, inner_w, top, left = outpaint_frame_location(height, width, dims)
    else:
        inner_h, inner_w, top, left = height, width, 0, 0
    frames = (
        guide
        if guide.shape[1:3] == (inner_h, inner_w)
        else fit_resolution(guide, inner_w, inner_h, "stretch")
    )

    binary = None
    if mask is not None:
        as_rgb = mask if mask.ndim == 4 else np.repeat(mask[..., np.newaxis], 3, axis=-1)
        if as_rgb.shape[1:3] != (inner_h, inner_w):
            as_rgb = fit_resolution(as_rgb.astype(np.uint8), inner_w, inner_h, "stretch")
        binary = binarise_mask(as_rgb)
        original = binary.copy()
        binary = expand_mask(binary, params.mask_expand)
        if letters.bounding_box:
            binary = bounding_box_mask(binary)
        if letters.negate:
            binary = 255 - binary
            original = 255 - original
    elif params.mask_expand:
        notes.append("mask_expand has no effect without a video_mask")
    outside = letters.outside
    if letters.process == "identity":  # keep everything: the mask says "keep" on every pixel
        binary = np.zeros(frames.shape[:3], dtype=np.uint8)
        outside = None

    source = frames
    if letters.process == "pose" and mask is not None:
        source = np.where(original[..., np.newaxis] == 255, frames, 0).astype(
            np.uint8
        )  # pose of the masked area
    inside = _process(source, letters.process, letter_loc, depth_estimator, pose_renderer, inpaint_grey)
    if binary is not None:
        around = _process(frames, outside or "raw", letter_loc, depth_estimator, pose_renderer, inpaint_grey)
        control = np.where(binary[..., np.newaxis] == 255, inside, around).astype(np.uint8)
        if outside is not None:
            binary = np.full_like(binary, 255)  # the processed outside is a control signal: generate all
    else:
        control = inside

    if dims is not None:
        canvas = np.full((len(control), height, width, 3), inpaint_grey, dtype=np.uint8)
        canvas[:, top : top + inner_h, left : left + inner_w] = control
        full_mask = np.full((len(control), height, width), 255, dtype=np.uint8)
        full_mask[:, top : top + inner_h, left : left + inner_w] = 0 if binary is None else binary
        control, binary = canvas, full_mask
    return PreparedControl(
        guide=control, mask=binary, process=letters.process, ignored=letters.ignored, notes=notes
    )
