"""individual_travel_segment: one segment of a travel run resolved from orchestrator_details + overrides."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from dag.segment_plan import individual_segment_task, plan_individual_segment
from Wan2GP.params import parse_params

DETAILS = {
    "run_id": "tr1",
    "input_image_paths_resolved": ["a.png", "b.png", "c.png"],
    "base_prompts_expanded": ["walk", "run"],
    "negative_prompts_expanded": ["", "blur"],
    "segment_frames_expanded": [33, 29],
    "frame_overlap_expanded": [8],
    "parsed_resolution_wh": "64x48",
    "model_name": "vace_tiny",
    "seed_base": 7,
    "num_inference_steps": 4,
}
START = np.full((48, 64, 3), 30, np.uint8)
END = np.full((48, 64, 3), 220, np.uint8)


def test_segment_defaults_come_from_the_run():
    segment = plan_individual_segment({"orchestrator_details": DETAILS, "segment_index": 1})
    spec = segment.spec
    assert (spec.index, spec.frames, spec.prompt, spec.negative_prompt) == (1, 29, "run", "blur")
    assert spec.seed == 12345  # the original's seed_to_use default, not seed_base + index
    assert spec.overlap_in == 0  # standalone: no predecessor
    assert (segment.start_image, segment.end_image, segment.start_from_continued_video) == (
        "b.png",
        "c.png",
        False,
    )
    assert segment.filename == "tr1_seg01_output.mp4" and segment.mode == "vace" and segment.structure is None


def test_individual_params_win_over_task_and_run():
    segment = plan_individual_segment(
        {
            "full_orchestrator_payload": DETAILS,  # the legacy name of orchestrator_details
            "segment_index": 0,
            "base_prompt": "task prompt",
            "num_frames": 40,
            "seed_to_use": 9,
            "model_name": "vace_other",
            "individual_segment_params": {
                "num_frames": 20,
                "base_prompt": "fly",
                "start_image_url": "x.png",
                "end_image_url": "y.png",
                "additional_loras": {"style.safetensors": 0.5},
            },
        }
    )
    spec = segment.spec
    assert (spec.frames, spec.prompt, spec.seed) == (21, "fly", 9)  # 20 -> 4n+1 = 21
    assert (segment.start_image, segment.end_image) == ("x.png", "y.png")
    assert segment.plan.model == "vace_other"
    assert segment.plan.segment_params_extra["additional_loras"] == {"style.safetensors": 0.5}

    task_type, params = individual_segment_task(segment, START, END)
    vace = parse_params(task_type, params)
    assert (
        task_type == "vace" and vace.video_length == 21 and vace.seed == 9 and vace.num_inference_steps == 4
    )
    assert vace.video_guide.shape == (21, 48, 64, 3)
    assert (vace.video_guide[0] == 30).all() and (vace.video_guide[20] == 220).all()
    assert (
        (vace.video_mask[0] == 0).all()
        and (vace.video_mask[10] == 255).all()
        and (vace.video_mask[20] == 0).all()
    )


def test_image_list_and_continued_video_and_i2v():
    listed = plan_individual_segment(
        {
            "orchestrator_details": DETAILS,
            "individual_segment_params": {"input_image_paths_resolved": ["s.png", "e.png"]},
        }
    )
    assert (listed.start_image, listed.end_image) == ("s.png", "e.png")
    continued = plan_individual_segment(
        {
            "orchestrator_details": {
                **DETAILS,
                "continue_from_video_resolved_path": "prev.mp4",
                "input_image_paths_resolved": ["a.png", "b.png"],
            }
        }  # fmt: skip
    )
    assert (continued.start_image, continued.end_image, continued.start_from_continued_video) == (
        None,
        "a.png",
        True,
    )
    i2v = plan_individual_segment(
        {"orchestrator_details": {**DETAILS, "model_type": "i2v"}, "segment_index": 1}
    )
    task_type, params = individual_segment_task(i2v, START, END)
    flf = parse_params(task_type, params)
    assert task_type == "flf2v" and flf.video_length == 29 and flf.image_end.shape == (48, 64, 3)
    structured = plan_individual_segment(
        {"orchestrator_details": {**DETAILS, "structure_video_path": "m.mp4", "structure_type": "canny"}}
    )
    assert structured.structure.structure_type == "canny"


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"segment_index": 0}, ("orchestrator_details",)),
        ({"orchestrator_details": DETAILS, "segment_index": 2}, ("segment_index",)),
        ({"orchestrator_details": DETAILS, "use_svi": True}, ("use_svi",)),
        ({"orchestrator_details": {**DETAILS, "model_type": "ltxv"}}, ("orchestrator_details", "model_type")),
        ({"orchestrator_details": DETAILS, "individual_segment_params": {"num_frames": 2}},
         ("individual_segment_params", "num_frames")),
        ({"orchestrator_details": DETAILS, "individual_segment_params": {"start_image_url": "x.png"}},
         ("individual_segment_params", "end_image_url")),
        ({"orchestrator_details": DETAILS, "seed_to_use": "x"}, ("seed_to_use",)),
        ({"orchestrator_details": {**DETAILS, "parsed_resolution_wh": "big"}},
         ("orchestrator_details", "parsed_resolution_wh")),
        ({"full_orchestrator_payload": {**DETAILS, "segment_frames_expanded": [2000, 29]}},
         ("full_orchestrator_payload", "segment_frames_expanded", 0)),
        ({"orchestrator_details": DETAILS, "parsed_resolution_wh": "tiny"}, ("parsed_resolution_wh",)),
    ],
)  # fmt: skip
def test_bad_segment_params_name_the_field(params, loc):
    with pytest.raises(ValidationError) as error:
        plan_individual_segment(params)
    assert error.value.errors()[0]["loc"] == loc
