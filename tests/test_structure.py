"""Structure guidance: preprocessors, the original's params, frame sampling and the composite control video."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from Wan2GP.structure import (
    DEPTH_MODEL_ENV,
    DepthEstimator,
    apply_control,
    build_control_video,
    canny_edges,
    depth_maps,
    flow_to_colour,
    flow_visualisation,
    optical_flow,
    parse_structure_guidance,
    preprocess,
    source_indices,
)
from Wan2GP.video import build_vace_guide, decode_video, encode_mp4

RNG = np.random.default_rng(7)
BACKGROUND = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)
PATCH = RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)


def moving_square(frames: int, dx: int, dy: int = 0) -> np.ndarray:
    """A textured square sliding over a still textured background by (dx, dy) pixels per frame."""
    video = np.repeat(BACKGROUND[np.newaxis], frames, axis=0).copy()
    for t in range(frames):
        top, left = 22 + dy * t, 30 + dx * t
        video[t, top : top + 20, left : left + 20] = PATCH
    return video


def numbered_video(frames: int, height: int = 32, width: int = 48) -> np.ndarray:
    """Frame i is uniformly grey level 10 * i, so sampled frames can be identified."""
    return np.stack([np.full((height, width, 3), 10 * i, dtype=np.uint8) for i in range(frames)])


def square_region(picture: np.ndarray, t: int, dx: int) -> np.ndarray:
    """The inner part of the square at frame t (away from its edges)."""
    top, left = 22, 30 + dx * t
    return picture[t, top + 5 : top + 15, left + 5 : left + 15].reshape(-1, 3).astype(float)


# ---------------------------------------------------------------------------------------------------------
# Flow
# ---------------------------------------------------------------------------------------------------------


def test_flow_colours_follow_the_middlebury_wheel():
    still = flow_to_colour(np.zeros((4, 4, 2), np.float32))
    assert (still == 255).all()  # no motion is white
    right = flow_to_colour(np.tile(np.array([1.0, 0.0], np.float32), (4, 4, 1)))
    left = flow_to_colour(np.tile(np.array([-1.0, 0.0], np.float32), (4, 4, 1)))
    down = flow_to_colour(np.tile(np.array([0.0, 1.0], np.float32), (4, 4, 1)))
    up = flow_to_colour(np.tile(np.array([0.0, -1.0], np.float32), (4, 4, 1)))
    # at full speed: right is red, left cyan-blue, down yellow, up violet (hue = direction)
    assert right[0, 0].tolist() == [255, 0, 0]
    assert left[0, 0].tolist() == [0, 209, 255]
    assert down[0, 0].tolist() == [255, 229, 0]
    assert up[0, 0].tolist() == [88, 0, 255]
    half = flow_to_colour(np.tile(np.array([0.5, 0.0], np.float32), (4, 4, 1)), max_radius=1.0)
    assert half[0, 0].tolist() == [255, 127, 127]  # half speed: halfway to white


def test_flow_of_a_translating_square_points_the_right_way():
    video = moving_square(6, dx=2)
    flows = optical_flow(video)
    assert flows.shape == (5, 64, 96, 2)
    inside = flows[2, 27:37, 37:47].reshape(-1, 2)
    assert np.median(inside[:, 0]) == pytest.approx(2.0, abs=0.5)
    assert np.median(np.abs(inside[:, 1])) < 0.5
    background = np.abs(flows[2, :10, :]).max()
    assert background < 0.5

    pictures = flow_visualisation(video)
    assert pictures.shape == video.shape and pictures.dtype == np.uint8
    assert (pictures[0] == pictures[1]).all()  # frame 0 repeats the first motion picture
    moving = square_region(pictures, 3, dx=2).mean(axis=0)
    assert moving[0] > 200 and moving[1] < 80 and moving[2] < 80  # red: moving right
    assert pictures[3, :10].mean() > 240  # still background: near white

    leftward = flow_visualisation(moving_square(6, dx=-2))
    towards_left = square_region(leftward, 3, dx=-2).mean(axis=0)
    assert towards_left[2] > 200 and towards_left[0] < 60  # cyan-blue: moving left


def test_motion_strength_scales_the_flow_picture():
    video = moving_square(5, dx=2)
    full = flow_visualisation(video, strength=1.0)
    weak = flow_visualisation(video, strength=0.25)
    none = flow_visualisation(video, strength=0.0)
    # strength 1 draws exactly the per-frame-normalised picture
    assert (full[2] == flow_to_colour(optical_flow(video)[1])).all()
    assert square_region(weak, 2, 2).mean() > square_region(full, 2, 2).mean() + 40  # paler: less motion
    assert (none == 255).all()


# ---------------------------------------------------------------------------------------------------------
# Canny, raw, depth
# ---------------------------------------------------------------------------------------------------------


def test_canny_marks_the_square_outline_only():
    video = np.zeros((2, 64, 64, 3), np.uint8)
    video[:, 20:44, 20:44] = 200
    edges = canny_edges(video)
    assert edges.shape == video.shape
    assert set(np.unique(edges).tolist()) == {0, 255}
    assert edges[0, 20:44, 19:22].max() == 255  # the left side of the square
    assert edges[0, 26:38, 26:38].max() == 0  # flat inside
    assert edges[0, :10, :10].max() == 0  # flat outside
    assert canny_edges(video, intensity=0.5).max() == 127
    assert not np.array_equal(edges, video)
    assert preprocess(video, "raw") is video


@pytest.fixture(scope="module")
def depth_model_dir(tmp_path_factory):
    """A tiny random-weight Depth Anything model saved to a local folder (the real transformers classes)."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
        out_indices=[1, 2],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[16, 32],
        reassemble_factors=[1, 0.5],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    folder = tmp_path_factory.mktemp("depth_model")
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=False, do_pad=False
    ).save_pretrained(folder)
    return str(folder)


def test_depth_needs_an_installed_model(monkeypatch, depth_model_dir):
    params = {"structure_type": "depth", "structure_video_path": "motion.mp4"}
    monkeypatch.delenv(DEPTH_MODEL_ENV, raising=False)
    with pytest.raises(ValidationError) as error:
        parse_structure_guidance(params)
    assert error.value.errors()[0]["loc"] == ("structure_type",)
    assert "structure_type 'depth' needs a depth model; none is installed" in str(error.value)
    with pytest.raises(ValueError, match="needs a depth model"):
        preprocess(moving_square(2, 1), "depth")

    monkeypatch.setenv(DEPTH_MODEL_ENV, depth_model_dir)
    assert parse_structure_guidance(params).structure_type == "depth"
    estimator = DepthEstimator(depth_model_dir)
    depth = depth_maps(moving_square(2, 1), estimator)
    assert depth.shape == (2, 64, 96, 3)
    assert (depth[..., 0] == depth[..., 2]).all()
    assert depth[0].min() == 0 and depth[0].max() == 255  # normalised per frame
    flat = depth_maps(moving_square(2, 1), estimator, contrast=0.0)
    assert set(np.unique(flat).tolist()) == {127}  # zero contrast: all mid-grey


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------


def test_legacy_single_structure_video():
    guidance = parse_structure_guidance(
        {
            "structure_type": "canny",
            "structure_video_path": "motion.mp4",
            "structure_video_treatment": "clip",
            "structure_video_motion_strength": "0.5",
            "structure_canny_intensity": 2,
        }
    )
    assert guidance.structure_type == "canny"
    assert guidance.strength == 0.5 and guidance.canny_intensity == 2.0
    assert [(v.path, v.treatment, v.start_frame, v.end_frame) for v in guidance.videos] == [
        ("motion.mp4", "clip", 0, None)
    ]
    assert parse_structure_guidance({"prompt": "x"}) is None
    # structure_type without a video defaults nothing silently: it is refused
    with pytest.raises(ValidationError) as error:
        parse_structure_guidance({"structure_type": "flow"})
    assert error.value.errors()[0]["loc"] == ("structure_type",)
    # the original's default preprocessing is flow
    assert parse_structure_guidance({"structure_video_path": "m.mp4"}).structure_type == "flow"


def test_structure_videos_and_nested_form():
    guidance = parse_structure_guidance(
        {
            "structure_videos": [
                {"path": "b.mp4", "start_frame": 50, "end_frame": 70, "structure_type": "raw"},
                {"path": "a.mp4", "start_frame": 0, "end_frame": 40, "source_start_frame": 5},
            ]
        }
    )
    assert guidance.structure_type == "raw"
    assert [v.path for v in guidance.videos] == ["b.mp4", "a.mp4"]
    nested = parse_structure_guidance(
        {"structure_guidance": {"videos": [{"path": "a.mp4"}], "preprocessing": "none", "strength": 0.3}}
    )
    assert nested.structure_type == "raw" and nested.strength == 0.3


@pytest.mark.parametrize(
    ("params", "loc", "words"),
    [
        ({"structure_type": "edges", "structure_video_path": "a.mp4"}, ("structure_type",), "must be one of"),
        (
            {"structure_video_path": "a.mp4", "structure_video_treatment": "stretch"},
            ("structure_video_treatment",),
            "adjust",
        ),
        (
            {"structure_video_path": "a.mp4", "structure_video_motion_strength": "fast"},
            ("structure_video_motion_strength",),
            "number",
        ),
        (
            {"structure_video_path": "a.mp4", "structure_video_motion_strength": 50},
            ("structure_video_motion_strength",),
            "less than or equal",
        ),
        (
            {
                "structure_videos": [
                    {"path": "a.mp4", "start_frame": 0, "end_frame": 30},
                    {"path": "b", "start_frame": 20},
                ]
            },
            ("structure_videos", 1, "start_frame"),
            "overlaps",
        ),
        (
            {"structure_videos": [{"path": "a.mp4", "start_frame": 10, "end_frame": 5}]},
            ("structure_videos", 0),
            "greater than start_frame",
        ),
        (
            {
                "structure_videos": [
                    {"path": "a.mp4", "structure_type": "flow"},
                    {"path": "b", "type": "canny"},
                ]
            },
            ("structure_videos",),
            "one structure_type",
        ),
        ({"use_uni3c": True, "structure_video_path": "a.mp4"}, ("use_uni3c",), "Uni3C"),
        ({"structure_type": "uni3c", "structure_video_path": "a.mp4"}, ("structure_type",), "Uni3C"),
        (
            {"structure_guidance": {"videos": [{"path": "a"}], "target": "uni3c"}},
            ("structure_guidance", "target"),
            "vace",
        ),
    ],
)
def test_bad_structure_params_name_the_field(params, loc, words):
    with pytest.raises(ValidationError) as error:
        parse_structure_guidance(params)
    assert error.value.errors()[0]["loc"] == loc
    assert words in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Sampling and compositing
# ---------------------------------------------------------------------------------------------------------


def test_adjust_spreads_the_whole_range_evenly():
    assert source_indices(100, 5, "adjust") == [0, 24, 49, 74, 99]  # compress: first and last included
    assert source_indices(3, 6, "adjust") == [0, 0, 0, 1, 1, 2]  # stretch: frames repeat
    assert source_indices(100, 3, "adjust", source_start=10, source_end=20) == [10, 14, 19]


def test_clip_plays_at_the_output_rate_and_loops():
    # a 30 fps video sampled at 16 fps: the first source frame at or after each output time
    assert source_indices(100, 9, "clip", source_fps=30, target_fps=16) == [0, 2, 4, 6, 8, 10, 12, 14, 15]
    assert source_indices(5, 12, "clip") == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]  # short: loops
    assert source_indices(50, 4, "clip", source_start=40) == [40, 41, 42, 43]
    with pytest.raises(ValueError, match="past the video's 50 frames"):
        source_indices(50, 4, "clip", source_start=60)


def test_composite_places_videos_on_their_ranges_with_neutral_gaps():
    videos = {"a.mp4": (numbered_video(11), 16.0), "b.mp4": (numbered_video(4), 16.0)}
    guidance = parse_structure_guidance(
        {
            "structure_type": "raw",
            "structure_videos": [
                {"path": "a.mp4", "start_frame": 0, "end_frame": 10},  # adjust 11 frames onto 10 (+1)
                {"path": "b.mp4", "start_frame": 14, "end_frame": 20, "treatment": "clip"},
            ],
        }
    )
    control = build_control_video(guidance, 20, 24, 16, 16, lambda path: videos[path])
    assert control.frames.shape == (20, 16, 24, 3)
    assert control.covered.tolist() == [True] * 10 + [False] * 4 + [True] * 6
    levels = control.frames[:, 8, 12, 0].tolist()
    assert levels[:10] == [10 * i for i in range(10)]  # 11 indices over 11 frames, last one trimmed
    assert levels[10:14] == [0, 0, 0, 0]  # raw neutral: black
    assert levels[14:] == [0, 10, 20, 30, 0, 10]  # clip loops the 4-frame video
    assert control.notes == []


def test_composite_flow_is_neutral_grey_outside_and_reports_cut_ranges():
    guidance = parse_structure_guidance(
        {
            "structure_type": "flow",
            "structure_videos": [
                {"path": "m.mp4", "start_frame": 4, "end_frame": 30},
                {"path": "m.mp4", "start_frame": 40, "end_frame": 50},
            ],
        }
    )
    control = build_control_video(guidance, 12, 96, 64, 16, lambda path: (moving_square(10, dx=2), 16.0))
    assert (control.frames[:4] == 128).all()  # flow neutral: grey
    assert control.covered.tolist() == [False] * 4 + [True] * 8
    assert control.notes == [
        "structure video 0 ends at frame 30, cut to the 12 frames",
        "structure video 1 starts at frame 40, past the 12 frames: skipped",
    ]
    assert control.frames[6, 30:50, 40:60, 0].mean() > 150  # the square's motion is drawn


def test_control_fills_only_generated_guide_frames(tmp_path):
    # a real encoded structure video, decoded by ffmpeg like any input
    path = tmp_path / "structure.mp4"
    path.write_bytes(encode_mp4(moving_square(9, dx=2), fps=16))
    guidance = parse_structure_guidance({"structure_type": "canny", "structure_video_path": str(path)})
    control = build_control_video(guidance, 9, 96, 64, 16, decode_video)
    assert control.frames.shape == (9, 64, 96, 3) and control.covered.all()

    anchor = np.full((64, 96, 3), 77, np.uint8)
    leading = np.full((2, 64, 96, 3), 33, np.uint8)
    guide, mask = build_vace_guide(9, 96, 64, leading, [(8, anchor)])
    guided = apply_control(guide, mask, control)
    assert (guided[:2] == 33).all() and (guided[8] == 77).all()  # kept frames untouched
    assert (guided[2:8] == control.frames[2:8]).all()  # generated frames now carry the edges
    shifted = apply_control(guide, mask, control, offset=5)
    assert (shifted[2:4] == control.frames[7:9]).all() and (shifted[4:8] == 127).all()  # past the end: grey


def test_precomputed_guidance_video_is_used_as_it_is():
    guidance = parse_structure_guidance(
        {
            "structure_type": "flow",
            "structure_guidance_video_url": "https://x/guidance.mp4",
            "structure_guidance_frame_offset": 3,
        }
    )
    assert guidance.videos == [] and guidance.precomputed_video == "https://x/guidance.mp4"
    control = build_control_video(guidance, 10, 48, 32, 16, lambda path: (numbered_video(8), 16.0))
    assert control.frames[:5, 5, 5, 0].tolist() == [30, 40, 50, 60, 70]  # no preprocessing, from frame 3
    assert control.covered.tolist() == [True] * 5 + [False] * 5 and (control.frames[5:] == 128).all()
    assert control.notes == [
        "precomputed guidance video has 8 frames: frames 5 to 9 after its offset are left neutral"
    ]
    nested = parse_structure_guidance(
        {"structure_guidance": {"videos": [], "_guidance_video_url": "g.mp4", "_frame_offset": 40}}
    )
    assert (nested.precomputed_video, nested.precomputed_offset) == ("g.mp4", 40)
    with_videos = parse_structure_guidance(
        {"structure_guidance": {"videos": [{"path": "a.mp4"}], "_guidance_video_url": "g.mp4"}}
    )
    assert with_videos.precomputed_video is None  # the videos are processed again: same control
    with pytest.raises(ValidationError) as error:
        parse_structure_guidance(
            {"structure_guidance_video_url": "g.mp4", "structure_guidance_frame_offset": "x"}
        )
    assert error.value.errors()[0]["loc"] == ("structure_guidance_frame_offset",)
