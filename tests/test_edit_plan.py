"""Video editing plans: inpaint_frames (range regeneration + splice) and edit_video_orchestrator keepers."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from dag.edit_plan import (
    edit_join_payloads,
    inpaint_clips,
    keeper_segments,
    parse_edit_video_orchestrator,
    parse_inpaint,
    plan_inpaint,
    source_frame_count,
)
from dag.join_plan import bridge_guide, parse_join_segment, plan_bridge, splice_bridge

H, W = 8, 12
GAP_LEVEL = 250


def numbered(length: int, base: int = 0) -> np.ndarray:
    return np.stack([np.full((H, W, 3), base + i, np.uint8) for i in range(length)])


def levels(frames: np.ndarray) -> list[int]:
    return frames[:, 0, 0, 0].astype(int).tolist()


def fake_vace(guide: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A perfect VACE: kept frames come back as they were, generated frames are new (a known level)."""
    out = guide.copy()
    out[(mask == 255).all(axis=(1, 2))] = GAP_LEVEL
    return out


def inpaint(**params):
    return parse_inpaint({"video_path": "v.mp4", **params})[0]


def test_inpaint_regenerates_exactly_the_range_and_keeps_the_length():
    params = inpaint(inpaint_start_frame=20, inpaint_end_frame=31, context_frame_count=8)
    spec = plan_inpaint(60, params)
    # 8 + 11 + 8 = 27 is not 4n+1: two more context frames after the range make 29
    assert (spec.context_before, spec.gap, spec.context_after, spec.total) == (8, 11, 10, 29)
    video = numbered(60)
    before, after = inpaint_clips(video, params)
    guide, mask = bridge_guide(before, after, spec, W, H)
    assert levels(guide[:8]) == list(range(12, 20)) and levels(guide[19:]) == list(range(31, 41))
    assert (mask[8:19] == 255).all() and (mask[:8] == 0).all() and (mask[19:] == 0).all()
    result = splice_bridge(before, after, fake_vace(guide, mask), spec)
    assert len(result) == 60
    assert levels(result) == list(range(20)) + [GAP_LEVEL] * 11 + list(range(31, 60))


def test_inpaint_shrinks_the_context_when_the_video_has_no_spare_frames():
    spec = plan_inpaint(32, inpaint(inpaint_start_frame=8, inpaint_end_frame=24, context_frame_count=8))
    assert (spec.context_before, spec.gap, spec.context_after, spec.total) == (8, 16, 5, 29)
    video = numbered(32)
    before, after = video[:8], video[24:]
    result = splice_bridge(before, after, fake_vace(*bridge_guide(before, after, spec, W, H)), spec)
    assert levels(result) == list(range(8)) + [GAP_LEVEL] * 16 + list(range(24, 32))


@pytest.mark.parametrize(
    ("total", "params", "loc", "words"),
    [
        (60, {"inpaint_start_frame": 5, "inpaint_end_frame": 20}, ("inpaint_start_frame",), "only 5 exist"),
        (60, {"inpaint_start_frame": 20, "inpaint_end_frame": 55}, ("inpaint_end_frame",), "only 5 exist"),
        (60, {"inpaint_start_frame": 20, "inpaint_end_frame": 70}, ("inpaint_end_frame",), "exceeds"),
        (
            2000,
            {"inpaint_start_frame": 10, "inpaint_end_frame": 1100},
            ("inpaint_end_frame",),
            "1025 generated",
        ),
    ],
)
def test_inpaint_range_needs_context_on_both_sides(total, params, loc, words):
    with pytest.raises(ValidationError) as error:
        plan_inpaint(total, inpaint(**params))
    assert error.value.errors()[0]["loc"] == loc and words in str(error.value)


def test_inpaint_params_name_the_field():
    params, extras = parse_inpaint(
        {"video_path": "v.mp4", "inpaint_start_frame": 10, "inpaint_end_frame": 20, "guidance_scale": 5}
    )
    assert params.context_frame_count == 8 and params.seed == -1 and extras == {"guidance_scale": 5}
    for bad, loc in [
        ({"inpaint_start_frame": 10, "inpaint_end_frame": 10}, ("inpaint_end_frame",)),
        ({"inpaint_start_frame": -1, "inpaint_end_frame": 10}, ("inpaint_start_frame",)),
        ({"inpaint_end_frame": 10}, ("inpaint_start_frame",)),
        (
            {"inpaint_start_frame": 1, "inpaint_end_frame": 10, "context_frame_count": 0},
            ("context_frame_count",),
        ),
    ]:
        with pytest.raises(ValidationError) as error:
            parse_inpaint({"video_path": "v.mp4", **bad})
        assert error.value.errors()[0]["loc"] == loc
    with pytest.raises(ValidationError) as error:
        parse_inpaint({"inpaint_start_frame": 1, "inpaint_end_frame": 10})
    assert error.value.errors()[0]["loc"] == ("video_path",)


def edit(**details):
    base = {"run_id": "edit1", "source_video_url": "https://x/v.mp4", "source_video_total_frames": 164}
    return parse_edit_video_orchestrator({"orchestrator_details": {**base, **details}})


def test_keepers_are_the_frames_between_portions():
    portions = [{"start_frame": 49, "end_frame": 66}, {"start_frame": 16, "end_frame": 33, "prompt": "jump"}]
    plan = edit(portions_to_regenerate=portions)
    assert [p.start_frame for p in plan.portions] == [16, 49]  # sorted
    assert keeper_segments(plan, 164) == [(0, 15), (34, 48), (67, 163)]  # the original's example
    anchored = edit(portions_to_regenerate=portions, replace_mode=True)
    assert keeper_segments(anchored, 164) == [(0, 16), (33, 49), (66, 163)]  # portion ends kept as anchors
    assert [j.prompt for j in plan.joins] == ["jump", "smooth transition"]
    assert all(not j.replace_mode for j in anchored.joins)  # keepers are joined by INSERT


def test_edit_run_joins_keepers_with_generated_gaps():
    plan = edit(
        portions_to_regenerate=[
            {"start_frame": 16, "end_frame": 33, "gap_frame_count": 17},
            {"start_frame": 49, "end_frame": 66, "gap_frame_count": 9},
        ],
        context_frame_count=4,
    )
    video = numbered(164)
    keepers = [video[a : b + 1] for a, b in keeper_segments(plan, 164)]
    rows = edit_join_payloads(plan, ["k0.mp4", "k1.mp4", "k2.mp4"], "orch-9", "proj")
    assert [(r["starting_video_path"], r["ending_video_path"], r["gap_frame_count"]) for r in rows] == [
        ("k0.mp4", "k1.mp4", 17),
        (None, "k2.mp4", 9),
    ]
    # run the chain with a perfect fake VACE: each join takes the previous result as its start
    joined = keepers[0]
    for row, following in zip(rows, keepers[1:], strict=True):
        settings, _ = parse_join_segment({**row, "starting_video_path": "previous.mp4"})
        spec = plan_bridge(len(joined), len(following), settings)
        joined = splice_bridge(
            joined, following, fake_vace(*bridge_guide(joined, following, spec, W, H)), spec
        )
    # 4 + 17 + 4 = 25 and 4 + 9 + 4 = 17 are 4n+1: the gaps are kept whole
    assert len(joined) == 16 + 15 + 97 + 17 + 9
    assert levels(joined) == list(range(16)) + [GAP_LEVEL] * 17 + list(range(34, 49)) + [
        GAP_LEVEL
    ] * 9 + list(range(67, 164))


@pytest.mark.parametrize(
    ("portions", "loc", "words"),
    [
        ([{"start_frame": 10, "end_frame": 20}, {"start_frame": 20, "end_frame": 30}],
         ("orchestrator_details", "portions_to_regenerate", 1, "start_frame"), "overlaps"),
        ([{"start_frame": 20, "end_frame": 10}], ("orchestrator_details", "portions_to_regenerate", 0, "end_frame"),
         "inclusive"),
        ([], ("orchestrator_details", "portions_to_regenerate"), "1 to 32"),
        ([{"start_frame": 5}], ("orchestrator_details", "portions_to_regenerate", 0, "end_frame"), "required"),
    ],
)  # fmt: skip
def test_bad_portions_name_the_field(portions, loc, words):
    with pytest.raises(ValidationError) as error:
        edit(portions_to_regenerate=portions)
    assert error.value.errors()[0]["loc"] == loc and words in str(error.value)


def test_portions_need_kept_frames_around_them():
    touching_start = edit(portions_to_regenerate=[{"start_frame": 0, "end_frame": 10}])
    with pytest.raises(ValidationError, match="kept frames on both sides"):
        keeper_segments(touching_start, 164)
    past_end = edit(portions_to_regenerate=[{"start_frame": 100, "end_frame": 170}])
    with pytest.raises(ValidationError, match="past the video's 164 frames"):
        keeper_segments(past_end, 164)


def test_join_setting_errors_name_the_run_key_or_the_override():
    portions = [{"start_frame": 10, "end_frame": 20}]
    with pytest.raises(ValidationError) as error:
        edit(portions_to_regenerate=portions, context_frame_count="x")
    assert error.value.errors()[0]["loc"] == ("orchestrator_details", "context_frame_count")
    with pytest.raises(ValidationError) as error:
        edit(portions_to_regenerate=portions, per_join_settings=[{"seed": -5}])
    assert error.value.errors()[0]["loc"] == ("orchestrator_details", "per_join_settings", 0, "seed")


def test_declared_frame_count_is_trusted_within_three_frames():
    plan = edit(portions_to_regenerate=[{"start_frame": 10, "end_frame": 20}])
    assert source_frame_count(plan, 162) == 164
    assert source_frame_count(plan, 150) == 150
    with pytest.raises(ValidationError) as error:
        parse_edit_video_orchestrator({"orchestrator_details": {"run_id": "r", "portions_to_regenerate": []}})
    assert error.value.errors()[0]["loc"] == ("orchestrator_details", "source_video_url")
