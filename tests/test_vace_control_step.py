"""The VACE control keys prepared before the generation (dag/vace_control.py), Ray-free, real OpenCV."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from dag.vace_control import (
    ControlFailed,
    check_vace_control,
    control_requested,
    prepare_vace_params,
    run_vace_control,
)
from Wan2GP.video import encode_mp4


def bar_video() -> np.ndarray:
    frames = np.zeros((9, 48, 64, 3), np.uint8)
    for t in range(9):
        frames[t, 12:36, 4 + 3 * t : 20 + 3 * t] = 220
    return frames


def test_only_letters_beyond_the_input_flags_ask_for_preparation():
    assert not control_requested({"video_prompt_type": "VA"}) and not control_requested({})
    assert control_requested({"video_prompt_type": "EV"}) and control_requested({"mask_expand": 2})
    assert control_requested({"video_guide_outpainting": "0 0 20 20"})


def test_canny_letter_turns_the_guide_into_edges_and_consumes_the_keys():
    params = {"prompt": "x", "video_guide": encode_mp4(bar_video(), fps=16), "video_prompt_type": "EVQ",
              "resolution": "64x48"}  # fmt: skip
    ready, report = prepare_vace_params(params)
    guide = ready["video_guide"]
    assert guide.shape == (9, 48, 64, 3) and "video_prompt_type" not in ready
    assert guide.mean() < 40 and guide.max() == 255  # white edges on black
    assert guide[4, 24, 30].max() == 0  # inside the bar: no edge
    assert report["control_process"] == "canny" and report["ignored_letters"] == "Q"


def test_outpainting_puts_the_frame_in_a_generated_border():
    params = {"prompt": "x", "video_guide": bar_video(), "video_guide_outpainting": "0 0 50 50",
              "resolution": "64x48"}  # fmt: skip
    ready, _ = prepare_vace_params(params)
    mask = ready["video_mask"][..., 0]
    assert mask[:, :, 0].min() == 255 and mask[:, :, -1].min() == 255  # borders generated
    assert mask[:, 24, 32].max() == 0  # the original area kept


@pytest.mark.parametrize(("letters", "needle"), [("SV", "scribble"), ("DV", "depth"), ("vm", "capital")])
def test_letters_that_cannot_be_honoured_are_refused_naming_the_key(letters: str, needle: str):
    with pytest.raises(ValidationError, match=needle) as caught:
        check_vace_control({"video_guide": "g.mp4", "video_prompt_type": letters})
    assert caught.value.errors()[0]["loc"] == ("video_prompt_type",)
    with pytest.raises(ControlFailed, match="video_prompt_type"):
        run_vace_control({"prompt": "x", "video_guide": bar_video(), "video_prompt_type": letters})
