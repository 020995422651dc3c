"""Pose skeletons: a pose estimator (OpenPose when its weights are installed, else a silhouette heuristic),
an OpenPose-style renderer, pose guides.

Poses are float arrays of shape (18, 3) in the OpenPose COCO-18 order (``KEYPOINTS``): x and y normalised
to [0, 1] of the image width and height, and a confidence in [0, 1] (0 = keypoint missing). "Right" is the
person's right, which is the image's left for a person facing the camera, as in OpenPose.

Which estimator runs (``pose_estimator()``): the OpenPose body model (``Wan2GP/openpose.py``) when
``body_pose_model.pth`` is in ``$HWGP_ANNOTATORS_DIR`` (``Wan2GP/annotators.py``); otherwise the weight-free
``silhouette_pose``, which estimates keypoints from the person's silhouette against a plain background
(body proportions, arm and leg extremities): reliable for a single full-body figure on a uniform background
and coarse otherwise. Results name the estimator that ran ("openpose" or "silhouette_heuristic"). The
renderer and the pose guides do not depend on either and take landmarks from any source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from Wan2GP.annotators import OPENPOSE_FILE, annotator_file
from Wan2GP.video import decode_video, load_image, to_uint8_frames

KEYPOINTS = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
# OpenPose's limb list (0-based) and its colour per limb (RGB).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
_MIRROR = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)  # left <-> right keypoints
SILHOUETTE = "silhouette_heuristic"
OPENPOSE = "openpose"


def _check_pose(pose: Any, name: str = "pose") -> np.ndarray:
    array = np.asarray(pose, dtype=np.float64) if pose is not None else None
    if array is None or array.shape != (len(KEYPOINTS), 3) or not np.all(np.isfinite(array)):
        shape = None if array is None else array.shape
        raise ValueError(
            f"{name} must be a finite ({len(KEYPOINTS)}, 3) array of x, y, confidence; got {shape}"
        )
    return array


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def render_pose(pose: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """Draw an OpenPose-style skeleton (coloured limbs and joints on black) as uint8 (H, W, 3) RGB.

    ``None`` (no person) gives a black frame. Limbs whose two keypoints are both present are drawn.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if isinstance(height, bool) or not isinstance(height, int) or height < 1:
        raise ValueError(f"height must be a positive integer, got {height!r}")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if pose is None:
        return canvas
    pose = _check_pose(pose)
    points = pose[:, :2] * (width, height)
    present = pose[:, 2] > 0
    stick = max(1, round(min(width, height) / 128))  # OpenPose draws 4 px at 512
    for (a, b), colour in zip(LIMBS, COLOURS, strict=False):
        if not (present[a] and present[b]):
            continue
        (xa, ya), (xb, yb) = points[a], points[b]
        length = math.hypot(xb - xa, yb - ya) / 2
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        centre = (round((xa + xb) / 2), round((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(centre, (max(1, round(length)), stick * 2), round(angle), 0, 360, 1)
        limb = canvas.copy()
        cv2.fillConvexPoly(limb, polygon, tuple(int(c * 0.6) for c in colour))
        canvas = np.maximum(canvas, limb)
    for index in np.flatnonzero(present):
        x, y = points[index]
        cv2.circle(canvas, (round(x), round(y)), stick * 2, COLOURS[index], thickness=-1)
    return canvas


# ---------------------------------------------------------------------------------------------------------
# Detection (silhouette heuristic)
# ---------------------------------------------------------------------------------------------------------


def _silhouette(image: np.ndarray, threshold: int) -> np.ndarray | None:
    """The largest region that differs from the border colour, or None when there is none of note."""
    height, width = image.shape[:2]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.int16)
    background = np.median(border, axis=0)
    difference = np.abs(image.astype(np.int16) - background).max(axis=-1)
    mask = (difference > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    # Label a dilated copy, so a head or limb separated by a thin gap joins the body.
    reach = max(3, round(0.03 * min(height, width))) | 1
    joined = cv2.dilate(mask, np.ones((reach, reach), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    figure = (labels == largest) & (mask > 0)
    ys = np.flatnonzero(figure.any(axis=1))
    if figure.sum() < 0.002 * height * width or ys[-1] - ys[0] + 1 < 0.15 * height:
        return None
    return figure


def silhouette_pose(image: np.ndarray, threshold: int = 40) -> np.ndarray | None:
    """Estimate an 18-keypoint pose from a single upright full-body figure on a plain background.

    Returns None when no figure stands out from the border colour by more than ``threshold`` (0-255).
    Keypoints come from body proportions within the silhouette's bounding box, the silhouette's extreme
    points for the wrists and ankles, and joint midpoints for elbows and knees; confidences say which
    were seen (1.0), inferred (0.5) or guessed (0.3).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError("image must be an (H, W, 3) array")
    image = to_uint8_frames(image)[0]
    mask = _silhouette(image, threshold)
    if mask is None:
        return None
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    top, bottom = ys.min(), ys.max()
    tall = bottom - top + 1

    def band(start: float, stop: float) -> np.ndarray:
        rows = (ys >= top + start * tall) & (ys <= top + stop * tall)
        return np.flatnonzero(rows)

    torso = band(0.2, 0.5)
    cx = float(np.median(xs[torso])) if len(torso) else float(np.median(xs))
    head = band(0.0, 0.13)
    pose = np.zeros((len(KEYPOINTS), 3))

    def put(name: str, x: float, y: float, confidence: float) -> None:
        pose[KEYPOINTS.index(name)] = (x / width, y / height, confidence)

    nose_x, nose_y = float(xs[head].mean()), float(ys[head].mean())
    put("nose", nose_x, nose_y, 1.0)
    for side, sign in (("right", -1), ("left", 1)):
        put(f"{side}_eye", nose_x + sign * 0.025 * tall, nose_y - 0.015 * tall, 0.5)
        put(f"{side}_ear", nose_x + sign * 0.05 * tall, nose_y - 0.005 * tall, 0.3)
    neck_y = top + 0.18 * tall
    put("neck", cx, neck_y, 1.0)

    arms = band(0.12, 0.65)
    legs = band(0.8, 1.0)
    for side, sign in (("right", -1), ("left", 1)):
        shoulder = (cx + sign * 0.1 * tall, top + 0.2 * tall)
        hip = (cx + sign * 0.06 * tall, top + 0.5 * tall)
        put(f"{side}_shoulder", *shoulder, 0.5)
        put(f"{side}_hip", *hip, 0.5)
        # The wrist: the arm-band pixel farthest from the shoulder, beyond the shoulder's width.
        outside = arms[(xs[arms] - shoulder[0]) * sign > 0]
        if len(outside):
            distance = np.hypot(xs[outside] - shoulder[0], ys[outside] - shoulder[1])
            far = outside[int(np.argmax(distance))]
            wrist, confidence = (float(xs[far]), float(ys[far])), 1.0
        else:  # arms along the body: hanging down to the hips
            wrist, confidence = (cx + sign * 0.12 * tall, top + 0.48 * tall), 0.3
        put(f"{side}_wrist", *wrist, confidence)
        put(f"{side}_elbow", (shoulder[0] + wrist[0]) / 2, (shoulder[1] + wrist[1]) / 2, 0.5)
        # The ankle: the lowest pixels on this side of the body's centre line.
        foot = legs[(xs[legs] - cx) * sign > 0]
        if len(foot):
            lowest = foot[ys[foot] >= ys[foot].max() - 0.02 * tall]
            ankle, confidence = (float(xs[lowest].mean()), float(ys[lowest].mean())), 1.0
        else:
            ankle, confidence = (cx + sign * 0.04 * tall, float(bottom)), 0.3
        put(f"{side}_ankle", *ankle, confidence)
        put(f"{side}_knee", (hip[0] + ankle[0]) / 2, (hip[1] + ankle[1]) / 2, 0.5)
    return pose


# ---------------------------------------------------------------------------------------------------------
# The estimator that runs: OpenPose when installed, the silhouette heuristic otherwise
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoseEstimator:
    """A named pose estimator: ``detect(image)`` -> every person found in a uint8 (H, W, 3) RGB image."""

    name: str
    detect: Callable[[np.ndarray], list[np.ndarray]]


def _silhouette_people(image: np.ndarray) -> list[np.ndarray]:
    pose = silhouette_pose(image)
    return [] if pose is None else [pose]


def pose_estimator_name() -> str:
    """The name of the estimator ``pose_estimator()`` gives, without loading it."""
    return SILHOUETTE if annotator_file(OPENPOSE_FILE) is None else OPENPOSE


def pose_estimator() -> PoseEstimator:
    """OpenPose when ``body_pose_model.pth`` is in the annotators folder (loaded once per process), else the
    silhouette heuristic."""
    weights = annotator_file(OPENPOSE_FILE)
    if weights is None:
        return PoseEstimator(SILHOUETTE, _silhouette_people)
    from Wan2GP.openpose import load_openpose  # torch only when the weights are there

    return PoseEstimator(OPENPOSE, load_openpose(weights))


def detect_poses(image: np.ndarray, estimator: PoseEstimator | None = None) -> list[np.ndarray]:
    """Every person in ``image`` (most confident first) by ``estimator`` (default: ``pose_estimator()``)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError("image must be an (H, W, 3) array")
    estimator = estimator or pose_estimator()
    return estimator.detect(to_uint8_frames(image)[0])


def detect_pose(image: np.ndarray, estimator: PoseEstimator | None = None) -> np.ndarray | None:
    """The main (most confident) person's pose, or None when nobody is found."""
    people = detect_poses(image, estimator)
    return people[0] if people else None


def render_people(poses: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Every pose drawn on one black frame (``render_pose`` of each, overlaid)."""
    canvas = render_pose(None, width, height)
    for pose in poses:
        canvas = np.maximum(canvas, render_pose(pose, width, height))
    return canvas


# ---------------------------------------------------------------------------------------------------------
# Pose videos
# ---------------------------------------------------------------------------------------------------------


def _media(source: Any, name: str) -> tuple[np.ndarray, float | None]:
    """An image or a video (bytes, path, (H, W, 3) or (T, H, W, 3) array) -> frames and fps (None for images)."""
    if isinstance(source, np.ndarray):
        if source.ndim == 3:
            return to_uint8_frames(source), None
        if source.ndim == 4:
            return to_uint8_frames(source), None
        raise ValueError(
            f"{name} must be an (H, W, 3) image or (T, H, W, 3) frames, got shape {source.shape}"
        )
    if source is None or (isinstance(source, str | bytes) and len(source) == 0):
        raise ValueError(f"{name} is required (an image or a video)")
    try:
        image = load_image(source)
    except FileNotFoundError as error:
        raise ValueError(f"{name}: {error}") from None
    except ValueError:
        image = None  # not an image: try it as a video
    if image is not None:
        return image[np.newaxis], None
    try:
        frames, fps = decode_video(source)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{name} is neither a decodable image nor a video: {error}") from None
    return frames, fps


def generate_openpose(
    source: Any, fps: int = 16, estimator: PoseEstimator | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Pose skeleton video of an input video or image: one OpenPose-style frame per input frame, every
    person found drawn (``estimator``, default ``pose_estimator()``).

    Frames where nobody is found are black. Returns (uint8 (T, H, W, 3) frames at the input's size,
    metadata with frames, fps, width, height, frames_with_pose and ``pose_estimator``, the estimator that
    ran). An image gives one frame; ``fps`` applies when the source has none (images, arrays).
    """
    frames, source_fps = _media(source, "source")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    estimator = estimator or pose_estimator()
    height, width = frames.shape[1:3]
    people = [estimator.detect(frame) for frame in frames]
    out = np.stack([render_people(poses, width, height) for poses in people])
    metadata = {
        "frames": len(out),
        "fps": source_fps or fps,
        "width": width,
        "height": height,
        "frames_with_pose": sum(bool(poses) for poses in people),
        "pose_estimator": estimator.name,
    }
    return out, metadata


def mirror_pose(pose: np.ndarray) -> np.ndarray:
    """The pose seen in a mirror: x flipped and left/right keypoints swapped (so limbs keep their colours)."""
    pose = _check_pose(pose)
    out = pose[list(_MIRROR)].copy()
    out[:, 0] = np.where(out[:, 2] > 0, 1.0 - out[:, 0], out[:, 0])
    return out


def rotate_pose(pose: np.ndarray, degrees: float, aspect: float = 1.0) -> np.ndarray:
    """Rotate the pose by ``degrees`` (clockwise on screen) around its neck; ``aspect`` = width / height."""
    pose = _check_pose(pose)
    if not aspect > 0:
        raise ValueError(f"aspect must be > 0, got {aspect!r}")
    centre = pose[KEYPOINTS.index("neck"), :2] if pose[1, 2] > 0 else pose[pose[:, 2] > 0, :2].mean(axis=0)
    angle = math.radians(degrees)
    # Rotate in pixel proportions, so a square stays square on a non-square frame.
    dx = (pose[:, 0] - centre[0]) * aspect
    dy = pose[:, 1] - centre[1]
    out = pose.copy()
    out[:, 0] = centre[0] + (dx * math.cos(angle) - dy * math.sin(angle)) / aspect
    out[:, 1] = centre[1] + dx * math.sin(angle) + dy * math.cos(angle)
    return out


def yaw_pose(pose: np.ndarray, degrees: float) -> np.ndarray:
    """The pose turned about the vertical axis through its neck (orthographic): widths shrink by cos(angle);
    past 90 degrees the person faces away, so left and right swap sides."""
    pose = _check_pose(pose)
    centre = pose[1, 0] if pose[1, 2] > 0 else pose[pose[:, 2] > 0, 0].mean()
    out = pose.copy()
    out[:, 0] = centre + (pose[:, 0] - centre) * math.cos(math.radians(degrees))
    return out


def pose_guide_video(
    source_landmarks: np.ndarray, target_landmarks: np.ndarray, frames: int, width: int, height: int
) -> np.ndarray:
    """An OpenPose guide video moving linearly from the source pose (frame 0) to the target (last frame).

    Keypoints missing in either pose are left out of every frame. Returns uint8 (frames, H, W, 3).
    """
    source = _check_pose(source_landmarks, "source_landmarks")
    target = _check_pose(target_landmarks, "target_landmarks")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive integer, got {frames!r}")
    blank = render_pose(None, width, height)  # validates width and height
    both = (source[:, 2] > 0) & (target[:, 2] > 0)
    out = np.empty((frames, *blank.shape), dtype=np.uint8)
    for i in range(frames):
        t = i / (frames - 1) if frames > 1 else 1.0
        pose = (1 - t) * source + t * target
        pose[:, 2] = np.where(both, 1.0, 0.0)
        out[i] = render_pose(pose, width, height)
    return out
