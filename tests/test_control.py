"""VACE control preparation: video_prompt_type letters, mask_expand and video_guide_outpainting."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from dag.pose import detect_pose, render_pose
from Wan2GP.control import (
    VaceControlParams,
    expand_mask,
    outpaint_frame_location,
    prepare_vace_control,
    read_letters,
)
from Wan2GP.structure import canny_edges

RNG = np.random.default_rng(3)
GUIDE = RNG.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
MASK = np.zeros((3, 32, 48), np.uint8)
MASK[:, 8:24, 12:36] = 255  # generate the middle


def prepare(letters: str, mask=MASK, guide=GUIDE, width=48, height=32, **params):
    return prepare_vace_control(
        guide, mask, width, height, VaceControlParams(video_prompt_type=letters, **params)
    )


def test_letters_follow_wan2gp():
    letters = read_letters("VMIG")
    assert letters.process == "inpaint" and letters.outside is None
    assert letters.uses_guide and letters.uses_refs and not letters.uses_mask
    assert letters.ignored == "G"
    assert read_letters("VAEX").process == "canny" and read_letters("VAEX").outside == "inpaint"
    assert read_letters("VLD").process == "flow"  # the first guide-process letter wins
    assert read_letters("").process == "raw"


def test_vm_inpaints_the_masked_area():
    result = prepare("VM")
    inside = MASK == 255
    assert (result.guide[inside] == 127).all()  # generated area: flat inpaint grey
    assert (result.guide[~inside] == GUIDE[~inside]).all()  # kept area: the original pixels
    assert (result.mask == MASK).all()
    assert result.process == "inpaint" and result.ignored == ""


def test_canny_without_a_mask_is_a_control_signal_everywhere():
    result = prepare("VE", mask=None)
    assert result.mask is None
    assert (result.guide == canny_edges(GUIDE)).all()


def test_outside_process_turns_the_whole_frame_to_generate():
    result = prepare("VAEX")
    inside = MASK == 255
    assert (result.guide[inside] == canny_edges(GUIDE)[inside]).all()
    assert (result.guide[~inside] == 127).all()
    assert (result.mask == 255).all()


def test_identity_keeps_every_frame_and_negate_flips_the_mask():
    kept = prepare("UV")
    assert (kept.mask == 0).all() and (kept.guide == GUIDE).all()
    flipped = prepare("VMN")
    assert (flipped.mask == 255 - MASK).all()
    assert (flipped.guide[MASK == 0] == 127).all()  # now the border is generated


def test_bounding_box_letter():
    ring = np.zeros((1, 32, 48), np.uint8)
    ring[0, 5, 10] = ring[0, 20, 30] = 255
    result = prepare("VMH", mask=ring, guide=GUIDE[:1])
    assert (result.mask[0, 5:21, 10:31] == 255).all() and result.mask[0].sum() // 255 == 16 * 21


def test_mask_expand_grows_and_shrinks_like_wan2gp():
    point = np.zeros((1, 41, 41), np.uint8)
    point[0, 20, 20] = 255
    grown = expand_mask(point, 5)  # ellipse of 5 px applied three times: radius 6
    assert grown[0, 20].sum() // 255 == 13 and grown[0, 20, 14] == 255 and grown[0, 20, 13] == 0
    square = np.zeros((1, 40, 40), np.uint8)
    square[0, 10:30, 10:30] = 255
    rows, cols = np.nonzero(expand_mask(square, -5)[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 23, 16, 23)
    assert (expand_mask(square, 0) == square).all()

    result = prepare("VM", mask_expand=3)
    assert result.mask.sum() > MASK.sum()  # the generated area grew
    assert (result.mask[MASK == 255] == 255).all()
    note = prepare("VE", mask=None, mask_expand=3)
    assert note.notes == ["mask_expand has no effect without a video_mask"]


def test_outpainting_places_the_frame_and_generates_the_border():
    assert outpaint_frame_location(64, 96, (0, 0, 25, 25)) == (64, 64, 0, 16)
    assert outpaint_frame_location(100, 100, (10, 30, 0, 50)) == (71, 66, 7, 0)
    result = prepare("V", mask=None, width=96, height=64, video_guide_outpainting="0 0 25 25")
    assert result.guide.shape == (3, 64, 96, 3) and result.mask.shape == (3, 64, 96)
    assert (result.guide[:, :, :16] == 127).all() and (result.guide[:, :, 80:] == 127).all()
    assert (result.mask[:, :, :16] == 255).all() and (result.mask[:, :, 80:] == 255).all()
    assert (result.mask[:, :, 16:80] == 0).all()  # the original area is kept
    inner = result.guide[:, :, 16:80].astype(int)
    assert abs(inner.mean() - GUIDE.mean()) < 3  # the guide, resized into the inner area

    masked = prepare("VM", width=96, height=64, video_guide_outpainting=[0, 0, 25, 25])
    # the 48x32 mask is stretched to the 64x64 inner area: its middle [8:24, 12:36] lands on [16:48, 16:48]
    assert (masked.mask[:, 18:46, 16 + 18 : 16 + 46] == 255).all()
    assert (masked.mask[:, :14, 16:80] == 0).all() and (masked.mask[:, :, :16] == 255).all()
    assert prepare("V", mask=None, video_guide_outpainting="#0 0 25 25").mask is None  # switched off


@pytest.mark.parametrize(
    ("params", "loc", "words"),
    [
        ({"video_prompt_type": "vm"}, ("video_prompt_type",), "capital letters"),
        ({"mask_expand": 500}, ("mask_expand",), "less than or equal to 100"),
        ({"video_guide_outpainting": "0 0 20"}, ("video_guide_outpainting",), "top bottom left right"),
        ({"video_guide_outpainting": "0 0 a 20"}, ("video_guide_outpainting",), "whole percentages"),
        ({"video_guide_outpainting": "0 0 900 20"}, ("video_guide_outpainting",), "[0, 400]"),
    ],
)
def test_bad_control_params_name_the_field(params, loc, words):
    with pytest.raises(ValidationError) as error:
        VaceControlParams.model_validate(params)
    assert error.value.errors()[0]["loc"] == loc
    assert words in str(error.value)


@pytest.mark.parametrize(("letters", "words"), [("VS", "scribble"), ("VAEW", "scribble"), ("VD", "depth model"),
                                               ("VP", "pose estimator")])  # fmt: skip
def test_letters_that_cannot_be_honoured_are_refused(letters, words):
    with pytest.raises(ValidationError) as error:
        prepare(letters)
    assert error.value.errors()[0]["loc"] == ("video_prompt_type",)
    assert words in str(error.value)


def test_pose_letter_uses_the_given_estimator_on_the_masked_area():
    person = np.full((1, 96, 64, 3), 230, np.uint8)
    person[0, 10:22, 26:38] = 40  # head
    person[0, 22:60, 22:42] = 40  # body
    person[0, 60:90, 24:30] = person[0, 60:90, 34:40] = 40  # legs

    def renderer(frames):
        return np.stack([render_pose(detect_pose(frame), frame.shape[1], frame.shape[0]) for frame in frames])

    result = prepare_vace_control(
        person, None, 64, 96, VaceControlParams(video_prompt_type="VP"), pose_renderer=renderer
    )
    assert result.process == "pose"
    assert result.guide.max() > 0 and (result.guide[0, 0, 0] == 0).all()  # a skeleton on black


def test_no_letters_pass_a_finished_guide_through_unchanged():
    # internal steps (travel segments, bridges) build their guide themselves: "" must not alter it
    result = prepare("")
    assert (result.guide == GUIDE).all() and (result.mask == MASK).all() and result.process == "raw"
    assert (prepare("", mask=None).guide == GUIDE).all() and prepare("", mask=None).mask is None
