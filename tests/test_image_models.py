"""Image-model task types (Qwen-Image, Qwen-Image-Edit, Z-Image Turbo) on tiny random-weight models built
with the real diffusers / transformers classes: sizes, seeds, inputs that change the output, the original's
recipes (LoRAs, prompt prefixes, green composites) and validation errors naming the field."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from Wan2GP.catalog import Catalog, family_of_task_type
from Wan2GP.engine import Engine
from Wan2GP.errors import Cancelled, UnsupportedTaskType, WeightsNotFound
from Wan2GP.image_models import green_composite, render_image
from Wan2GP.image_params import (
    ANNOTATE_LORA,
    INPAINT_LORA,
    LIGHTNING_EDIT,
    LIGHTNING_T2I,
    STYLE_LORA,
    fit_to_image,
    parse_image_params,
)
from Wan2GP.params import parse_params
from Wan2GP.tiny_image import ensure_tiny_image_models

TINY_IMAGE_DEFAULTS = {
    "qwen_image": "tiny-qwen-image-edit",  # the original runs qwen_image on the edit model
    "qwen_image_edit": "tiny-qwen-image-edit",
    "z_image": "tiny-z-image",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    os.environ["HF_HUB_OFFLINE"] = "1"
    cache = Path(os.environ.get("HWGP_TINY_DIR") or tmp_path_factory.mktemp("tiny"))
    ensure_tiny_image_models(cache)
    catalog = Catalog.load(tiny_dir=cache)
    return Engine(device="cpu", catalog=catalog, default_models=TINY_IMAGE_DEFAULTS, lora_dirs=[])


def _image(seed: int, width: int = 48, height: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(artifact) -> np.ndarray:
    assert artifact.media_type == "image/png" and artifact.filename.endswith(".png")
    return np.asarray(Image.open(io.BytesIO(artifact.data)).convert("RGB"))


def _differs(engine, task_type: str, a: dict, b: dict) -> bool:
    """Whether two tasks' images differ, compared before 8-bit encoding: on the tiny edit model an input image
    moves the output by less than one 8-bit level. Rendering ``a`` twice first shows that any difference comes
    from the params, not from nondeterminism."""
    first, _ = render_image(engine, task_type, a)
    again, _ = render_image(engine, task_type, a)
    assert np.array_equal(first, again)
    other, _ = render_image(engine, task_type, b)
    return first.shape == other.shape and not np.array_equal(first, other)


def _files(artifact) -> dict[str, float]:
    return {Path(lora["file"]).name: lora["multiplier"] for lora in artifact.metadata["loras"]}


def test_qwen_image_size_seed_and_lightning(engine):
    params = {"prompt": "a cat with a hat", "resolution": "48x32", "seed": 7, "num_inference_steps": 2}
    first = engine.generate("qwen_image", params)
    assert _png(first).shape == (32, 48, 3)
    assert first.metadata["model"] == "tiny-qwen-image-edit"
    assert _files(first) == {LIGHTNING_T2I: 1.0}  # the original's 4-step Lightning LoRA at its default
    assert np.array_equal(_png(engine.generate("qwen_image", params)), _png(first))
    other = engine.generate("qwen_image", {**params, "seed": 8})
    assert not np.array_equal(_png(other), _png(first))
    without = engine.generate("qwen_image", {**params, "lightning_lora_strength_phase_1": 0})
    assert _files(without) == {}
    assert not np.array_equal(_png(without), _png(first))


def test_qwen_image_on_the_text_to_image_model(engine):
    artifact = engine.generate(
        "qwen_image", {"prompt": "a red car", "model": "tiny-qwen-image", "resolution": "32x48", "steps": 2}
    )
    assert _png(artifact).shape == (48, 32, 3)
    assert artifact.metadata["family"] == "qwen_image"
    with pytest.raises(ValueError, match="num_inference_steps: .* at least 2 steps"):
        engine.generate("qwen_image", {"prompt": "a red car", "model": "tiny-qwen-image", "steps": 1})


def test_z_image_turbo_size_and_seed(engine):
    params = {"prompt": "a dog on a beach", "resolution": "64x32", "seed": 3, "num_inference_steps": 2}
    first = engine.generate("z_image_turbo", params)
    assert _png(first).shape == (32, 64, 3)
    assert first.metadata["guidance"] == 0.0 and first.metadata["loras"] == []
    assert np.array_equal(_png(engine.generate("z_image_turbo", params)), _png(first))
    assert not np.array_equal(_png(engine.generate("z_image_turbo", {**params, "seed": 4})), _png(first))


def test_z_image_i2i_depends_on_the_input_and_strength(engine):
    # 4 steps at strength 0.7 skip the first step (the original's default strength); 0.3 skips two.
    params = {"prompt": "a cat", "image_size": "custom", "resolution": "48x32", "seed": 5, "steps": 4}
    a = engine.generate("z_image_turbo_i2i", {**params, "image": _image(1)})
    b = engine.generate("z_image_turbo_i2i", {**params, "image_url": _image(2)})
    assert _png(a).shape == _png(b).shape == (32, 48, 3)
    assert not np.array_equal(_png(a), _png(b))
    weaker = engine.generate("z_image_turbo_i2i", {**params, "image": _image(1), "denoise_strength": 0.3})
    assert not np.array_equal(_png(weaker), _png(a))


def test_z_image_i2i_auto_size_follows_the_input():
    parsed = parse_image_params("z_image_turbo_i2i", {"image": _image(1, 64, 32), "resolution": "48x32"})
    assert not parsed.uses_resolution and parsed.denoising_strength == 0.7  # the original's default
    assert "resolution" in parsed.ignored_params()
    # ~1 MP at the input's 2:1 aspect, sides multiples of 16.
    assert fit_to_image(1024, 1024, parsed.image, 16) == (1456, 720)


def test_qwen_image_edit_depends_on_the_input(engine):
    params = {
        "prompt": "add a hat",
        "resolution": "48x32",
        "seed": 11,
        "steps": 2,
        "system_prompt": "x",
        "foo": 1,
    }
    artifact = engine.generate("qwen_image_edit", {**params, "image": _image(1)})
    assert _png(artifact).shape == (32, 48, 3)
    assert _files(artifact) == {LIGHTNING_EDIT: 0.85}
    assert artifact.metadata["ignored_params"] == {
        "system_prompt": "the original passes it to its Qwen pipeline, which does not use it",
        "foo": "unknown key",
    }
    assert _differs(
        engine, "qwen_image_edit", {**params, "image": _image(1)}, {**params, "image_url": _image(2)}
    )


def test_edit_output_takes_the_input_aspect():
    # The original's "K" sizing: the requested area at the input image's aspect ratio.
    assert fit_to_image(48, 32, _image(1, 48, 32), 16) == (48, 32)
    assert fit_to_image(64, 64, _image(1, 32, 64), 16) == (48, 96)


def test_image_inpaint_depends_on_the_mask(engine):
    left = np.zeros((32, 48, 3), dtype=np.uint8)
    left[:, :16] = 255
    right = np.zeros((32, 48, 3), dtype=np.uint8)
    right[:, 32:] = 255
    params = {"prompt": "a flower", "image_url": _image(3), "resolution": "48x32", "seed": 2, "steps": 2}
    artifact = engine.generate("image_inpaint", {**params, "mask_url": left})
    assert _png(artifact).shape == (32, 48, 3)
    assert _files(artifact) == {LIGHTNING_EDIT: 0.75, INPAINT_LORA: 1.0}
    assert _differs(engine, "image_inpaint", {**params, "mask_url": left}, {**params, "mask_url": right})


def test_green_composite_marks_the_white_area():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    mask = np.zeros((10, 15, 3), dtype=np.uint8)  # resized to the image
    mask[:, :5] = 255
    composite = green_composite(image, mask)
    assert (composite[:, :8] == (0, 255, 0)).all()
    assert (composite[:, 12:] == 100).all()


def test_annotated_image_edit_uses_its_lora(engine):
    mask = np.zeros((32, 48, 3), dtype=np.uint8)
    mask[8:24, 8:40] = 255
    artifact = engine.generate(
        "annotated_image_edit",
        {"prompt": "make it blue", "image": _image(4), "mask_url": mask, "resolution": "48x32", "steps": 2,
         "lightning_lora_strength_phase_1": 0.5},
    )  # fmt: skip
    assert _png(artifact).shape == (32, 48, 3)
    assert _files(artifact) == {LIGHTNING_EDIT: 0.5, ANNOTATE_LORA: 1.0}


def test_qwen_image_style_prompt_and_loras(engine):
    artifact = engine.generate(
        "qwen_image_style",
        {"prompt": "a castle", "style_reference_image": _image(5), "style_reference_strength": 1.1,
         "subject_description": "knight", "resolution": "48x32", "steps": 2},
    )  # fmt: skip
    assert _png(artifact).shape == (32, 48, 3)
    assert artifact.metadata["prompt"] == "In the style of this image, a castle"
    assert _files(artifact) == {LIGHTNING_EDIT: 0.85, STYLE_LORA: 1.1}
    assert "subject_description" in artifact.metadata["ignored_params"]
    subject = parse_image_params(
        "qwen_image_style",
        {"prompt": "at sea", "subject_strength": 1.0, "subject_description": "boat", "in_this_scene": True},
    )
    assert subject.styled_prompt() == "Make an image of this boat in this scene: at sea"


def test_progress_and_cancel(engine):
    steps = []
    engine.generate(
        "z_image_turbo", {"prompt": "a tree", "steps": 2}, progress=lambda s, t: steps.append((s, t))
    )
    assert steps == [(1, 2), (2, 2)]
    seen = []
    with pytest.raises(Cancelled, match="step 1/3"):
        engine.generate("qwen_image", {"prompt": "a tree", "steps": 3}, should_cancel=lambda: bool(seen),
                        progress=lambda s, t: seen.append(s))  # fmt: skip


@pytest.mark.parametrize(
    ("task_type", "params", "field", "problem"),
    [
        ("qwen_image_edit", {"prompt": "x"}, "image", "required"),
        ("image_inpaint", {"image_url": np.zeros((8, 8, 3), np.uint8)}, "mask_url", "required"),
        ("annotated_image_edit", {"mask_url": np.zeros((8, 8, 3), np.uint8)}, "image_url", "required"),
        ("z_image_turbo_i2i", {"prompt": "x"}, "image", "required"),
        ("qwen_image", {"prompt": ""}, "prompt", "at least 1 character"),
        ("z_image_turbo", {"prompt": "x", "resolution": "big"}, "resolution", "WIDTHxHEIGHT"),
        ("qwen_image", {"prompt": "x", "hires_scale": 2.0}, "hires_scale", "hires fix"),
        ("qwen_image", {"prompt": "x", "phase_config": {"steps_per_phase": [2, 2]}}, "phase_config", "phases"),
        ("qwen_image", {"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
        ("qwen_image", {"prompt": "x", "sample_solver": "unipc"}, "sample_solver", "lightning"),
        ("qwen_image", {"prompt": "x", "video_length": 5}, "video_length", "one image"),
        ("qwen_image", {"prompt": "x", "loras": [{"path": "a", "scale": "big"}]}, "loras", "scale"),
        ("z_image_turbo", {"prompt": "x", "activated_loras": ["a"], "loras_multipliers": "1;0"},
         "loras_multipliers", "phase"),
        ("z_image_turbo_i2i", {"image": np.zeros((8, 8, 3), np.uint8), "strength": 1.5}, "strength", "1"),
        ("qwen_image_edit", {"image": "/no/such.png"}, "image", "no such file"),
    ],
)  # fmt: skip
def test_bad_params_name_the_field(task_type, params, field, problem):
    with pytest.raises(ValidationError) as error:
        parse_params(task_type, params)  # the path the API validates with
    message = str(error.value)
    assert field in message and problem in message


def test_refused_keys_with_empty_values_are_accepted():
    parsed = parse_image_params("qwen_image", {"prompt": "x", "hires_scale": None, "use_causvid_lora": False})
    assert parsed.ignored_params() == {}


def test_routing_and_wrong_models(engine):
    assert family_of_task_type("image_inpaint") == "qwen_image_edit"
    assert family_of_task_type("z_image_turbo_i2i") == "z_image"
    with pytest.raises(UnsupportedTaskType, match="z_image model"):
        engine.generate("qwen_image_edit", {"image": _image(1), "model": "tiny-z-image"})
    with pytest.raises(UnsupportedTaskType, match="qwen_image model"):
        engine.generate("qwen_image_edit", {"image": _image(1), "model": "qwen_image_20B"})
    with pytest.raises(WeightsNotFound, match="no-such-lora"):
        engine.generate("z_image_turbo", {"prompt": "x", "activated_loras": ["no-such-lora"], "steps": 1})


@pytest.mark.parametrize("model_id", ["tiny-qwen-image", "tiny-qwen-image-edit"])
def test_tiny_qwen_tokenizer_counts_template_tokens_like_the_real_one(engine, model_id):
    # The pipelines drop as many leading hidden states as the real tokenizer makes of their template's
    # prefix; the tiny tokenizer must make exactly as many, or prompts would be cut or padded with the template.
    engine.load(model_id)
    pipe = engine.pipe
    prefix = pipe.prompt_template_encode.split("{}")[0].replace(
        "<|vision_start|><|image_pad|><|vision_end|>", ""
    )
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx
