"""Travel variants without Ray: a single anchor image, model_type i2v, unstitched runs (chain_segments
false), and the "context" overlap mode (the original's newest frame rule) against the "shared" one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dag.segment_plan import individual_segment_task, plan_individual_segment
from dag.travel_plan import (
    image_segment_task,
    parse_travel,
    plan_segments,
    segment_guide,
    step_task_type,
    stitch_segments,
    validate,
)
from Wan2GP.params import parse_params
from Wan2GP.video import MASK_GENERATE, MASK_KEEP

W, H = 32, 24


def native(**overrides) -> dict:
    payload = {"run_id": "v1", "images": ["a.png", "b.png", "c.png"], "prompt": "a cat", "frames": 17,
               "overlap": 4, "resolution": f"{W}x{H}", "seed": 7}  # fmt: skip
    payload.update(overrides)
    return payload


def original(**overrides) -> dict:
    details = {
        "run_id": "v1",
        "input_image_paths_resolved": ["a.png", "b.png", "c.png"],
        "num_new_segments_to_generate": 2,
        "base_prompts_expanded": ["a cat", "a cat"],
        "negative_prompts_expanded": ["", ""],
        "segment_frames_expanded": [17, 17],
        "frame_overlap_expanded": [4, 4],
        "parsed_resolution_wh": f"{W}x{H}",
        "model_name": "tiny",
        "seed_base": 7,
    }
    details.update(overrides)
    return {"orchestrator_details": details}


def error_loc(payload: dict) -> tuple:
    with pytest.raises(ValidationError) as info:
        parse_travel(payload)
    return info.value.errors()[0]["loc"]


def images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(count)]


def clips_for(plan) -> list[np.ndarray]:
    """One clip per segment, of the frame count each generates, each frame holding its segment's value."""
    return [np.full((f, H, W, 3), 40 * (i + 1), np.uint8) for i, f in enumerate(plan.generated_frames)]


# --- a single anchor image ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        native(images=["a.png"]),
        original(
            input_image_paths_resolved=["a.png"],
            num_new_segments_to_generate=1,
            base_prompts_expanded=["a cat"],
            negative_prompts_expanded=[""],
            segment_frames_expanded=[17],
            frame_overlap_expanded=[4],
        ),
    ],  # fmt: skip
)
def test_single_image_is_one_segment_starting_on_it_with_no_end(payload: dict):
    plan = parse_travel(payload)
    assert plan.num_segments == 1 and plan.overlaps == [] and plan.stitched
    assert plan.total_frames == 17
    [spec] = plan_segments(plan)
    assert spec.anchors == ((0, 0),) and spec.overlap_in == 0  # no end image: the model ends freely
    guide, mask = segment_guide(plan, spec, None, images(1))
    assert (mask[0] == MASK_KEEP).all() and (mask[1:] == MASK_GENERATE).all()
    assert np.array_equal(guide[0], images(1)[0]) and step_task_type(plan) == "vace"
    out = stitch_segments(plan, clips_for(plan), images(1))
    assert len(out) == 17


def test_single_image_i2v_is_plain_image_to_video():
    plan = parse_travel(native(images=["a.png"], model_type="i2v"))
    assert step_task_type(plan) == "i2v" and not plan.stitched
    [spec] = plan_segments(plan)
    task_type, params = image_segment_task(plan, spec, images(1)[0], None)
    parsed = parse_params(task_type, params)
    assert task_type == "i2v" and parsed.video_length == 17 and "image_end" not in params
    # individual_travel_segment of a one-image run: the same single image journey
    details = original(input_image_paths_resolved=["a.png"], num_new_segments_to_generate=1,
                       base_prompts_expanded=["x"], negative_prompts_expanded=[""],
                       segment_frames_expanded=[13])["orchestrator_details"]  # fmt: skip
    for mode, expected in (("vace", "vace"), ("i2v", "i2v")):
        segment = plan_individual_segment({"orchestrator_details": {**details, "model_type": mode}})
        assert (segment.start_image, segment.end_image) == ("a.png", None)
        task_type, params = individual_segment_task(segment, images(1)[0], None)
        assert task_type == expected and parse_params(task_type, params).video_length == 13
        if mode == "vace":
            mask = params["video_mask"][..., 0]
            assert (mask[0] == MASK_KEEP).all() and (mask[-1] == MASK_GENERATE).all()


# --- model_type i2v -------------------------------------------------------------------------------------


def test_i2v_segments_are_independent_first_last_frame_clips():
    plan = parse_travel(original(model_type="i2v", chain_segments=True, crossfade_sharp_amt=0.3))
    assert plan.mode == "i2v" and not plan.stitched and step_task_type(plan) == "flf2v"
    # the original chains only VACE segments; overlaps have nothing to join: reported, not silently dropped
    assert set(plan.ignored_params) == {"chain_segments", "frame_overlap_expanded", "crossfade_sharp_amt"}
    first, second = plan_segments(plan)
    assert plan.generated_frames == [17, 17] and plan.total_frames == 17  # the last segment's clip
    assert first.anchors == ((0, 0), (16, 1)) and second.anchors == ((0, 1), (16, 2))
    assert first.overlap_in == second.overlap_in == 0
    a, b, c = images(3)
    task_type, params = image_segment_task(plan, second, b, c)
    parsed = parse_params(task_type, params)
    assert task_type == "flf2v" and parsed.video_length == 17 and parsed.seed == 8
    assert params["model"] == "tiny" and np.array_equal(params["image_end"], c)
    with pytest.raises(ValueError, match="not stitched"):
        stitch_segments(plan, clips_for(plan), images(3))


def test_i2v_continued_video_starts_from_its_last_frame():
    plan = parse_travel(native(images=["b.png"], model_type="i2v", continue_from_video="/tmp/v.mp4",
                               continue_overlap=8))  # fmt: skip
    [spec] = plan_segments(plan)
    assert spec.start_from_video and spec.anchors == ((16, 0),) and plan.continue_overlap == 0
    assert "continue_overlap" in plan.ignored_params


def test_i2v_refuses_structure_guidance_naming_model_type():
    payload = original(model_type="i2v", structure_video_path="m.mp4", structure_type="canny")
    with pytest.raises(ValidationError) as info:
        validate(payload)
    assert info.value.errors()[0]["loc"] == ("orchestrator_details", "model_type")
    assert validate(original(structure_video_path="m.mp4", structure_type="canny"))  # vace: honoured


# --- chain_segments false -------------------------------------------------------------------------------


def test_unstitched_run_outputs_the_last_segment_and_reports_what_it_does_not_use():
    plan = parse_travel(native(chain_segments=False, frames=[17, 13], crossfade_sharpness=2.0))
    assert not plan.stitched and plan.generated_frames == [17, 13] and plan.total_frames == 13
    assert set(plan.ignored_params) == {"overlap", "crossfade_sharpness"}
    # every segment holds both its anchors (independent), none takes frames from another
    assert [s.anchors for s in plan_segments(plan)] == [((0, 0), (16, 1)), ((0, 1), (12, 2))]
    # the native form's fades and upscale apply to a stitched video: refused, naming the key
    for key, value in (("fade_out", 3), ("upscale_factor", 2.0)):
        assert error_loc(native(chain_segments=False, **{key: value})) == (key,)
    # the original form's fades never applied (guide fades), so nothing to refuse
    fade = json.dumps({"duration_factor": 0.1})
    plan = parse_travel(original(chain_segments=False, fade_in_params_json_str=fade))
    assert "fade_in_params_json_str" in plan.ignored_params and plan.total_frames == 17
    # no overlap to report when none was asked
    assert parse_travel(native(chain_segments=False, overlap=0)).ignored_params == {}


# --- overlap modes --------------------------------------------------------------------------------------


def test_context_mode_adds_the_overlap_to_later_segments():
    plan = parse_travel(original())  # the original's newest default
    assert plan.overlap_mode == "context" and plan.overlaps == [4]
    assert plan.generated_frames == [17, 21] and plan.total_frames == 17 + 17  # Σ segment frames
    first, second = plan_segments(plan)
    assert (second.frames, second.overlap_in, second.start, second.end) == (21, 4, 13, 34)
    out = stitch_segments(plan, clips_for(plan), images(3))
    assert len(out) == 34
    # a 6-frame overlap: 17 + 6 = 23 rounds down to 21 (4n+1), as the original does
    plan = parse_travel(original(frame_overlap_expanded=[6]))
    assert plan.generated_frames == [17, 21] and plan.total_frames == 17 + 21 - 6
    # the old rule on request, and the native form's default
    for payload in (original(overlap_mode="shared"), native()):
        plan = parse_travel(payload)
        assert plan.overlap_mode == "shared" and plan.generated_frames == [17, 17] and plan.total_frames == 30
    assert parse_travel(native(overlap_mode="context")).total_frames == 17 * 2


def test_context_mode_guide_keeps_the_previous_frames_then_generates_to_the_anchor():
    plan = parse_travel(native(overlap_mode="context", overlap=8))
    _, second = plan_segments(plan)
    previous = np.stack([np.full((H, W, 3), v, np.uint8) for v in range(17)])
    anchors = images(3)
    guide, mask = segment_guide(plan, second, previous, anchors)
    assert len(guide) == 25  # 17 + 8 context frames
    assert np.array_equal(guide[:8], previous[-8:]) and (mask[:8] == MASK_KEEP).all()
    assert (mask[8:-1] == MASK_GENERATE).all() and np.array_equal(guide[-1], anchors[2])


def test_individual_segment_of_a_context_run_generates_the_frames_asked():
    details = original()["orchestrator_details"]
    segment = plan_individual_segment({"orchestrator_details": details, "segment_index": 1})
    assert segment.spec.frames == 17  # standalone: no predecessor, so no context frames


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(5, 90), min_size=1, max_size=5),
    st.integers(0, 40),
    st.sampled_from(["shared", "context"]),
    st.booleans(),
)
def test_frame_counts_follow_the_mode(frames: list[int], overlap: int, mode: str, chained: bool):
    plan = parse_travel(native(images=[f"i{k}.png" for k in range(len(frames) + 1)], frames=frames,
                               overlap=overlap, overlap_mode=mode, chain_segments=chained))  # fmt: skip
    specs = plan_segments(plan)
    assert [s.frames for s in specs] == plan.generated_frames
    assert all(f % 4 == 1 for f in plan.generated_frames)
    if not chained:
        assert plan.generated_frames == plan.segment_frames
        assert plan.total_frames == plan.segment_frames[-1]
        return
    assert plan.total_frames == sum(plan.generated_frames) - sum(plan.overlaps)
    assert specs[-1].end == plan.total_frames
    if mode == "shared":
        assert plan.generated_frames == plan.segment_frames
    else:  # Σ frames, less 2 for each overlap that is not a multiple of 4
        short = sum(2 for o in plan.overlaps if o % 4)
        assert plan.total_frames == sum(plan.segment_frames) - short
    clips = [np.zeros((f, 2, 2, 3), np.uint8) for f in plan.generated_frames]
    assert len(stitch_segments(plan, clips, None)) == plan.total_frames


ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.text(max_size=8),
                st.sampled_from(["vace", "i2v", "shared", "context", "true"]))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 4),
    st.fixed_dictionaries(
        {},
        optional={
            k: ODD
            for k in (
                "model_type",
                "overlap_mode",
                "chain_segments",
                "fade_in",
                "upscale_factor",
                "continue_from_video",
                "num_segments",
                "overlap",
                "crossfade_sharpness",
            )
        },
    ),  # fmt: skip
    st.booleans(),
)
def test_any_mix_of_variant_keys_parses_or_names_a_key(count: int, extra: dict, as_original: bool):
    payload = native(images=[f"i{k}.png" for k in range(count)], **extra)
    if as_original:
        payload = {"orchestrator_details": {**original()["orchestrator_details"], **extra,
                                            "input_image_paths_resolved": payload["images"]}}  # fmt: skip
        payload["orchestrator_details"].pop("num_new_segments_to_generate")
        payload["orchestrator_details"].pop("base_prompts_expanded")
        payload["orchestrator_details"]["base_prompts_expanded"] = "a cat"
        payload["orchestrator_details"]["negative_prompts_expanded"] = ""
        payload["orchestrator_details"]["segment_frames_expanded"] = 17
    try:
        plan = parse_travel(payload)
    except ValidationError as error:
        assert error.errors()[0]["loc"]  # names a key
        return
    specs = plan_segments(plan)
    assert len(specs) == plan.num_segments and plan.total_frames >= 5
    assert (plan.mode == "vace" and plan.chain_segments) == plan.stitched
    if not plan.stitched:
        assert plan.total_frames == plan.segment_frames[-1] and plan.post.fade_in == 0


def test_post_time_work_check_resolves_the_i2v_step_model():
    """At POST the work limit asks the step model for its default steps: an i2v run's model is an
    image-to-video one (flf2v), which a VACE lookup would refuse."""
    from deployments.config import TINY_DEFAULT_MODELS
    from deployments.errors import InvalidTask
    from deployments.routing import Routing
    from storage import InputFetcher
    from Wan2GP.catalog import Catalog

    models = {key: model for group in TINY_DEFAULT_MODELS.values() for key, model in group.items()}
    routing = Routing(Catalog.load(None), models, InputFetcher([]), ["T2V", "VACE"])
    i2v = native(model_type="i2v", model="tiny-flf2v")
    assert routing.route("travel_orchestrator", i2v).task_type.name == "travel_orchestrator"
    single = native(images=["a.png"], model_type="i2v", model="tiny-i2v")
    assert routing.route("travel_orchestrator", single).task_type.name == "travel_orchestrator"
    with pytest.raises(InvalidTask, match="params.model: model 'tiny-flf2v' is a flf2v model"):
        routing.route("travel_orchestrator", native(model="tiny-flf2v"))  # a VACE run on an flf2v model
