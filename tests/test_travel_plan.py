"""Travel planning without Ray: payload parsing, segment plan, guide/mask content, stitching, post chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dag.travel_plan import (
    SegmentSpec,
    TravelPlan,
    final_filename,
    parse_travel,
    plan_segments,
    plan_summary,
    segment_filename,
    segment_guide,
    segment_params,
    stitch_piece,
    stitch_pieces,
    stitch_segments,
)
from Wan2GP.params import VaceParams
from Wan2GP.video import MASK_GENERATE, MASK_KEEP, fade, fit_resolution, stitch, upscale

W, H = 32, 24

# The engine fixtures (tiny models built once per session) live in tests/engine_fixtures.py.
pytest_plugins = ["engine_fixtures"]


def native(**overrides) -> dict:
    payload = {
        "run_id": "run1",
        "images": ["a.png", "b.png", "c.png"],
        "prompt": "a cat",
        "frames": 17,
        "overlap": 4,
        "resolution": f"{W}x{H}",
        "seed": 7,
    }
    payload.update(overrides)
    return payload


def original(**overrides) -> dict:
    details = {
        "run_id": "run1",
        "input_image_paths_resolved": ["a.png", "b.png", "c.png"],
        "num_new_segments_to_generate": 2,
        "base_prompts_expanded": ["a cat", "a cat"],
        "negative_prompts_expanded": ["", ""],
        "segment_frames_expanded": [17, 17],
        "frame_overlap_expanded": [4, 4],
        "parsed_resolution_wh": f"{W}x{H}",
        "model_name": None,
        "seed_base": 7,
        "fps_helpers": 16,
        "fade_in_params_json_str": json.dumps(
            {"low_point": 0.0, "high_point": 1.0, "curve_type": "ease_in_out", "duration_factor": 0.0}
        ),
        "fade_out_params_json_str": json.dumps(
            {"low_point": 0.0, "high_point": 1.0, "curve_type": "ease_in_out", "duration_factor": 0.0}
        ),
        "main_output_dir_for_run": None,
    }
    details.update(overrides)
    return {"orchestrator_details": details}


def error_loc(payload: dict) -> tuple:
    with pytest.raises(ValidationError) as info:
        parse_travel(payload)
    return info.value.errors()[0]["loc"]


def solid(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, H, W, 3), value, dtype=np.uint8)


def anchor_images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def test_both_payload_forms_parse_to_the_same_plan():
    # the original form's default overlap mode is its newest one ("context"); the native form's "shared"
    assert parse_travel(native(overlap_mode="context")) == parse_travel(original())
    assert parse_travel(native()) == parse_travel(original(overlap_mode="shared"))
    plan = parse_travel(native())
    assert plan.segment_frames == [17, 17]
    assert plan.overlaps == [4]
    assert (plan.width, plan.height) == (W, H)
    assert plan.total_frames == 30


def test_original_payload_keys_map_to_plan_fields():
    plan = parse_travel(
        original(
            model_name="vace_tiny",
            continue_from_video_resolved_path=None,
            colour_match_videos=True,
            after_first_post_generation_saturation=0.8,
            after_first_post_generation_brightness=1.1,
            fade_in_params_json_str=json.dumps({"duration_factor": 0.1}),
            fade_out_params_json_str=json.dumps({"duration_factor": 0.2}),
            apply_causvid=True,
            additional_loras={"style.safetensors": 0.7},
            upscale_factor=2.0,
            crossfade_sharp_amt=0.3,
            show_input_images=True,
            debug_mode_enabled=True,
            skip_cleanup_enabled=True,
            main_output_dir_for_run="/tmp/out",
            params_json_str_override='{"steps": 4}',
        )
    )
    assert plan.model == "vace_tiny"
    assert plan.post.colour_match and plan.post.show_input_images
    assert (plan.post.saturation, plan.post.brightness) == (0.8, 1.1)
    assert (plan.post.fade_in, plan.post.fade_out) == (0, 0)  # the original's guide fades: not applied
    # the original upscales only with an upscale_model_name: upscale_factor alone is reported ignored
    assert plan.post.upscale_factor is None and plan.post.crossfade_sharpness == 0.3
    assert plan.debug and plan.skip_cleanup
    assert set(plan.ignored_params) == {
        "main_output_dir_for_run", "upscale_factor", "fade_in_params_json_str", "fade_out_params_json_str",
    }  # fmt: skip
    assert plan.segment_params_extra == {
        "use_causvid_lora": True,
        "additional_loras": {"style.safetensors": 0.7},
        "num_inference_steps": 4,
    }


def test_original_upscale_zero_means_off_and_guide_fades_are_reported_not_applied():
    plan = parse_travel(original(upscale_factor=0.0, fade_in_params_json_str="5"))
    assert plan.post.upscale_factor is None and "upscale_factor" not in plan.ignored_params
    assert plan.post.fade_in == 0 and "guide videos" in plan.ignored_params["fade_in_params_json_str"]
    assert parse_travel(original()).ignored_params == {}  # duration_factor 0 (what clients send) asks nothing


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        (native(images=[]), ("images",)),
        (native(images=None), ("images",)),
        (native(images=["only-one.png"], num_segments=2), ("num_segments",)),  # one image: one segment
        (native(model_type="t2v"), ("model_type",)),
        (native(overlap_mode="after"), ("overlap_mode",)),
        (native(chain_segments=False, fade_in=4), ("fade_in",)),  # nothing is stitched to fade
        (native(model_type="i2v", upscale_factor=2.0), ("upscale_factor",)),
        (original(model_type="flf2v"), ("orchestrator_details", "model_type")),
        (native(prompt=None, prompts=["a", "b", "c"]), ("prompts",)),
        (native(frames=0), ("frames", 0)),
        (native(frames=[17, -3]), ("frames", 1)),
        (native(frames=2), ("frames", 0)),  # quantizes to 1 frame: no room for two anchors
        (native(overlap=-2), ("overlap", 0)),
        (native(resolution="abc"), ("resolution",)),
        (native(resolution=None), ("resolution",)),
        (native(seed="x"), ("seed",)),
        (native(num_inference_steps=0), ("num_inference_steps",)),
        (native(run_id="../etc"), ("run_id",)),
        (original(input_image_paths_resolved=[]), ("orchestrator_details", "input_image_paths_resolved")),
        (original(base_prompts_expanded=["a", "b", "c"]), ("orchestrator_details", "base_prompts_expanded")),
        (original(segment_frames_expanded=[17, 0]), ("orchestrator_details", "segment_frames_expanded", 1)),
        (original(parsed_resolution_wh="abc"), ("orchestrator_details", "parsed_resolution_wh")),
        (original(num_new_segments_to_generate=5), ("orchestrator_details", "num_new_segments_to_generate")),
        (original(fade_in_params_json_str="{not json"), ("orchestrator_details", "fade_in_params_json_str")),
        (original(params_json_str_override='{"steps": 0}'), ("orchestrator_details", "num_inference_steps")),
    ],
)
def test_bad_payloads_name_the_field(payload, loc):
    assert error_loc(payload) == loc


def test_bad_payload_message_says_the_problem():
    with pytest.raises(ValidationError) as info:
        parse_travel(native(prompt=None, prompts=["a", "b", "c"]))
    assert "3 values for 2 segments" in str(info.value)


def test_run_id_defaults_to_the_given_one():
    payload = native()
    del payload["run_id"]
    assert parse_travel(payload, default_run_id="task-42").run_id == "task-42"


def test_plan_summary_states_expected_counts():
    lines = plan_summary(parse_travel(native()))
    assert len(lines) == 3
    assert "expected final 30 frames" in lines[0]
    assert lines[2].startswith("segment 1: 17 frames (timeline 13-29), 4 leading frames kept")


def test_filenames():
    assert segment_filename("run1", 3) == "run1_seg03_output.mp4"
    assert final_filename("run1") == "run1_final.mp4"


# ---------------------------------------------------------------------------------------------------------
# Planner properties
# ---------------------------------------------------------------------------------------------------------

frame_counts = st.integers(min_value=4, max_value=200)


@st.composite
def travel_payloads(draw) -> dict:
    segments = draw(st.integers(min_value=1, max_value=6))
    frames = draw(st.one_of(frame_counts, st.lists(frame_counts, min_size=segments, max_size=segments)))
    overlap = draw(
        st.one_of(
            st.integers(0, 250),
            st.lists(st.integers(0, 250), min_size=max(segments - 1, 1), max_size=max(segments - 1, 1)),
        )
    )
    return native(
        images=[f"img{i}.png" for i in range(segments + 1)],
        frames=frames,
        overlap=overlap,
        chain_segments=draw(st.booleans()),
    )


@settings(max_examples=200, deadline=None)
@given(travel_payloads())
def test_planner_properties(payload):
    plan = parse_travel(payload)
    n = len(payload["images"]) - 1
    raw_frames = payload["frames"] if isinstance(payload["frames"], list) else [payload["frames"]] * n
    raw_overlaps = (
        payload["overlap"] if isinstance(payload["overlap"], list) else [payload["overlap"]] * (n - 1)
    )

    # single values expand to one per segment / boundary
    assert plan.num_segments == n == len(plan.prompts) == len(plan.negative_prompts)
    assert len(plan.overlaps) == n - 1
    # quantization to 4n+1
    assert plan.segment_frames == [(f // 4) * 4 + 1 for f in raw_frames]
    assert all(f % 4 == 1 for f in plan.segment_frames)
    # overlaps even, capped at the shorter neighbour, and never above what was asked
    for i, overlap in enumerate(plan.overlaps):
        assert overlap % 2 == 0
        assert overlap <= min(plan.segment_frames[i], plan.segment_frames[i + 1])
        assert overlap <= raw_overlaps[i]
        assert overlap >= min(raw_overlaps[i], plan.segment_frames[i], plan.segment_frames[i + 1]) - 1

    specs = plan_segments(plan)
    if plan.chain_segments:  # the native default: "shared" overlaps
        assert plan.total_frames == sum(plan.segment_frames) - sum(plan.overlaps)
    else:  # unstitched: the output is the last segment's clip
        assert plan.total_frames == plan.segment_frames[-1]
    assert specs[0].start == 0 and specs[-1].end == plan.timeline_frames
    for spec in specs:
        assert spec.end - spec.start == spec.frames
        assert spec.seed == plan.seed_base + spec.index
        # every anchor placement lies inside the segment and after the leading frames
        for frame_index, anchor in spec.anchors:
            assert spec.overlap_in <= frame_index < spec.frames
            assert 0 <= anchor < len(plan.anchors)
        # segment i ends on anchor i + 1, at the last frame
        assert spec.anchors[-1] == (spec.frames - 1, spec.index + 1)
        if plan.chain_segments and spec.index > 0:
            assert spec.overlap_in == plan.overlaps[spec.index - 1]
            assert specs[spec.index - 1].end - spec.start == spec.overlap_in
        else:
            assert spec.overlap_in == 0
            assert spec.anchors[0] == (0, spec.index)


def test_continue_from_video_plan():
    plan = parse_travel(
        native(images=["b.png", "c.png"], continue_from_video="/tmp/v.mp4", overlap=4, continue_overlap=7)
    )
    assert plan.num_segments == 2 and plan.continue_overlap == 6 and plan.overlaps == [4]
    first, second = plan_segments(plan)
    assert first.overlap_in == 6 and first.anchors == ((16, 0),)
    assert second.overlap_in == 4 and second.anchors == ((16, 1),)
    # the original reuses frame_overlap_expanded[0] for the continued video's boundary
    plan = parse_travel(
        original(
            input_image_paths_resolved=["b.png", "c.png"],
            continue_from_video_resolved_path="/tmp/v.mp4",
            frame_overlap_expanded=[8, 2],
        )
    )
    assert plan.continue_overlap == 8 and plan.overlaps == [8]
    # independent mode: later segments start from their own anchor, segment 0 still from the video
    plan = parse_travel(
        native(images=["b.png", "c.png"], continue_from_video="/tmp/v.mp4", chain_segments=False)
    )
    first, second = plan_segments(plan)
    assert first.overlap_in == 4 and first.anchors == ((16, 0),)
    assert second.overlap_in == 0 and second.anchors == ((0, 0), (16, 1))


# ---------------------------------------------------------------------------------------------------------
# Guide and mask content
# ---------------------------------------------------------------------------------------------------------


def test_chained_guide_starts_with_previous_frames_and_ends_on_anchor():
    plan = parse_travel(native())
    spec = plan_segments(plan)[1]
    anchors = anchor_images(3)
    previous = np.random.default_rng(0).integers(0, 256, (17, H, W, 3), dtype=np.uint8)
    guide, mask = segment_guide(plan, spec, previous, anchors)

    assert guide.shape == (17, H, W, 3) and mask.shape == (17, H, W)
    np.testing.assert_array_equal(guide[:4], previous[-4:])
    np.testing.assert_array_equal(guide[-1], anchors[2])
    assert np.all(guide[4:-1] == 127)
    keep = [t for t in range(17) if np.all(mask[t] == MASK_KEEP)]
    generate = [t for t in range(17) if np.all(mask[t] == MASK_GENERATE)]
    assert keep == [0, 1, 2, 3, 16]
    assert generate == list(range(4, 16))


def test_first_and_independent_guides_hold_both_anchors():
    for chained in (True, False):
        plan = parse_travel(native(chain_segments=chained))
        anchors = anchor_images(3)
        specs = plan_segments(plan)
        targets = [specs[0]] if chained else specs
        for spec in targets:
            guide, mask = segment_guide(plan, spec, None, anchors)
            np.testing.assert_array_equal(guide[0], anchors[spec.index])
            np.testing.assert_array_equal(guide[-1], anchors[spec.index + 1])
            assert np.all(mask[0] == MASK_KEEP) and np.all(mask[-1] == MASK_KEEP)
            assert np.all(mask[1:-1] == MASK_GENERATE)


def test_guide_needs_the_previous_clip_when_chained():
    plan = parse_travel(native())
    with pytest.raises(ValueError, match="previous_clip"):
        segment_guide(plan, plan_segments(plan)[1], None, anchor_images(3))


def test_segment_params_are_valid_vace_params():
    plan = parse_travel(native(model="vace_tiny", negative_prompt="blur", num_inference_steps=3))
    spec = plan_segments(plan)[0]
    guide, mask = segment_guide(plan, spec, None, anchor_images(3))
    params = segment_params(plan, spec, guide, mask)
    assert params["video_length"] == 17 and params["seed"] == 7 and params["resolution"] == f"{W}x{H}"
    assert params["model"] == "vace_tiny" and params["negative_prompt"] == "blur"
    parsed = VaceParams.model_validate(params)
    assert parsed.num_inference_steps == 3
    assert parsed.video_guide.shape == (17, H, W, 3)
    np.testing.assert_array_equal(parsed.video_mask[..., 0], mask)


# ---------------------------------------------------------------------------------------------------------
# Stitching and post chain
# ---------------------------------------------------------------------------------------------------------


def clips_for(plan: TravelPlan, values: list[int] | None = None) -> list[np.ndarray]:
    values = values or [60 + 40 * i for i in range(plan.num_segments)]
    return [solid(v, f) for v, f in zip(values, plan.segment_frames, strict=True)]


def test_stitch_length_is_sum_minus_overlaps():
    plan = parse_travel(native(images=["a", "b", "c", "d"], frames=[17, 21, 13], overlap=[6, 8]))
    video = stitch_segments(plan, clips_for(plan), None)
    assert len(video) == plan.total_frames == 17 + 21 + 13 - 6 - 8
    # outside the overlaps each clip is copied unchanged; inside, frames blend between the two clips
    assert np.all(video[:11] == 60) and np.all(video[-5:] == 140)
    assert 60 < video[12, 0, 0, 0] < 100


def test_stitch_with_continued_video_prepends_it():
    plan = parse_travel(native(images=["b", "c"], continue_from_video="/v.mp4", overlap=4))
    continued = solid(10, 9)
    video = stitch_segments(plan, clips_for(plan), None, continued=continued)
    assert len(video) == 9 + plan.total_frames - plan.continue_overlap
    assert np.all(video[:5] == 10)


def whole_stitch(plan: TravelPlan, clips, anchors, continued=None) -> np.ndarray:
    """The stitched video made in one go from the primitives (the reference for the pieces)."""
    from dag.travel_plan import adjust_clip, colour_reference

    post = plan.post
    references = None
    if post.colour_match:
        references = [colour_reference(plan, anchors, i, continued) for i in range(plan.num_segments)]
    adjusted = [
        adjust_clip(plan, i, clip, references[i] if references else None, continued is not None)
        for i, clip in enumerate(clips)
    ]
    overlaps = list(plan.overlaps)
    if continued is not None:
        height, width = clips[0].shape[1:3]
        fitted = (
            continued
            if continued.shape[1:3] == (height, width)
            else fit_resolution(continued, width, height, "crop")
        )
        adjusted, overlaps = [fitted, *adjusted], [min(plan.continue_overlap, len(continued)), *overlaps]
    video = stitch(adjusted, overlaps, sharpness=post.crossfade_sharpness)
    video = fade(video, post.fade_in, post.fade_out)
    return upscale(video, post.upscale_factor) if post.upscale_factor else video


STITCHES = {
    "plain": {},
    "no overlap": {"overlap": 0},
    "short middle clip (its two cross-fades meet)": {"frames": [17, 9, 17], "overlap": [6, 4]},
    "a piece too short to join alone": {"frames": [17, 5, 17], "overlap": [4, 4]},
    "long fades over several pieces": {"frames": [9, 13, 9], "overlap": [2, 4], "fade_in": 11, "fade_out": 12},
    "post chain": {"saturation": 0.4, "brightness": 0.3, "colour_match": True, "crossfade_sharpness": 0.7,
                   "upscale_factor": 1.5, "fade_out": 5},
    "context overlaps": {"overlap_mode": "context", "overlap": [6, 5]},
    "continued": {"images": ["b", "c", "d"], "continue_from_video": "/v.mp4", "continue_overlap": 4},
    "continued, no overlap, colour match": {"images": ["b", "c", "d"], "continue_from_video": "/v.mp4",
                                            "continue_overlap": 0, "colour_match": True, "fade_in": 3},
}  # fmt: skip


@pytest.mark.parametrize("case", list(STITCHES))
def test_stitch_pieces_make_exactly_the_whole_stitched_video(case):
    payload = native(images=["a", "b", "c", "d"], frames=[17, 13, 17], overlap=[4, 6])
    payload.update(STITCHES[case])
    plan = parse_travel(payload)
    rng = np.random.default_rng(3)
    clips = [rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8) for n in plan.generated_frames]
    anchors = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in plan.anchors]
    continued = rng.integers(0, 256, (11, H + 8, W, 3), dtype=np.uint8) if plan.continue_from_video else None
    expected = whole_stitch(plan, clips, anchors, continued)

    pieces = stitch_pieces(plan, None if continued is None else len(continued))
    # The pieces tile the video, each made from no clips but its own (and those reaching into it).
    assert [p.start for p in pieces] == [0, *(p.end for p in pieces[:-1])]
    assert pieces[-1].end == pieces[-1].total == len(expected)
    made = [stitch_piece(plan, p, [clips[i] for i in p.segments], anchors, continued) for p in pieces]
    assert [len(m) for m in made] == [p.frames for p in pieces]
    np.testing.assert_array_equal(np.concatenate(made), expected)
    np.testing.assert_array_equal(stitch_segments(plan, clips, anchors, continued), expected)


def test_a_chain_s_piece_needs_only_its_clip_and_the_one_it_fades_from():
    plan = parse_travel(native(images=["a", "b", "c", "d"], frames=[17, 13, 17], overlap=[4, 0]))
    pieces = stitch_pieces(plan)
    # Clip 1 starts at 13 (cross-fading 4 frames out of clip 0); clip 2 at 26, with no cross-fade.
    assert [(p.start, p.end, p.segments, p.overlaps) for p in pieces] == [
        (0, 13, (0,), ()), (13, 26, (0, 1), (4,)), (26, 43, (2,), ()),
    ]  # fmt: skip
    assert pieces[1].skip == 13
    # Clip 1 of 5 frames starts 1 frame before clip 2: that 1-frame piece goes with clip 2's.
    plan = parse_travel(native(images=["a", "b", "c", "d"], frames=[17, 5, 17], overlap=[4, 4]))
    assert [(p.start, p.end, p.segments) for p in stitch_pieces(plan)] == [(0, 13, (0,)), (13, 31, (0, 1, 2))]
    # A continued video goes with segment 0's piece (every piece has a clip to take its size from).
    plan = parse_travel(native(images=["b", "c"], continue_from_video="/v.mp4", continue_overlap=4))
    first, second = stitch_pieces(plan, continued_frames=11)
    assert (first.start, first.end, first.continued, first.segments) == (0, 7 + 13, True, (0,))
    assert (second.continued, second.segments) == (False, (0, 1))
    with pytest.raises(ValueError, match="continued is required"):
        stitch_piece(plan, first, [solid(1, 17)], None)
    with pytest.raises(ValueError, match=r"clips\[0\] has 9 frames, the plan expects 17"):
        stitch_piece(plan, first, [solid(1, 9)], None, continued=solid(2, 11))
    with pytest.raises(ValueError, match="not stitched"):
        stitch_pieces(parse_travel(native(chain_segments=False)))


PHASES = {
    "num_phases": 2,
    "steps_per_phase": [3, 3],
    "flow_shift": 5,
    "sample_solver": "euler",
    "model_switch_phase": 1,
    "phases": [
        {
            "phase": 1,
            "guidance_scale": 1,
            "loras": [{"url": "https://h.example/high.safetensors", "multiplier": "1.2"}],
        },
        {
            "phase": 2,
            "guidance_scale": 1,
            "loras": [{"url": "https://h.example/low.safetensors", "multiplier": "1.0"}],
        },
    ],
}


def test_original_keys_not_read_are_reported_or_refused():
    plan = parse_travel(
        original(
            frame_overlap_expanded=[0, 0],
            steps=6,
            shot_id="s1",
            enhance_prompt=False,
            use_uni3c=False,
            independent_segments=True,
            phase_config=PHASES,
            my_key=1,
        )
    )
    assert not plan.chain_segments  # the original's older name, inverted
    assert plan.segment_params_extra["phase_config"] == PHASES  # every segment runs these phases
    assert set(plan.ignored_params) == {"steps", "shot_id", "enhance_prompt", "use_uni3c", "my_key"}
    assert "timeline steps" in plan.ignored_params["steps"]
    assert plan.ignored_params["my_key"] == "unknown key: not a parameter of travel_orchestrator"
    assert parse_travel(original(independent_segments=True, chain_segments=True)).chain_segments
    # (structure_* keys are honoured by travel: the VACE control video, tests/test_newtypes_e2e.py)
    for key, value in [("use_uni3c", True), ("enhance_prompt", True)]:
        assert error_loc(original(**{key: value})) == ("orchestrator_details", key)
    assert error_loc(original(upscale_factor=2.0, upscale_model_name="realesrgan")) == (
        "orchestrator_details",
        "upscale_model_name",
    )
    assert parse_travel(native(upscale_factor=2.0)).post.upscale_factor == 2.0  # native: Lanczos
    assert error_loc(original(phase_config={"num_phases": 2})) == (
        "orchestrator_details",
        "phase_config",
        "phases",
    )


def test_colour_match_pulls_every_segment_toward_its_own_anchors():
    plan = parse_travel(native(colour_match=True, overlap=0))
    anchors = [np.full((H, W, 3), v, dtype=np.uint8) for v in (40, 200, 120)]
    rng = np.random.default_rng(1)
    clips = [np.clip(rng.normal(90, 20, (17, H, W, 3)), 0, 255).astype(np.uint8) for _ in range(2)]
    video = stitch_segments(plan, clips, anchors)
    # Segment 0 runs from anchor 0 (dark) to anchor 1 (bright); segment 1 from anchor 1 to anchor 2.
    assert abs(video[0].mean() - 40) < 8 and abs(video[16].mean() - 200) < 8
    assert abs(video[17].mean() - 200) < 8 and abs(video[33].mean() - 120) < 8
    with pytest.raises(ValueError, match="anchors are required"):
        stitch_segments(plan, clips, None)
    with pytest.raises(ValueError, match="anchors has 1 images"):
        stitch_segments(plan, clips, anchors[:1])


def test_colour_match_of_a_continued_run_starts_from_the_continued_video():
    plan = parse_travel(native(images=["b", "c"], continue_from_video="/v.mp4", overlap=0, colour_match=True))
    anchors = [np.full((H, W, 3), v, dtype=np.uint8) for v in (200, 120)]
    continued = solid(30, 9)
    video = stitch_segments(plan, clips_for(plan, [90, 90]), anchors, continued=continued)
    assert np.all(video[:9] == 30)  # the continued video is left as it is
    assert abs(video[9].mean() - 30) < 8 and abs(video[9 + 16].mean() - 200) < 8


def test_brightness_and_saturation_apply_after_the_first_segment():
    # brightness is an additive delta: 0 (what clients send by default) leaves every frame unchanged
    plan = parse_travel(native(overlap=0, brightness=0))
    video = stitch_segments(plan, [solid(200, 17), solid(200, 17)], None)
    assert np.all(video == 200)
    plan = parse_travel(native(overlap=0, brightness=-0.5))
    video = stitch_segments(plan, [solid(200, 17), solid(200, 17)], None)
    assert np.all(video[:17] == 200) and np.all(video[17:] == 100)
    colourful = np.zeros((17, H, W, 3), dtype=np.uint8)
    colourful[..., 0] = 200
    plan = parse_travel(native(overlap=0, saturation=0.0))
    video = stitch_segments(plan, [colourful, colourful], None)
    np.testing.assert_array_equal(video[:17], colourful)
    assert (video[17:].max(axis=-1).astype(int) - video[17:].min(axis=-1) <= 1).all()  # grey


def test_brightness_applies_to_every_new_segment_of_a_continued_run():
    plan = parse_travel(native(images=["b", "c"], continue_from_video="/v.mp4", overlap=0, brightness=-0.5))
    video = stitch_segments(plan, clips_for(plan, [200, 200]), None, continued=solid(200, 9))
    assert np.all(video[:9] == 200) and np.all(video[9:] == 100)


def test_post_process_bounds_follow_the_original():
    assert parse_travel(original(after_first_post_generation_brightness=-0.3)).post.brightness == -0.3
    plan = parse_travel(original())
    assert (plan.post.brightness, plan.post.saturation) == (0.0, 1.0)
    assert error_loc(original(after_first_post_generation_brightness=-2)) == (
        "orchestrator_details",
        "after_first_post_generation_brightness",
    )
    assert error_loc(original(after_first_post_generation_saturation=4)) == (
        "orchestrator_details",
        "after_first_post_generation_saturation",
    )


def test_fades_and_upscale():
    plan = parse_travel(native(fade_in=4, fade_out=3, upscale_factor=2.0))
    video = stitch_segments(plan, clips_for(plan, [200, 200]), None)
    assert video.shape == (plan.total_frames, 2 * H, 2 * W, 3)
    assert np.all(video[0] == 0) and np.all(video[-1] == 0)  # the fade colour is black
    assert np.all(video[plan.total_frames // 2] == 200)


def test_stitch_rejects_wrong_clip_lengths():
    plan = parse_travel(native())
    with pytest.raises(ValueError, match=r"clips\[1\] has 5 frames"):
        stitch_segments(plan, [solid(0, 17), solid(0, 5)], None)


def test_segment_spec_is_picklable():
    import pickle

    spec = plan_segments(parse_travel(native()))[0]
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert isinstance(spec, SegmentSpec)


# ---------------------------------------------------------------------------------------------------------
# With the real engine (tiny VACE model): the plan's params run and chain as planned
# ---------------------------------------------------------------------------------------------------------


def test_chained_travel_runs_on_the_tiny_vace_engine(engine):
    from Wan2GP.video import decode_video

    plan = parse_travel(native(resolution="32x32", frames=9, overlap=4, num_inference_steps=2))
    anchors = [np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8) for i in range(3)]
    clips: list[np.ndarray] = []
    for spec in plan_segments(plan):
        previous = clips[-1] if clips else None
        guide, mask = segment_guide(plan, spec, previous, anchors)
        if previous is not None:
            np.testing.assert_array_equal(guide[: spec.overlap_in], previous[-spec.overlap_in :])
        artifact = engine.generate("vace", segment_params(plan, spec, guide, mask))
        assert artifact.metadata["seed"] == spec.seed
        clip, _ = decode_video(artifact.data)
        assert clip.shape == (spec.frames, 32, 32, 3)
        clips.append(clip)
    video = stitch_segments(plan, clips, anchors[0])
    assert video.shape == (9 + 9 - 4, 32, 32, 3) == (plan.total_frames, 32, 32, 3)
