"""The new task types' plans run through the real engine on the tiny random-weight VACE model."""

from __future__ import annotations

import numpy as np
import pytest

from dag.edit_plan import parse_inpaint, run_inpaint
from dag.join_plan import JoinSettings, run_join
from Wan2GP.control import VaceControlParams, prepare_vace_control
from Wan2GP.structure import apply_control, build_control_video, parse_structure_guidance
from Wan2GP.video import build_vace_guide, decode_video, mask_to_video

# The engine fixtures (tiny models built once per session) live in tests/engine_fixtures.py.
pytest_plugins = ["engine_fixtures"]


def smooth_clip(frames: int, level: int, height: int = 32, width: int = 32) -> np.ndarray:
    """A slowly brightening flat clip: survives H.264 round trips within a few levels."""
    return np.stack([np.full((height, width, 3), level + 2 * i, np.uint8) for i in range(frames)])


def mean_level(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


@pytest.fixture(scope="module")
def generate(engine):
    def run(task_type: str, params: dict) -> np.ndarray:
        return decode_video(engine.generate(task_type, {**params, "num_inference_steps": 2}).data)[0]

    return run


def test_join_bridge_generated_by_vace_and_spliced(generate):
    a, b = smooth_clip(12, 40), smooth_clip(12, 160)
    result = run_join(
        a, 16.0, b, 16.0, JoinSettings(context_frame_count=2, gap_frame_count=6, seed=1), {}, generate
    )
    assert result.spec.total == 9 and result.spec.gap == 5  # 2 + 6 + 2 = 10 -> 9 frames, the gap gives one
    assert len(result.bridge) == 9
    assert result.frames.shape == (12 + 12 + 5, 32, 32, 3)
    levels = mean_level(result.frames)
    assert np.abs(levels[:10] - mean_level(a)[:10]).max() < 1.5  # A untouched before its context
    assert np.abs(levels[-10:] - mean_level(b)[-10:]).max() < 1.5  # B untouched after its context


def test_inpaint_range_regenerated_by_vace(generate):
    video = smooth_clip(24, 60)
    params, extras = parse_inpaint(
        {
            "video_path": "v.mp4",
            "inpaint_start_frame": 8,
            "inpaint_end_frame": 13,
            "context_frame_count": 4,
            "seed": 3,
        }  # fmt: skip
    )
    result = run_inpaint(video, 16.0, params, extras, generate)
    assert result.spec.total == 13 and len(result.bridge) == 13
    assert result.frames.shape == video.shape  # same length: the range was replaced
    levels = mean_level(result.frames)
    assert np.abs(levels[:4] - mean_level(video)[:4]).max() < 1.5
    assert np.abs(levels[17:] - mean_level(video)[17:]).max() < 1.5


def test_structure_and_control_letters_feed_vace(generate, tmp_path):
    frames = np.zeros((9, 32, 32, 3), np.uint8)
    for t in range(9):
        frames[t, 8:24, 2 + 2 * t : 10 + 2 * t] = 220  # a bar moving right
    guidance = parse_structure_guidance({"structure_type": "canny", "structure_video_path": "bar.mp4"})
    control = build_control_video(guidance, 9, 32, 32, 16, lambda path: (frames, 16.0))
    guide, mask = build_vace_guide(9, 32, 32, None, [(0, frames[0]), (8, frames[8])])
    structured = apply_control(guide, mask, control)
    plain_out = generate(
        "vace", {"prompt": "bar", "seed": 5, "video_guide": guide, "video_mask": mask_to_video(mask)}
    )
    structured_out = generate(
        "vace", {"prompt": "bar", "seed": 5, "video_guide": structured, "video_mask": mask_to_video(mask)}
    )
    assert plain_out.shape == structured_out.shape == (9, 32, 32, 3)
    # the edges condition VACE (the tiny random model reacts weakly, but deterministically)
    assert np.abs(plain_out.astype(int) - structured_out.astype(int)).mean() > 0.05

    prepared = prepare_vace_control(
        frames, None, 48, 32, VaceControlParams(video_prompt_type="VE", video_guide_outpainting="0 0 25 25")
    )
    out = generate("vace", {"prompt": "bar", "seed": 5, "resolution": "48x32", "video_guide": prepared.guide,
                            "video_mask": mask_to_video(prepared.mask)})  # fmt: skip
    assert out.shape == (9, 32, 48, 3)
