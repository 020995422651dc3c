"""Utility task functions: pose skeletons, pose guides, DIS-flow interpolation, frame extraction, joining.

These run the weight-free estimators (no annotators folder); tests/test_annotators.py runs OpenPose and RIFE."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from dag.pose import COLOURS, KEYPOINTS, detect_pose, render_pose, silhouette_pose
from dag.utilities import (
    extract_frame,
    extract_frame_array,
    generate_openpose,
    join_clips,
    mirror_pose,
    pose_guide_video,
    rife_interpolate_images,
    rotate_pose,
    yaw_pose,
)
from Wan2GP.annotators import ANNOTATORS_ENV
from Wan2GP.video import encode_mp4, encode_png

SIZE = 128


@pytest.fixture(autouse=True)
def weight_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """No annotators folder: the weight-free estimator and interpolator run, whatever the developer's setting."""
    monkeypatch.delenv(ANNOTATORS_ENV, raising=False)


def figure(arms: str = "out", offset: int = 0) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """A drawn full-body figure (light on a plain blue-grey background) and where its joints are."""
    image = np.full((SIZE, SIZE, 3), (90, 110, 130), np.uint8)
    fg = (240, 230, 220)
    x = 64 + offset
    joints = {
        "head": (x, 20),
        "hip": (x, 70),
        "left_hand": (x + 36, 35),
        "right_hand": (x - 36, 35),
        "left_foot": (x + 16, 114),
        "right_foot": (x - 16, 114),
    }
    if arms == "down":
        joints["left_hand"], joints["right_hand"] = (x + 11, 65), (x - 11, 65)
    cv2.circle(image, joints["head"], 8, fg, -1)
    cv2.line(image, (x, 31), joints["hip"], fg, 6)
    for hand in ("left_hand", "right_hand"):
        cv2.line(image, (x, 35), joints[hand], fg, 4)
    for foot in ("left_foot", "right_foot"):
        cv2.line(image, joints["hip"], joints[foot], fg, 5)
    return image, joints


def point(pose: np.ndarray, name: str) -> np.ndarray:
    return pose[KEYPOINTS.index(name), :2] * SIZE


def standing_pose() -> np.ndarray:
    pose = detect_pose(figure()[0])
    assert pose is not None
    return pose


# ---------------------------------------------------------------------------------------------------------
# Pose rendering and detection
# ---------------------------------------------------------------------------------------------------------


def test_render_draws_limbs_in_openpose_colours_on_black():
    pose = np.zeros((18, 3))
    pose[KEYPOINTS.index("neck")] = (0.5, 0.25, 1.0)
    pose[KEYPOINTS.index("right_shoulder")] = (0.25, 0.25, 1.0)
    pose[KEYPOINTS.index("left_wrist")] = (0.9, 0.9, 1.0)  # its elbow is missing: no limb drawn to it
    frame = render_pose(pose, 200, 100)
    assert frame.shape == (100, 200, 3) and frame.dtype == np.uint8
    # the neck-right shoulder limb (OpenPose's first limb) at its middle, in 60% of its colour
    assert tuple(frame[25, 75]) == tuple(int(c * 0.6) for c in COLOURS[0])
    # joints in their own colours
    assert tuple(frame[25, 100]) == COLOURS[KEYPOINTS.index("neck")]
    assert tuple(frame[90, 180]) == COLOURS[KEYPOINTS.index("left_wrist")]
    # nothing between the wrist and the rest, and black elsewhere
    assert not frame[60, 150].any() and not frame[5, 5].any()
    assert not render_pose(None, 64, 48).any()


def test_detects_a_drawn_figure():
    for arms in ("out", "down"):
        image, joints = figure(arms)
        pose = silhouette_pose(image)
        assert pose is not None
        np.testing.assert_allclose(point(pose, "nose"), joints["head"], atol=4)
        # the person's right is the image's left
        np.testing.assert_allclose(point(pose, "right_wrist"), joints["right_hand"], atol=5)
        np.testing.assert_allclose(point(pose, "left_wrist"), joints["left_hand"], atol=5)
        np.testing.assert_allclose(point(pose, "right_ankle"), joints["right_foot"], atol=5)
        np.testing.assert_allclose(point(pose, "left_ankle"), joints["left_foot"], atol=5)


def test_no_figure_gives_no_pose():
    assert silhouette_pose(np.full((SIZE, SIZE, 3), 100, np.uint8)) is None
    speckle = np.full((SIZE, SIZE, 3), 100, np.uint8)
    speckle[10:12, 10:12] = 255
    assert silhouette_pose(speckle) is None
    assert detect_pose(speckle) is None  # the estimator that runs without weights


def test_generate_openpose_from_an_image_file(tmp_path):
    path = tmp_path / "person.png"
    path.write_bytes(encode_png(figure()[0]))
    frames, meta = generate_openpose(str(path))
    assert frames.shape == (1, SIZE, SIZE, 3)
    assert (
        meta["frames"] == 1
        and meta["frames_with_pose"] == 1
        and meta["pose_estimator"] == "silhouette_heuristic"
    )
    np.testing.assert_array_equal(frames[0], render_pose(standing_pose(), SIZE, SIZE))


def test_generate_openpose_from_a_video_blacks_out_empty_frames():
    empty = np.full((SIZE, SIZE, 3), (90, 110, 130), np.uint8)
    clip = np.stack([figure(offset=o)[0] for o in (-8, 0, 8)] + [empty, empty])
    frames, meta = generate_openpose(encode_mp4(clip, fps=8, crf=10))
    assert frames.shape == (5, SIZE, SIZE, 3)
    assert meta["frames_with_pose"] == 3 and meta["fps"] == 8
    assert all(frames[i].any() for i in range(3))
    assert not frames[3:].any()
    # the skeleton follows the figure: its neck's colour moves right with the figure
    neck_colour = np.array(COLOURS[KEYPOINTS.index("neck")])
    columns = [np.nonzero(np.all(frames[i] == neck_colour, axis=-1))[1].mean() for i in range(3)]
    assert columns[0] < columns[1] < columns[2]


@pytest.mark.parametrize(
    ("source", "message"),
    [(None, "source is required"), ("/no/such/file.png", "source"), (b"not a video", "source")],
)
def test_generate_openpose_bad_input(source, message):
    with pytest.raises(ValueError, match=message):
        generate_openpose(source)


# ---------------------------------------------------------------------------------------------------------
# Different perspective: target poses and the pose guide video
# ---------------------------------------------------------------------------------------------------------


def test_pose_transforms():
    pose = standing_pose()
    np.testing.assert_allclose(mirror_pose(mirror_pose(pose)), pose)
    mirrored = mirror_pose(pose)
    # the right wrist of the mirrored pose is where the left wrist was, flipped
    right, left = KEYPOINTS.index("right_wrist"), KEYPOINTS.index("left_wrist")
    np.testing.assert_allclose(mirrored[right, 0], 1 - pose[left, 0])
    np.testing.assert_allclose(rotate_pose(pose, 360), pose, atol=1e-9)
    neck = KEYPOINTS.index("neck")
    turned = rotate_pose(pose, 90)
    np.testing.assert_allclose(turned[neck], pose[neck])  # rotation is about the neck
    # the nose, above the neck, ends up left of it after a clockwise quarter turn... on screen y points
    # down, so a positive angle takes "up" (-y) to "+x"
    assert turned[KEYPOINTS.index("nose"), 0] > pose[neck, 0]
    # seen from the side (yaw 90) the figure is a vertical line through the neck
    np.testing.assert_allclose(yaw_pose(pose, 90)[:, 0], pose[neck, 0], atol=1e-9)


def test_pose_guide_video_moves_from_source_to_target():
    source = standing_pose()
    target = rotate_pose(source, 30)
    video = pose_guide_video(source, target, 9, SIZE, SIZE)
    assert video.shape == (9, SIZE, SIZE, 3)
    np.testing.assert_array_equal(video[0], render_pose(source, SIZE, SIZE))
    np.testing.assert_array_equal(video[-1], render_pose(target, SIZE, SIZE))
    # halfway, every keypoint is halfway between its two positions
    np.testing.assert_array_equal(video[4], render_pose((source + target) / 2, SIZE, SIZE))
    assert not np.array_equal(video[4], video[0]) and not np.array_equal(video[4], video[-1])
    with pytest.raises(ValueError, match="frames"):
        pose_guide_video(source, target, 0, SIZE, SIZE)
    with pytest.raises(ValueError, match="target_landmarks"):
        pose_guide_video(source, np.zeros((5, 3)), 4, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------------------------


def moving_square(shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (24, 24, 3)).astype(np.float32)
    texture = np.clip(cv2.GaussianBlur(noise, (0, 0), 3) * 2 + 42, 0, 255).astype(np.uint8)
    background = np.full((96, 128, 3), 40, np.uint8)
    first, second = background.copy(), background.copy()
    first[36:60, 20:44] = texture
    second[36:60, 20 + shift : 44 + shift] = texture
    return first, second, texture


def test_interpolated_midpoint_is_the_square_halfway():
    first, second, texture = moving_square(16)
    frames, meta = rife_interpolate_images(first, second, 5)
    assert frames.shape == (5, 96, 128, 3)
    assert meta == {"interpolator": "dis_flow", "frames": 5, "width": 128, "height": 96}
    np.testing.assert_array_equal(frames[0], first)
    np.testing.assert_array_equal(frames[-1], second)
    middle = frames[2]
    foreground = np.abs(middle.astype(int) - 40).max(axis=-1) > 30
    ys, xs = np.nonzero(foreground)
    assert abs(xs.mean() - (31.5 + 8)) < 2 and abs(ys.mean() - 47.5) < 1
    # one sharp square at the midpoint, not two ghosts as a plain cross-fade would give
    error = np.abs(middle[36:60, 28:52].astype(int) - texture).mean()
    crossfade = (first.astype(float) + second) / 2
    assert error < 5 < np.abs(crossfade[36:60, 28:52] - texture).mean()
    assert xs.max() - xs.min() < 30


def test_interpolation_inputs(tmp_path):
    first, second, _ = moving_square(8)
    path1, path2 = tmp_path / "1.png", tmp_path / "2.png"
    path1.write_bytes(encode_png(first))
    path2.write_bytes(encode_png(second))
    frames, meta = rife_interpolate_images(str(path1), str(path2), 3, resolution=(64, 48))
    assert frames.shape == (3, 48, 64, 3) and meta["width"] == 64
    with pytest.raises(ValueError, match="image2"):
        rife_interpolate_images(str(path1), str(tmp_path / "missing.png"), 3)
    with pytest.raises(ValueError, match="image1 is required"):
        rife_interpolate_images(None, str(path2), 3)
    with pytest.raises(ValueError, match="frames"):
        rife_interpolate_images(first, second, 1)


# ---------------------------------------------------------------------------------------------------------
# Frame extraction and joining
# ---------------------------------------------------------------------------------------------------------


def coloured_clip(count: int, size: tuple[int, int] = (32, 24), start: int = 0) -> np.ndarray:
    width, height = size
    return np.stack([np.full((height, width, 3), (start + 20 * i) % 256, np.uint8) for i in range(count)])


def test_extract_frame_from_an_encoded_video(tmp_path):
    clip = coloured_clip(10)
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_mp4(clip, fps=8, crf=0))
    png = extract_frame(str(path), 6)
    frame = np.array(Image.open(io.BytesIO(png)).convert("RGB"))
    assert frame.shape == (24, 32, 3)
    assert abs(frame.mean() - 120) < 3
    assert abs(extract_frame_array(path.read_bytes(), -1).mean() - 180) < 3


@pytest.mark.parametrize("index", [10, -11, 99])
def test_extract_frame_out_of_range_names_the_index_and_count(tmp_path, index):
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_mp4(coloured_clip(10), fps=8))
    with pytest.raises(ValueError, match=rf"frame_index {index} is out of range: the video has 10 frames"):
        extract_frame(str(path), index)


def test_extract_frame_bad_inputs(tmp_path):
    np.testing.assert_array_equal(extract_frame_array(coloured_clip(3), 1), coloured_clip(3)[1])
    with pytest.raises(ValueError, match="frame_index must be an integer"):
        extract_frame(coloured_clip(3), "1")
    with pytest.raises(ValueError, match="video is required"):
        extract_frame(None, 0)
    with pytest.raises(ValueError, match="video"):
        extract_frame(str(tmp_path / "missing.mp4"), 0)


def test_join_clips_cross_fades_in_order(tmp_path):
    a, b, c = coloured_clip(9, start=0), coloured_clip(7, start=100), coloured_clip(5, size=(64, 48))
    path = tmp_path / "b.mp4"
    path.write_bytes(encode_mp4(b, fps=8, crf=0))
    joined = join_clips([a, str(path), c], overlaps=[3, 2])
    assert joined.shape == (9 + 7 + 5 - 3 - 2, 24, 32, 3)  # c is resized to the first clip's size
    np.testing.assert_array_equal(joined[:6], a[:6])
    # the first overlap blends a's end (120..160) into b's start (100..140): strictly between the two
    assert a[6].mean() > joined[6].mean() > b[0].mean()
    assert abs(joined[-1].mean() - c[-1].mean()) < 2
    assert len(join_clips([a, b], overlaps=0)) == 16
    with pytest.raises(ValueError, match=r"overlaps\[0\]"):
        join_clips([a, b], overlaps=[8])
    with pytest.raises(ValueError, match="at least 2"):
        join_clips([a])
    with pytest.raises(ValueError, match=r"clips\[1\]"):
        join_clips([a, str(tmp_path / "missing.mp4")])
