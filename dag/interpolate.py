"""Frame interpolation between two images: RIFE when its weights are installed, else DIS optical flow.

``rife_interpolate_images`` keeps the original task's name. With ``flownet.pkl`` in ``$HWGP_ANNOTATORS_DIR``
(``Wan2GP/annotators.py``) the RIFE IFNet of ``Wan2GP/rife.py`` makes the frames; without it a weight-free
interpolator does (OpenCV DIS flow computed both ways, each image warped to the frame's time, blended).
The output metadata's ``interpolator`` says which ran: "rife" or "dis_flow".
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from Wan2GP.annotators import RIFE_FILE, annotator_file
from Wan2GP.video import fit_resolution, load_image, to_uint8_frames

DIS_FLOW = "dis_flow"
RIFE = "rife"
MAX_INTERPOLATED_FRAMES = 1025


def _image(value: Any, name: str) -> np.ndarray:
    """A path, bytes or (H, W, 3) array -> uint8 (H, W, 3); errors name ``name``."""
    if value is None or (isinstance(value, str | bytes) and len(value) == 0):
        raise ValueError(f"{name} is required (an image path, bytes or array)")
    if isinstance(value, np.ndarray):
        if value.ndim != 3:
            raise ValueError(f"{name} must be an (H, W, 3) image, got shape {value.shape}")
        return to_uint8_frames(value)[0]
    try:
        return load_image(value)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{name}: {error}") from None


def _flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) such that source(x) moves to target(x + flow(x))."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    grey_source = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
    grey_target = cv2.cvtColor(target, cv2.COLOR_RGB2GRAY)
    return dis.calc(grey_source, grey_target, None)


def _warp(image: np.ndarray, flow: np.ndarray, scale: float) -> np.ndarray:
    """Sample ``image`` at x + scale * flow(x) (backward warping), as float32."""
    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x = grid_x + scale * flow[..., 0]
    map_y = grid_y + scale * flow[..., 1]
    return cv2.remap(
        image.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def dis_flow_interpolate(first: np.ndarray, second: np.ndarray, frames: int) -> np.ndarray:
    """The weight-free interpolator: frame i at time t = i / (frames - 1) blends both images warped to t.

    The flow at time t is approximated from the flows between the images computed both ways (DIS), image1
    is sampled at x + t * flow(2->1)(x) and image2 at x + (1 - t) * flow(1->2)(x), and the two are mixed
    with weights 1 - t and t. Both images are uint8 (H, W, 3) of one size; the ends are exact.
    """
    # With linear motion d, a point at x at time t was at x - t*d in image1 and is at x + (1 - t)*d in
    # image2. flow(2->1) ~ -d and flow(1->2) ~ d near moving content, so both images can be sampled at x.
    forward = _flow(first, second)
    backward = _flow(second, first)
    out = np.empty((frames, *first.shape), dtype=np.uint8)
    out[0], out[-1] = first, second
    for i in range(1, frames - 1):
        t = i / (frames - 1)
        from_first = _warp(first, backward, t)
        from_second = _warp(second, forward, 1.0 - t)
        mixed = (1.0 - t) * from_first + t * from_second
        out[i] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def rife_interpolate_images(
    image1: Any, image2: Any, frames: int, resolution: tuple[int, int] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """``frames`` frames going from ``image1`` (first frame, exact) to ``image2`` (last frame, exact).

    With RIFE installed, frame i is RIFE's frame at the time k / 2^d nearest i / (frames - 1) (the network
    predicts midpoints; exact when frames - 1 is a power of two) and the metadata lists those ``times``;
    otherwise ``dis_flow_interpolate`` makes frame i at exactly i / (frames - 1). ``resolution`` (width,
    height) resizes both images first (centre crop); otherwise image2 is fitted to image1's size. Returns
    (uint8 (frames, H, W, 3), metadata naming the ``interpolator`` that ran).
    """
    first = _image(image1, "image1")
    second = _image(image2, "image2")
    if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= MAX_INTERPOLATED_FRAMES:
        raise ValueError(
            f"frames must be an integer in [2, {MAX_INTERPOLATED_FRAMES}] (both images included), got {frames!r}"
        )
    if resolution is not None:
        if not (isinstance(resolution, list | tuple) and len(resolution) == 2):
            raise ValueError(f"resolution must be (width, height), got {resolution!r}")
        width, height = resolution
        first = fit_resolution(first, width, height, "crop")
        second = fit_resolution(second, width, height, "crop")
    elif second.shape != first.shape:
        second = fit_resolution(second, first.shape[1], first.shape[0], "crop")

    weights = annotator_file(RIFE_FILE)
    if weights is None:
        out = dis_flow_interpolate(first, second, frames)
        extra: dict[str, Any] = {"interpolator": DIS_FLOW}
    else:
        from Wan2GP.rife import load_rife  # torch only when the weights are there

        out, times = load_rife(weights)(first, second, frames)
        extra = {"interpolator": RIFE, "times": [round(t, 6) for t in times]}
    metadata = {
        **extra,
        "frames": frames,
        "width": int(first.shape[1]),
        "height": int(first.shape[0]),
    }
    return out, metadata
