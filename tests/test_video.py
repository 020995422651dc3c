"""Tests of Wan2GP.video: real ffmpeg encoding/decoding and the frame operations of travel runs."""

from __future__ import annotations

import io
import subprocess

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from Wan2GP.video import (
    adjust_brightness,
    adjust_saturation,
    build_vace_guide,
    colour_match,
    crossfade,
    crossfade_weights,
    decode_video,
    encode_mp4,
    encode_png,
    extract_frame,
    fade,
    fit_resolution,
    join_mp4,
    load_image,
    mask_to_video,
    probe_video,
    stitch,
    to_uint8_frames,
    upscale,
)

# ---------------------------------------------------------------------------------------------------------
# Fixtures: small, smooth synthetic content (smooth so lossy H.264 stays close to the source)
# ---------------------------------------------------------------------------------------------------------


def smooth_clip(frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """A moving colour gradient: every frame differs, and neighbouring pixels are similar."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        out[t, ..., 0] = np.clip(40 + 150 * x / width + 4 * t, 0, 255)
        out[t, ..., 1] = np.clip(60 + 120 * y / height, 0, 255)
        out[t, ..., 2] = np.clip(200 - 10 * t - 60 * x / width, 0, 255)
    return out


def solid(frames: int, value: int, height: int = 8, width: int = 8) -> np.ndarray:
    return np.full((frames, height, width, 3), value, dtype=np.uint8)


def numbered(frames: int, height: int = 4, width: int = 4) -> np.ndarray:
    """Frame t is filled with value t, so a frame identifies its index."""
    return np.stack([np.full((height, width, 3), t, dtype=np.uint8) for t in range(frames)])


# ---------------------------------------------------------------------------------------------------------
# encode_mp4 / decode_video / probe_video
# ---------------------------------------------------------------------------------------------------------


def test_mp4_round_trip_keeps_count_size_fps_and_pixels() -> None:
    frames = smooth_clip(9, 48, 64)
    data = encode_mp4(frames, fps=16)
    assert data[4:8] == b"ftyp"

    decoded, fps = decode_video(data)
    assert decoded.dtype == np.uint8
    assert decoded.shape == frames.shape
    assert fps == 16.0
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean()
    assert error < 8, f"mean abs error {error}"
    # The frames keep their order: each decoded frame is closest to its own source frame.
    for t in range(len(frames)):
        distances = [np.abs(decoded[t].astype(np.int16) - f.astype(np.int16)).mean() for f in frames]
        assert int(np.argmin(distances)) == t


def test_mp4_is_h264_yuv420p_with_index_at_the_front(tmp_path) -> None:
    data = encode_mp4(smooth_clip(3, 32, 32), fps=8)
    # +faststart moves the moov box ahead of the media data, so browsers can start playback early.
    assert 0 <= data.find(b"moov") < data.find(b"mdat")
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    info = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    ).stderr
    assert "h264" in info and "yuv420p" in info


def test_decode_and_probe_from_path_and_pathlike(tmp_path) -> None:
    frames = smooth_clip(5, 32, 32)
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_mp4(frames, fps=24))
    from_path, fps = decode_video(str(path))
    from_pathlike, _ = decode_video(path)
    assert fps == 24.0
    np.testing.assert_array_equal(from_path, from_pathlike)
    assert probe_video(path) == {"frames": 5, "fps": 24.0, "width": 32, "height": 32}
    assert probe_video(path.read_bytes()) == probe_video(str(path))


def test_probe_reports_encoded_geometry() -> None:
    info = probe_video(encode_mp4(smooth_clip(7, 48, 64), fps=12))
    assert info == {"frames": 7, "fps": 12.0, "width": 64, "height": 48}
    assert isinstance(info["frames"], int) and isinstance(info["fps"], float)


def test_odd_sizes_are_padded_by_replicating_the_edge() -> None:
    frames = smooth_clip(3, 33, 47)
    decoded, _ = decode_video(encode_mp4(frames, fps=8))
    assert decoded.shape == (3, 34, 48, 3)
    inner = np.abs(decoded[:, :33, :47].astype(np.int16) - frames.astype(np.int16)).mean()
    assert inner < 8
    # The added column repeats the last one (up to compression error).
    edge = np.abs(decoded[:, :33, 47].astype(np.int16) - frames[:, :, 46].astype(np.int16)).mean()
    assert edge < 12


def test_single_frame_video_round_trips() -> None:
    frames = smooth_clip(1, 32, 32)
    decoded, fps = decode_video(encode_mp4(frames, fps=1))
    assert decoded.shape == (1, 32, 32, 3) and fps == 1.0


def test_lower_crf_gives_higher_fidelity() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)  # noise: hard for the encoder

    def error(crf: int) -> float:
        decoded, _ = decode_video(encode_mp4(frames, fps=8, crf=crf))
        return float(np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean())

    assert error(5) < error(40)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), "empty"),
        (np.zeros((2, 8, 8, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((2, 8, 8), dtype=np.uint8), r"shape \(T, H, W, 3\)"),
        (np.zeros((2, 8, 8, 4), dtype=np.uint8), r"shape \(T, H, W, 3\)"),
        ([np.zeros((8, 8, 3), dtype=np.uint8)], "numpy array"),
    ],
)
def test_encode_mp4_rejects_bad_frames(frames, message) -> None:
    with pytest.raises(ValueError, match=f"frames.*{message}|{message}"):
        encode_mp4(frames, fps=8)


@pytest.mark.parametrize(
    ("fps", "crf", "name"), [(0, 18, "fps"), (-3, 18, "fps"), (2.5, 18, "fps"), (8, 52, "crf")]
)
def test_encode_mp4_rejects_bad_fps_and_crf(fps, crf, name) -> None:
    with pytest.raises(ValueError, match=name):
        encode_mp4(solid(2, 0), fps=fps, crf=crf)


def test_decode_rejects_missing_empty_and_garbage(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        decode_video(tmp_path / "nope.mp4")
    with pytest.raises(ValueError, match="empty"):
        decode_video(b"")
    with pytest.raises(ValueError, match="not a decodable video"):
        decode_video(b"this is not a video at all" * 10)
    with pytest.raises(ValueError, match="bytes or a file path"):
        probe_video(12)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# encode_png / load_image
# ---------------------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    data = encode_png(frame)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), frame)
    np.testing.assert_array_equal(load_image(data), frame)


def packet_times(video: bytes, tmp_path) -> tuple[list[int], set[int]]:
    """(sorted presentation times, durations) of a video's packets, in its stream's time base."""
    path = tmp_path / "probe.mp4"
    path.write_bytes(video)
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-i",
        str(path),
        "-c",
        "copy",
        "-f",
        "framemd5",
        "-",
    ]
    rows = [line.split(",") for line in subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
            if line and not line.startswith("#")]  # fmt: skip
    return sorted(int(row[2]) for row in rows), {int(row[3]) for row in rows}


@pytest.mark.parametrize(
    ("bounds", "fps"),
    [((0, 3, 6, 13, 30, 43), 16), ((0, 7, 24, 41, 60), 16), ((0, 20, 40, 60), 24), ((0, 4, 29, 33), 30)],
)
def test_joined_pieces_keep_every_frame_in_order_and_in_time(bounds, fps, tmp_path) -> None:
    frames = smooth_clip(frames=bounds[-1])
    counts = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    pieces = [encode_mp4(frames[a:b], fps=fps) for a, b in zip(bounds, bounds[1:], strict=False)]
    joined = join_mp4(pieces, counts, fps)
    decoded, decoded_fps = decode_video(joined)
    assert decoded.shape == frames.shape and decoded_fps == fps
    errors = np.abs(decoded.astype(np.int16) - frames).reshape(len(frames), -1).mean(axis=1)
    assert errors.max() < 3, errors  # each frame is its own, where it was (neighbours differ by ~4)
    # Every frame one frame after the last: B-frame pieces read without their durations overlap at joins.
    times, durations = packet_times(joined, tmp_path)
    step = times[1] - times[0]
    assert times == [step * i for i in range(len(frames))] and durations == {step}


def test_join_refuses_what_it_cannot_join_cleanly() -> None:
    frames = smooth_clip(frames=8)
    pieces = [encode_mp4(frames[:2], fps=16), encode_mp4(frames[2:], fps=16)]
    assert join_mp4(pieces[:1], [2], 16) == pieces[0]
    with pytest.raises(ValueError, match="at least 3 frames to join, got \\[2, 6\\]"):
        join_mp4(pieces, [2, 6], 16)
    with pytest.raises(ValueError, match="equally long"):
        join_mp4([], [], 16)
    with pytest.raises(RuntimeError, match="failed to join 2 encoded pieces"):
        join_mp4([pieces[1], b"not a video"], [6, 3], 16)


@pytest.mark.parametrize("bounds", [(0, 20), (0, 5, 20), (0, 3, 9, 14, 20), (2, 11)])
def test_fading_a_part_gives_that_part_of_the_faded_video(bounds) -> None:
    frames = np.random.default_rng(4).integers(0, 256, (20, 6, 8, 3), dtype=np.uint8)
    whole = fade(frames, fade_in=7, fade_out=9, colour=(10, 200, 30))
    for a, b in zip(bounds, bounds[1:], strict=False):
        part = fade(frames[a:b], fade_in=7, fade_out=9, colour=(10, 200, 30), start=a, total=20)
        np.testing.assert_array_equal(part, whole[a:b])
    assert np.all(whole[0] == (10, 200, 30)) and np.all(whole[-1] == (10, 200, 30))
    np.testing.assert_array_equal(whole[7:11], frames[7:11])  # between the fades: untouched
    with pytest.raises(ValueError, match=r"frames \[15, 25\) run past the video's 20 frames"):
        fade(frames[:10], fade_in=2, start=15, total=20)
    with pytest.raises(ValueError, match="exceeds the 20 frames"):
        fade(frames, fade_in=12, fade_out=9)


def test_encode_png_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="frame must have shape"):
        encode_png(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="frame must have dtype uint8"):
        encode_png(np.zeros((8, 8, 3), dtype=np.float64))


def test_load_image_converts_modes_and_reads_paths(tmp_path) -> None:
    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    path = tmp_path / "anchor.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = load_image(path)
    assert image.shape == (6, 5, 3) and image.dtype == np.uint8
    assert (image[..., 0] == 200).all() and (image[..., 1:] == 0).all()
    np.testing.assert_array_equal(load_image(str(path)), image)


def test_load_image_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png.*not a decodable image"):
        load_image(broken)
    with pytest.raises(ValueError, match="empty"):
        load_image(b"")


# ---------------------------------------------------------------------------------------------------------
# to_uint8_frames
# ---------------------------------------------------------------------------------------------------------


def test_to_uint8_frames_from_float_numpy() -> None:
    video = np.zeros((2, 4, 5, 3), dtype=np.float32)
    video[0] = 1.0
    video[1, ..., 1] = 0.5
    out = to_uint8_frames(video)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 5, 3)
    assert (out[0] == 255).all()
    assert (out[1, ..., 1] == 128).all() and (out[1, ..., 0] == 0).all()


def test_to_uint8_frames_from_pil_list_uint8_and_tensors() -> None:
    frames = smooth_clip(3, 8, 6)
    pil = [Image.fromarray(f) for f in frames]
    np.testing.assert_array_equal(to_uint8_frames(pil), frames)
    np.testing.assert_array_equal(to_uint8_frames(frames), frames)
    np.testing.assert_array_equal(to_uint8_frames(frames[np.newaxis]), frames)  # batch of one

    as_float = torch.from_numpy(frames.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(to_uint8_frames(as_float), frames)
    channels_first = as_float.permute(0, 3, 1, 2).contiguous()
    np.testing.assert_array_equal(to_uint8_frames(channels_first), frames)


def test_to_uint8_frames_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_frames(np.full((1, 4, 4, 3), 200.0, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(np.full((1, 4, 4, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="batch of 2"):
        to_uint8_frames(np.zeros((2, 1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        to_uint8_frames([])
    with pytest.raises(ValueError, match="same size"):
        to_uint8_frames([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        to_uint8_frames(np.zeros((1, 4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="dtype int64"):
        to_uint8_frames(np.zeros((1, 4, 4, 3), dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------
# extract_frame
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "expected"), [(0, 0), (3, 3), (6, 6), (-1, 6), (-7, 0), (-3, 4)])
def test_extract_frame_from_array(index, expected) -> None:
    frames = numbered(7)
    frame = extract_frame(frames, index)
    assert frame.shape == (4, 4, 3) and (frame == expected).all()
    frame[...] = 99  # a copy, not a view into the clip
    assert (frames[expected] == expected).all()


@pytest.mark.parametrize("index", [7, -8, 100])
def test_extract_frame_out_of_range_names_index_and_count(index) -> None:
    with pytest.raises(IndexError, match=f"index {index} is out of range for 7 frames"):
        extract_frame(numbered(7), index)


def test_extract_frame_from_encoded_video(tmp_path) -> None:
    frames = smooth_clip(6, 32, 32)
    data = encode_mp4(frames, fps=8)
    decoded, _ = decode_video(data)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    for index in (0, 2, 5, -1, -6):
        np.testing.assert_array_equal(extract_frame(data, index), decoded[index])
        np.testing.assert_array_equal(extract_frame(path, index), decoded[index])
    for index in (6, -7):
        with pytest.raises(IndexError, match=f"index {index} is out of range for 6 frames"):
            extract_frame(data, index)


# ---------------------------------------------------------------------------------------------------------
# crossfade / stitch
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("len_a", "len_b", "overlap"), [(5, 5, 0), (5, 5, 2), (5, 5, 5), (9, 3, 3), (3, 9, 2), (1, 1, 1)]
)
def test_crossfade_length(len_a, len_b, overlap) -> None:
    out = crossfade(numbered(len_a), numbered(len_b), overlap)
    assert out.shape == (len_a + len_b - overlap, 4, 4, 3)


def test_crossfade_overlap_zero_concatenates() -> None:
    a, b = solid(3, 10), solid(4, 200)
    np.testing.assert_array_equal(crossfade(a, b, 0), np.concatenate([a, b]))


@pytest.mark.parametrize("sharpness", [0.0, 0.3, 1.0])
def test_crossfade_black_to_white_ramps_and_leaves_the_rest_untouched(sharpness) -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 40, size=(6, 8, 8, 3), dtype=np.uint8)  # dark clip
    b = rng.integers(215, 256, size=(7, 8, 8, 3), dtype=np.uint8)  # bright clip
    overlap = 4
    out = crossfade(a, b, overlap, sharpness=sharpness)
    assert len(out) == 9
    np.testing.assert_array_equal(out[:2], a[:2])  # before the overlap: a, exactly
    np.testing.assert_array_equal(out[6:], b[4:])  # after the overlap: b, exactly
    means = out[2:6].reshape(overlap, -1).mean(axis=1)
    assert np.all(np.diff(means) > 0), means  # monotonic dark -> bright
    assert means[0] < 127.5 < means[-1]  # first closer to a, last closer to b
    assert a[2:].mean() < means[0] and means[-1] < b[:4].mean()  # all frames are real blends


def test_crossfade_blends_pixelwise_with_linear_weights() -> None:
    a, b = solid(3, 0), solid(3, 255)
    out = crossfade(a, b, 3)
    # Weights (i + 1) / (overlap + 1) = 0.25, 0.5, 0.75.
    assert [int(out[i, 0, 0, 0]) for i in range(3)] == [64, 128, 191]


def test_sharpness_steepens_the_ramp() -> None:
    linear = crossfade_weights(8, 0.0)
    sharp = crossfade_weights(8, 0.5)
    np.testing.assert_allclose(linear, np.arange(1, 9) / 9)
    assert np.all(np.diff(sharp) > 0) and sharp[0] > 0 and sharp[-1] < 1
    np.testing.assert_allclose(sharp + sharp[::-1], 1.0)  # symmetric around the middle
    assert sharp[0] < linear[0] and sharp[-1] > linear[-1]  # flatter at the ends...
    assert sharp[4] - sharp[3] > linear[4] - linear[3]  # ...steeper in the middle


def test_crossfade_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="overlap 4 exceeds the shorter clip \\(3 frames\\)"):
        crossfade(numbered(3), numbered(5), 4)
    with pytest.raises(ValueError, match="b has frame size"):
        crossfade(numbered(3), numbered(3, height=6), 1)
    with pytest.raises(ValueError, match="overlap must be a non-negative integer"):
        crossfade(numbered(3), numbered(3), -1)
    with pytest.raises(ValueError, match="a must have dtype uint8"):
        crossfade(numbered(3).astype(np.float32), numbered(3), 1)
    with pytest.raises(ValueError, match="sharpness"):
        crossfade(numbered(3), numbered(3), 1, sharpness=-0.5)


@pytest.mark.parametrize(
    ("lengths", "overlaps"),
    [([5], []), ([5, 5], [2]), ([9, 9, 9], [4, 2]), ([3, 9, 3], [3, 3]), ([4, 4, 4, 4], [0, 4, 0])],
)
def test_stitch_length(lengths, overlaps) -> None:
    out = stitch([numbered(n) for n in lengths], overlaps)
    assert len(out) == sum(lengths) - sum(overlaps)


def test_stitch_equals_folding_crossfade() -> None:
    clips = [solid(5, 0), solid(4, 120), solid(6, 250)]
    folded = crossfade(crossfade(clips[0], clips[1], 2, 0.3), clips[2], 3, 0.3)
    np.testing.assert_array_equal(stitch(clips, [2, 3], sharpness=0.3), folded)


def test_stitch_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="len\\(clips\\) - 1 = 2"):
        stitch([numbered(3)] * 3, [1])
    with pytest.raises(ValueError, match="non-empty"):
        stitch([], [])
    with pytest.raises(
        ValueError, match="overlaps\\[1\\] = 4 exceeds the shorter clip it joins \\(3 frames\\)"
    ):
        stitch([numbered(5), numbered(5), numbered(3)], [1, 4])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=5).flatmap(
        lambda lengths: st.tuples(
            st.just(lengths),
            st.tuples(*[st.integers(0, min(x, y)) for x, y in zip(lengths, lengths[1:], strict=False)]),
        )
    ),
    st.floats(min_value=0.0, max_value=2.0),
)
def test_stitch_length_and_untouched_ends_property(case, sharpness) -> None:
    lengths, overlaps = case
    clips = [np.full((n, 2, 2, 3), 10 * i, dtype=np.uint8) for i, n in enumerate(lengths)]
    out = stitch(clips, list(overlaps), sharpness=sharpness)
    assert len(out) == sum(lengths) - sum(overlaps)
    # The very first and last frames are never blended unless an overlap covers them.
    if not overlaps or overlaps[0] < lengths[0]:
        np.testing.assert_array_equal(out[0], clips[0][0])
    if not overlaps or overlaps[-1] < lengths[-1]:
        np.testing.assert_array_equal(out[-1], clips[-1][-1])


# ---------------------------------------------------------------------------------------------------------
# Colour, saturation/brightness, fades
# ---------------------------------------------------------------------------------------------------------


def _lab_mean(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64).mean(axis=0)


def test_colour_match_pulls_from_the_start_reference_to_the_end_reference() -> None:
    rng = np.random.default_rng(3)
    warm = np.empty((40, 40, 3), dtype=np.uint8)  # warm, bright start reference
    warm[..., 0] = rng.integers(180, 240, size=(40, 40))
    warm[..., 1] = rng.integers(90, 140, size=(40, 40))
    warm[..., 2] = rng.integers(30, 80, size=(40, 40))
    cold = warm[..., ::-1].copy() // 2  # cold, dark end reference
    frames = np.empty((9, 24, 32, 3), dtype=np.uint8)  # greenish mid-grey frames
    frames[..., 0] = rng.integers(60, 100, size=(9, 24, 32))
    frames[..., 1] = rng.integers(120, 160, size=(9, 24, 32))
    frames[..., 2] = rng.integers(60, 100, size=(9, 24, 32))

    matched = colour_match(frames, warm, cold)
    assert matched.shape == frames.shape and matched.dtype == np.uint8
    # The first frame is fully the start-reference transfer, the last fully the end one (weight of the
    # original frame is 0 at both ends); the middle mixes both references and 25% of the original.
    for index, reference in ((0, warm), (-1, cold)):
        before = np.linalg.norm(_lab_mean(frames[index]) - _lab_mean(reference))
        after = np.linalg.norm(_lab_mean(matched[index]) - _lab_mean(reference))
        assert after < 0.1 * before, (index, before, after)
    middle = _lab_mean(matched[4])
    assert np.linalg.norm(middle - _lab_mean(warm)) > 5 and np.linalg.norm(middle - _lab_mean(cold)) > 5


def test_colour_match_transfers_lab_mean_and_std_of_the_halved_saturation_frame() -> None:
    # One frame (t = 1): the end reference's LAB statistics, computed by hand from the definition.
    rng = np.random.default_rng(4)
    frame = rng.integers(40, 200, size=(16, 16, 3), dtype=np.uint8)
    reference = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] *= 0.5
    lab = cv2.cvtColor(cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB), cv2.COLOR_RGB2LAB)
    lab = lab.astype(np.float32)
    resized = cv2.resize(reference, (16, 16), interpolation=cv2.INTER_LINEAR)
    target = cv2.cvtColor(resized, cv2.COLOR_RGB2LAB).astype(np.float32)
    for c, floor in ((0, 0.1), (1, 0.4), (2, 0.4)):
        ratio = max(target[..., c].std() / lab[..., c].std(), floor)
        lab[..., c] = (lab[..., c] - lab[..., c].mean()) * ratio + target[..., c].mean()
    expected = cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    np.testing.assert_array_equal(colour_match(frame, reference, reference), expected)


def test_saturation_is_chroma_scaling_with_ffmpeg_eq_range() -> None:
    frames = smooth_clip(3, 16, 16)
    same = adjust_saturation(frames, 1.0)
    np.testing.assert_array_equal(same, frames)
    assert same is not frames
    luma = cv2.cvtColor(frames[0], cv2.COLOR_RGB2YCrCb)[..., 0].astype(int)

    def chroma_spread(video: np.ndarray) -> float:
        return float(np.abs(cv2.cvtColor(video[0], cv2.COLOR_RGB2YCrCb)[..., 1:].astype(int) - 128).mean())

    assert chroma_spread(adjust_saturation(frames, 0.5)) < 0.6 * chroma_spread(frames)
    assert chroma_spread(adjust_saturation(frames, 1.5)) > 1.3 * chroma_spread(frames)
    grey = adjust_saturation(frames, 0.0)
    assert (grey.max(axis=-1).astype(int) - grey.min(axis=-1) <= 1).all()  # grey pixels
    grey_luma = cv2.cvtColor(grey[0], cv2.COLOR_RGB2YCrCb)[..., 0].astype(int)
    assert np.abs(grey_luma - luma).max() <= 2  # luma is kept
    with pytest.raises(ValueError, match="saturation must be >= 0"):
        adjust_saturation(frames, -0.5)
    with pytest.raises(ValueError, match="saturation must be <= 3"):
        adjust_saturation(frames, 3.5)


def test_brightness_is_an_additive_delta_on_the_factor() -> None:
    frames = smooth_clip(2, 16, 16)
    unchanged = adjust_brightness(frames, 0)
    np.testing.assert_array_equal(unchanged, frames)  # 0 = unchanged (the default clients send)
    darker = adjust_brightness(frames, -0.25)
    np.testing.assert_array_equal(darker, (frames.astype(np.float32) * 0.75).astype(np.uint8))
    brighter = adjust_brightness(frames, 0.5)
    np.testing.assert_array_equal(brighter, np.clip(frames.astype(np.float32) * 1.5, 0, 255).astype(np.uint8))
    assert not adjust_brightness(frames, -1.0).any()  # -1 is black
    with pytest.raises(ValueError, match="brightness must be >= -1"):
        adjust_brightness(frames, -1.5)
    with pytest.raises(ValueError, match="brightness must be a number"):
        adjust_brightness(frames, "0.2")


def test_fade_in_and_out() -> None:
    frames = solid(10, 200)
    out = fade(frames, fade_in=4, fade_out=3, colour=(0, 0, 0))
    means = out.reshape(10, -1).mean(axis=1)
    assert means[0] == 0 and means[-1] == 0  # the fades start/end on the pure colour
    assert np.all(np.diff(means[:5]) > 0) and np.all(np.diff(means[6:]) < 0)
    np.testing.assert_array_equal(out[4:7], frames[4:7])  # untouched between the fades
    white = fade(solid(4, 0), fade_in=2, colour=(255, 255, 255))
    assert (white[0] == 255).all() and (white[1] == 128).all() and (white[2:] == 0).all()
    np.testing.assert_array_equal(fade(frames), frames)


def test_fade_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fade_in \\+ fade_out = 11 exceeds the 10 frames"):
        fade(solid(10, 1), fade_in=6, fade_out=5)
    with pytest.raises(ValueError, match="colour"):
        fade(solid(10, 1), fade_in=2, colour=(0, 0, 300))
    with pytest.raises(ValueError, match="fade_out"):
        fade(solid(10, 1), fade_out=-1)


# ---------------------------------------------------------------------------------------------------------
# fit_resolution / upscale
# ---------------------------------------------------------------------------------------------------------


def test_fit_resolution_letterbox_pads_with_black() -> None:
    image = np.full((10, 20, 3), 200, dtype=np.uint8)  # 2:1 into a square
    out = fit_resolution(image, 16, 16, mode="letterbox")
    assert out.shape == (16, 16, 3)
    assert (out[:4] == 0).all() and (out[12:] == 0).all()  # bars above and below
    assert (out[4:12] == 200).all()


def test_fit_resolution_crop_keeps_the_centre() -> None:
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    image[:, 10:20] = 255  # only the middle third is white
    out = fit_resolution(image, 10, 10, mode="crop")
    assert out.shape == (10, 10, 3)
    assert out.mean() > 250


def test_fit_resolution_stretch_and_frames() -> None:
    frames = smooth_clip(3, 12, 20)
    out = fit_resolution(frames, 8, 30, mode="stretch")
    assert out.shape == (3, 30, 8, 3)
    same = fit_resolution(frames, 20, 12)
    np.testing.assert_array_equal(same, frames)
    with pytest.raises(ValueError, match="mode must be one of"):
        fit_resolution(frames, 8, 8, mode="zoom")
    with pytest.raises(ValueError, match="width must be a positive integer"):
        fit_resolution(frames, 0, 8)


def test_upscale_rounds_to_even_sizes() -> None:
    frames = smooth_clip(2, 15, 21)
    out = upscale(frames, 1.5)
    assert out.shape == (2, 22, 32, 3)  # 22.5 -> 22, 31.5 -> 32
    assert out.shape[1] % 2 == 0 and out.shape[2] % 2 == 0
    assert abs(float(out.mean()) - float(frames.mean())) < 3  # same content, just larger
    assert upscale(frames, 2.0).shape == (2, 30, 42, 3)
    with pytest.raises(ValueError, match="factor must be > 0"):
        upscale(frames, 0)


# ---------------------------------------------------------------------------------------------------------
# VACE guide and mask
# ---------------------------------------------------------------------------------------------------------


def test_build_vace_guide_layout() -> None:
    total, width, height = 13, 16, 12
    rng = np.random.default_rng(4)
    leading = rng.integers(0, 256, size=(4, height, width, 3), dtype=np.uint8)
    end_anchor = np.full((24, 32, 3), (250, 10, 10), dtype=np.uint8)  # same aspect, larger: resized
    mid_anchor = np.full((height, width, 3), (10, 250, 10), dtype=np.uint8)
    guide, mask = build_vace_guide(total, width, height, leading, [(-1, end_anchor), (8, mid_anchor)])

    assert guide.shape == (total, height, width, 3) and guide.dtype == np.uint8
    assert mask.shape == (total, height, width) and mask.dtype == np.uint8
    np.testing.assert_array_equal(guide[:4], leading)
    np.testing.assert_array_equal(guide[8], mid_anchor)
    assert (guide[12] == np.array([250, 10, 10], dtype=np.uint8)).all()
    generated = [i for i in range(total) if i not in (0, 1, 2, 3, 8, 12)]
    assert (guide[generated] == 127).all()
    expected_mask = np.full(total, 255)
    expected_mask[[0, 1, 2, 3, 8, 12]] = 0
    np.testing.assert_array_equal(mask, np.broadcast_to(expected_mask[:, None, None], mask.shape))


def test_build_vace_guide_without_leading_frames_and_custom_grey() -> None:
    guide, mask = build_vace_guide(5, 8, 8, None, [(0, np.zeros((8, 8, 3), dtype=np.uint8))], grey=90)
    assert (guide[0] == 0).all() and (mask[0] == 0).all()
    assert (guide[1:] == 90).all() and (mask[1:] == 255).all()
    guide, mask = build_vace_guide(3, 8, 8, None, [])
    assert (guide == 127).all() and (mask == 255).all()


def test_build_vace_guide_rejects_bad_layouts() -> None:
    leading = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(
        ValueError, match="anchors\\[0\\] index 2 \\(frame 2\\) overlaps the 3 leading frames"
    ):
        build_vace_guide(9, 8, 8, leading, [(2, image)])
    with pytest.raises(ValueError, match="anchors\\[0\\] index 9 is out of range for 9 frames"):
        build_vace_guide(9, 8, 8, None, [(9, image)])
    with pytest.raises(ValueError, match="anchors\\[0\\] index -10 is out of range"):
        build_vace_guide(9, 8, 8, None, [(-10, image)])
    with pytest.raises(
        ValueError, match="anchors\\[1\\] index -1 \\(frame 8\\) is also used by anchors\\[0\\]"
    ):
        build_vace_guide(9, 8, 8, None, [(8, image), (-1, image)])
    with pytest.raises(ValueError, match="leading_frames are 8x8, expected width x height = 16x8"):
        build_vace_guide(9, 16, 8, leading, [])
    with pytest.raises(ValueError, match="leading_frames has 3 frames, more than total_frames = 2"):
        build_vace_guide(2, 8, 8, leading, [])
    with pytest.raises(ValueError, match="grey"):
        build_vace_guide(9, 8, 8, None, [], grey=300)


def test_mask_to_video() -> None:
    _, mask = build_vace_guide(4, 6, 5, None, [(1, np.zeros((5, 6, 3), dtype=np.uint8))])
    video = mask_to_video(mask)
    assert video.shape == (4, 5, 6, 3) and video.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(video[..., channel], mask)
    np.testing.assert_array_equal(mask_to_video(mask == 255), video)
    with pytest.raises(ValueError, match="mask must be a numpy array of shape \\(T, H, W\\)"):
        mask_to_video(video)
