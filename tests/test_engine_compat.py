"""The original's payload keys: aliases, keys refused with a reason, keys reported as ignored."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from Wan2GP.params import IGNORED_KEYS, REFUSED_KEYS, parse_params

GUIDE = np.full((9, 8, 8, 3), 127, np.uint8)
MASK = np.zeros((9, 8, 8), np.uint8)
REF = np.zeros((8, 8, 3), np.uint8)


def test_top_level_aliases_of_the_original():
    params = parse_params("t2v", {"steps": 7, "num_frames": 29, "seed_to_use": 42, "model_name": "tiny-t2v"})
    assert (params.num_inference_steps, params.video_length, params.seed, params.model) == (
        7,
        29,
        42,
        "tiny-t2v",
    )
    # the canonical name wins over its alias, as in the original (num_inference_steps or steps)
    assert parse_params("t2v", {"steps": 7, "num_inference_steps": 3}).num_inference_steps == 3
    assert parse_params("i2v", {"image": REF}).image_start.shape == (8, 8, 3)
    assert parse_params("t2v", {"denoise_strength": 1.0}).denoising_strength == 1.0
    assert parse_params("t2v", {"sample_solver": ""}).sample_solver is None  # "" = the model's default
    assert parse_params("t2v", {"steps": 7}).ignored_params() == {}


def test_output_changing_keys_are_refused_naming_field_and_reason():
    for key, value in [
        ("use_uni3c", True),
        ("structure_video_path", "/tmp/guide.mp4"),
        ("structure_videos", [{"path": "x"}]),
        ("enhance_prompt", True),
        ("repeat_generation", 2),
    ]:
        with pytest.raises(ValidationError) as error:
            parse_params("t2v", {key: value, "prompt": "x"})
        assert [(e["loc"], e["msg"]) for e in error.value.errors()] == [((key,), REFUSED_KEYS[key])], key
    with pytest.raises(ValidationError, match="uni3c needs its guidance weights"):
        parse_params("vace", {"video_guide": GUIDE, "use_uni3c": True})
    with pytest.raises(ValidationError) as error:
        parse_params("t2v", {"denoising_strength": 0.7})
    assert [e["loc"] for e in error.value.errors()] == [("denoising_strength",)]
    assert "video-to-video" in str(error.value)


def test_keys_asking_for_nothing_and_unknown_keys_are_reported_ignored():
    params = parse_params(
        "t2v",
        {
            "use_uni3c": False,
            "uni3c_strength": 1.0,
            "enhance_prompt": False,
            "repeat_generation": 1,
            "debug_mode_enabled": True,
            "show_input_images": True,
            "my_flag": 3,
        },
    )
    ignored = params.ignored_params()
    assert set(ignored) == {
        "use_uni3c", "uni3c_strength", "enhance_prompt", "repeat_generation", "debug_mode_enabled",
        "show_input_images", "my_flag",
    }  # fmt: skip
    assert ignored["uni3c_strength"] == IGNORED_KEYS["uni3c_strength"]
    assert "asks for nothing" in ignored["use_uni3c"]
    assert ignored["my_flag"] == "unknown key: not a parameter of Video tasks"


def test_video_prompt_type_letters_select_the_inputs():
    params = parse_params(
        "vace", {"video_guide": GUIDE, "video_mask": MASK, "image_refs": [REF], "video_prompt_type": "VM"}
    )
    assert params.video_mask is not None and params.image_refs == []  # no "I": the refs are not used
    assert set(params.ignored_params()) == {"image_refs"}
    inverted = parse_params("vace", {"video_guide": GUIDE, "video_mask": MASK, "video_prompt_type": "VMN"})
    assert inverted.video_mask.min() == 255  # N inverts the mask
    dropped = parse_params("vace", {"video_guide": GUIDE, "video_mask": MASK, "video_prompt_type": "V"})
    assert dropped.video_mask is None and "video_mask" in dropped.ignored_params()
    with pytest.raises(ValidationError, match=r"P \(pose\).*not installed"):
        parse_params("vace", {"video_guide": GUIDE, "video_prompt_type": "PV"})
    with pytest.raises(ValidationError, match="letters 'Z' are not supported"):
        parse_params("vace", {"video_guide": GUIDE, "video_prompt_type": "VZ"})
    with pytest.raises(ValidationError, match="video_guide: required"):  # "I" only, and no refs
        parse_params("vace", {"video_guide": GUIDE, "video_prompt_type": "I"})
    weight2 = parse_params("vace", {"video_guide": GUIDE, "control_net_weight2": 0.5}).ignored_params()
    assert "second VACE control stream" in weight2["control_net_weight2"]
