"""Joining clips with a VACE bridge: params, frame arithmetic, guide/mask and the splice (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from dag.join_plan import (
    GREY,
    JoinSettings,
    bridge_guide,
    bridge_params,
    join_child_payloads,
    parse_join_orchestrator,
    parse_join_segment,
    plan_bridge,
    prepare_clips,
    splice_bridge,
)
from Wan2GP.params import parse_params

H, W = 16, 24
GAP_LEVEL = 250


def clip(length: int, base: int) -> np.ndarray:
    """Frame i holds level base + i everywhere, so every frame can be traced through the join."""
    return np.stack([np.full((H, W, 3), base + i, np.uint8) for i in range(length)])


def levels(frames: np.ndarray) -> list[int]:
    return frames[:, 0, 0, 0].astype(int).tolist()


def fake_bridge(guide: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What a perfect VACE returns: kept frames reproduced, generated frames new (a known level)."""
    generated = (mask == 255).all(axis=(1, 2))
    bridge = guide.copy()
    bridge[generated] = GAP_LEVEL
    return bridge


def test_insert_mode_keeps_both_clips_and_adds_the_gap():
    settings = JoinSettings(context_frame_count=8, gap_frame_count=50)
    spec = plan_bridge(30, 25, settings)
    # 8 + 50 + 8 = 66 is not 4n+1: the gap gives one frame, the context stays whole
    assert (spec.context_before, spec.gap, spec.context_after, spec.total) == (8, 49, 8, 65)
    assert spec.quantization_shift == 1 and (spec.total - 1) % 4 == 0
    a, b = clip(30, 0), clip(25, 100)
    guide, mask = bridge_guide(a, b, spec, W, H)
    assert guide.shape == (65, H, W, 3) and mask.shape == (65, H, W)
    assert levels(guide[:8]) == list(range(22, 30))  # the end of A
    assert levels(guide[57:]) == list(range(100, 108))  # the start of B
    assert (guide[8:57] == GREY).all()
    assert (mask[:8] == 0).all() and (mask[8:57] == 255).all() and (mask[57:] == 0).all()

    joined = splice_bridge(a, b, fake_bridge(guide, mask), spec)
    assert len(joined) == spec.joined_frames == 30 + 25 + 49
    assert levels(joined) == list(range(30)) + [GAP_LEVEL] * 49 + list(range(100, 125))


def test_replace_mode_swaps_boundary_frames_for_the_gap():
    spec = plan_bridge(30, 25, JoinSettings(context_frame_count=8, gap_frame_count=13, replace_mode=True))
    assert (spec.total, spec.gap, spec.gap_from_a, spec.gap_from_b) == (29, 13, 6, 7)
    a, b = clip(30, 0), clip(25, 100)
    guide, mask = bridge_guide(a, b, spec, W, H)
    assert levels(guide[:8]) == list(range(16, 24))  # context just before A's removed last 6 frames
    assert levels(guide[21:]) == list(range(107, 115))  # context just after B's removed first 7 frames
    joined = splice_bridge(a, b, fake_bridge(guide, mask), spec)
    assert len(joined) == spec.joined_frames == 30 + 25  # same length: frames replaced, not inserted
    assert levels(joined) == list(range(24)) + [GAP_LEVEL] * 13 + list(range(107, 125))


def test_replace_mode_with_a_short_clip_shifts_the_gap_and_shortens_its_context():
    spec = plan_bridge(5, 25, JoinSettings(context_frame_count=8, gap_frame_count=13, replace_mode=True))
    # A keeps one frame: 1 context frame before; 1 + 13 + 8 = 22 quantizes to 21, so the gap is 12
    assert (spec.context_before, spec.gap, spec.context_after) == (1, 12, 8)
    assert (spec.gap_from_a, spec.gap_from_b) == (4, 8)
    a, b = clip(5, 0), clip(25, 100)
    joined = splice_bridge(a, b, fake_bridge(*bridge_guide(a, b, spec, W, H)), spec)
    assert len(joined) == spec.joined_frames == 30
    assert levels(joined) == [0] + [GAP_LEVEL] * 12 + list(range(108, 125))


def test_keep_bridging_images_pins_the_boundary_frames_inside_the_gap():
    spec = plan_bridge(
        20, 20, JoinSettings(context_frame_count=4, gap_frame_count=9, keep_bridging_images=True)
    )
    assert spec.anchors == ((3, "a"), (6, "b"))
    guide, mask = bridge_guide(clip(20, 0), clip(20, 100), spec, W, H)
    assert levels(guide[4 + 3 : 4 + 4]) == [19] and levels(guide[4 + 6 : 4 + 7]) == [100]
    assert (mask[4 + 3] == 0).all() and (mask[4 + 6] == 0).all() and (mask[4 + 4] == 255).all()


def test_bridge_takes_the_output_size_and_the_splice_checks_lengths():
    spec = plan_bridge(12, 12, JoinSettings(context_frame_count=2, gap_frame_count=5))
    big_b = np.full((12, 32, 48, 3), 60, np.uint8)  # another size: cropped and resized to the bridge's
    guide, mask = bridge_guide(clip(12, 0), big_b, spec, W, H)
    assert guide.shape[1:3] == (H, W)
    joined = splice_bridge(clip(12, 0), big_b, fake_bridge(guide, mask), spec)
    assert joined.shape == (spec.joined_frames, H, W, 3)
    with pytest.raises(ValueError, match="the bridge has 5 frames, the plan expects 9"):
        splice_bridge(clip(12, 0), big_b, guide[:5], spec)
    with pytest.raises(ValueError, match="plan was made for 12 and 12"):
        bridge_guide(clip(11, 0), big_b, spec, W, H)


@pytest.mark.parametrize(
    ("lengths", "settings", "loc", "words"),
    [
        ((5, 20), {"context_frame_count": 8}, ("context_frame_count",), "starting video has only 5"),
        ((20, 20), {"context_frame_count": 1, "gap_frame_count": 1}, ("gap_frame_count",), "4n+1"),
        ((3, 3), {"context_frame_count": 2, "gap_frame_count": 9, "replace_mode": True}, ("gap_frame_count",),
         "videos too short"),
        ((900, 900), {"context_frame_count": 400, "gap_frame_count": 400}, ("gap_frame_count",), "at most 1025"),
    ],
)  # fmt: skip
def test_impossible_joins_name_the_field(lengths, settings, loc, words):
    with pytest.raises(ValidationError) as error:
        plan_bridge(*lengths, JoinSettings(**settings))
    assert error.value.errors()[0]["loc"] == loc and words in str(error.value)


def test_join_segment_params():
    segment, extras = parse_join_segment(
        {"starting_video_path": "a.mp4", "ending_video_path": "b.mp4", "num_inference_steps": 6, "seed": 3}
    )
    assert (segment.context_frame_count, segment.gap_frame_count, segment.replace_mode) == (8, 53, False)
    assert extras == {"num_inference_steps": 6} and segment.seed == 3
    chained, _ = parse_join_segment(
        {"ending_video_path": "c.mp4", "orchestrator_task_id_ref": "o", "join_index": 1}
    )
    assert chained.starting_video_path is None
    for params, loc in [
        ({"ending_video_path": "b.mp4"}, ("starting_video_path",)),
        ({"starting_video_path": "a.mp4"}, ("ending_video_path",)),
        ({"starting_video_path": "a", "ending_video_path": "b", "aspect_ratio": "wide"}, ("aspect_ratio",)),
        (
            {"starting_video_path": "a", "ending_video_path": "b", "context_frame_count": 0},
            ("context_frame_count",),
        ),
        (
            {"starting_video_path": "a", "ending_video_path": "b", "num_inference_steps": "many"},
            ("num_inference_steps",),
        ),
        ({"starting_video_path": "a", "ending_video_path": "b", "resolution": "big"}, ("resolution",)),
    ]:
        with pytest.raises(ValidationError) as error:
            parse_join_segment(params)
        assert error.value.errors()[0]["loc"] == loc


def test_join_orchestrator_chains_one_join_per_pair():
    plan = parse_join_orchestrator(
        {
            "orchestrator_details": {
                "run_id": "run1",
                "clip_list": [{"url": "a.mp4", "name": "intro"}, {"url": "b.mp4"}, {"url": "c.mp4"}],
                "gap_frame_count": 21,
                "per_join_settings": [{}, {"prompt": "fly away", "gap_frame_count": 13}],
                "vid2vid_init_strength": 0.5,
                "enhance_prompt": True,
                "guidance_scale": 4.0,
            }
        }
    )
    assert [j.prompt for j in plan.joins] == ["smooth transition", "fly away"]
    assert [j.gap_frame_count for j in plan.joins] == [21, 13]
    assert plan.ignored == ("vid2vid_init_strength", "enhance_prompt")
    rows = join_child_payloads(plan, "orch-1", "proj-1")
    assert [(r["starting_video_path"], r["ending_video_path"]) for r in rows] == [
        ("a.mp4", "b.mp4"),
        (None, "c.mp4"),
    ]
    assert [(r["is_first_join"], r["is_last_join"], r["join_index"]) for r in rows] == [
        (True, False, 0),
        (False, True, 1),
    ]
    assert rows[1]["orchestrator_task_id_ref"] == "orch-1" and rows[1]["guidance_scale"] == 4.0
    # each row is a valid join_clips_segment task
    assert [parse_join_segment(r)[0].gap_frame_count for r in rows] == [21, 13]

    looped = parse_join_orchestrator({"orchestrator_details": {"run_id": "r", "clip_list": [{"url": "a.mp4"}],
                                                               "loop_first_clip": True}})  # fmt: skip
    assert [c.name for c in looped.clips] == ["clip_0", "clip_0_reversed"] and looped.loop_first_clip
    for details, loc in [
        ({"clip_list": [{"url": "a"}, {"url": "b"}]}, ("orchestrator_details", "run_id")),
        ({"run_id": "r", "clip_list": [{"url": "a"}]}, ("orchestrator_details", "clip_list")),
        ({"run_id": "r", "clip_list": [{"url": "a"}, {"name": "b"}]}, ("orchestrator_details", "clip_list", 1, "url")),
        ({"run_id": "r", "clip_list": [{"url": "a"}, {"url": "b"}], "per_join_settings": [{"gap_frame_count": -1}]},
         ("orchestrator_details", "per_join_settings", 0, "gap_frame_count")),
        ({"run_id": "r", "clip_list": [{"url": "a"}, {"url": "b"}], "context_frame_count": 0,
          "per_join_settings": [{"prompt": "x"}]}, ("orchestrator_details", "context_frame_count")),
    ]:  # fmt: skip
        with pytest.raises(ValidationError) as error:
            parse_join_orchestrator({"orchestrator_details": details})
        assert error.value.errors()[0]["loc"] == loc


def test_prepare_clips_resamples_crops_and_picks_the_resolution():
    a = np.zeros((30, 64, 64, 3), np.uint8)
    b = np.zeros((60, 64, 64, 3), np.uint8)
    prepared = prepare_clips(a, 30.0, b, 60.0, JoinSettings(aspect_ratio="16:9"))
    assert prepared.fps == 16 and len(prepared.clip_a) == 16 and len(prepared.clip_b) == 16
    assert prepared.clip_a.shape[1:3] == (36, 64) and (prepared.width, prepared.height) == (64, 36)
    own = prepare_clips(a, 30.0, b, 60.0, JoinSettings(use_input_video_fps=True, resolution="48x32"))
    assert own.fps == 30.0 and len(own.clip_a) == 30 and len(own.clip_b) == 30
    assert (own.width, own.height) == (48, 32)


def test_bridge_params_are_a_valid_vace_task():
    settings = JoinSettings(
        context_frame_count=2, gap_frame_count=5, prompt="dissolve", seed=9, model="vace_tiny"
    )
    spec = plan_bridge(10, 10, settings)
    guide, mask = bridge_guide(clip(10, 0), clip(10, 50), spec, W, H)
    params = bridge_params(spec, settings, guide, mask, 16.0, {"num_inference_steps": 4})
    vace = parse_params("vace", params)
    assert vace.video_length == spec.total == 9
    assert vace.video_guide.shape == (9, H, W, 3) and vace.video_mask.shape == (9, H, W, 3)
    assert params["video_prompt_type"] == "VM" and params["model"] == "vace_tiny"
    assert vace.num_inference_steps == 4 and vace.seed == 9
