"""Catalog and params validation of the engine (no model is loaded here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from Wan2GP.catalog import Catalog, family_of_task_type, load_definition
from Wan2GP.errors import UnknownModel, UnsupportedTaskType, WeightsNotFound
from Wan2GP.params import parse_params, quantize_frames
from Wan2GP.phases import Multiplier
from Wan2GP.video import encode_png


def _error_fields(error: pytest.ExceptionInfo) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in error.value.errors()]


# ---- catalog ------------------------------------------------------------------------------------------


def test_catalog_ships_every_family_and_resolves_aliases():
    catalog = Catalog.load()
    families = {catalog.get(i).family for i in catalog.ids()}
    assert families == {
        "t2v",
        "i2v",
        "flf2v",
        "vace",
        "flux",
        "flux_kontext",
        "qwen_image",
        "qwen_image_edit",
        "z_image",
    }
    assert catalog.get("vace_14B").source == "Wan-AI/Wan2.1-VACE-14B-diffusers"
    assert catalog.get("flux_dev_kontext").pipeline == "FluxKontextPipeline"
    assert catalog.default_for("t2v").source == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert catalog.default_for("vace").id == "wan2.1-vace-1.3b"
    for tiny in ("tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-vace", "tiny-flux", "tiny-flux-kontext"):
        assert catalog.get(tiny).source.startswith("tiny:")
    with pytest.raises(UnknownModel, match="not-a-model"):
        catalog.get("not-a-model")


def test_user_models_dir_adds_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "mine.json").write_text(
        json.dumps({"id": "my-t2v", "family": "t2v", "pipeline": "WanPipeline", "source": str(tmp_path)})
    )
    override = json.loads((Catalog.load().get("tiny-t2v")).model_dump_json())
    override["defaults"]["num_inference_steps"] = 7
    (tmp_path / "tiny.json").write_text(json.dumps(override))
    monkeypatch.setenv("HWGP_MODELS_DIR", str(tmp_path))
    catalog = Catalog.load()
    assert catalog.get("my-t2v").defaults.fps == 16  # unspecified defaults filled in
    assert catalog.get("tiny-t2v").defaults.num_inference_steps == 7


def test_bad_definition_names_file_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"id": "x", "family": "sora", "pipeline": "WanPipeline", "source": "a/b"}))
    with pytest.raises(ValueError, match=r"(?s)bad\.json.*family"):
        load_definition(path)
    path.write_text(json.dumps({"id": "x", "family": "t2v", "pipeline": "NoSuchPipeline", "source": "a/b"}))
    with pytest.raises(ValueError, match="NoSuchPipeline"):
        load_definition(path)


def test_missing_weights_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HWGP_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsNotFound, match="hwgp-test/does-not-exist"):
        Catalog.load().resolve_source("hwgp-test/does-not-exist")


def test_weights_resolve_from_wan2gp_cache(tmp_path, monkeypatch):
    folder = tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B-Diffusers"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    monkeypatch.setenv("WAN2GP_CACHE", str(tmp_path))
    assert Catalog.load().resolve_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == folder.resolve()


def test_family_of_task_type():
    expected = {
        "t2v": "t2v", "t2v_22": "t2v", "i2v": "i2v", "i2v_22": "i2v", "flf2v": "flf2v", "vace": "vace",
        "vace_21": "vace", "vace_22": "vace", "flux": "flux", "magic_edit": "flux_kontext",
        "single_image": "single_image",
    }  # fmt: skip
    for task_type, family in expected.items():
        assert family_of_task_type(task_type) == family
    assert family_of_task_type("generate_video", "tiny-vace") == "vace"
    assert family_of_task_type("generate_video") == "t2v"
    with pytest.raises(UnsupportedTaskType, match="hunyuan"):
        family_of_task_type("hunyuan")


# ---- params -------------------------------------------------------------------------------------------


def test_resolution_must_be_width_x_height():
    with pytest.raises(ValidationError) as error:
        parse_params("t2v", {"resolution": "abc"})
    assert _error_fields(error) == ["resolution"]
    assert "WIDTHxHEIGHT" in str(error.value)
    with pytest.raises(ValidationError, match="resolution"):
        parse_params("t2v", {"resolution": "0x480"})
    assert parse_params("t2v", {"resolution": "832x480"}).resolution == (832, 480)
    assert parse_params("t2v", {"resolution": " 64 * 32 "}).resolution == (64, 32)


def test_video_length_range_and_quantization():
    with pytest.raises(ValidationError) as error:
        parse_params("t2v", {"video_length": -3})
    assert _error_fields(error) == ["video_length"]
    with pytest.raises(ValidationError, match="video_length"):
        parse_params("vace", {"video_length": 5000, "image_refs": [np.zeros((8, 8, 3), np.uint8)]})
    assert parse_params("t2v", {"video_length": 81}).video_length == 81
    assert parse_params("t2v", {"video_length": 10}).video_length == 9
    assert [quantize_frames(f) for f in (1, 4, 5, 8, 9, 80, 84)] == [1, 5, 5, 9, 9, 81, 85]


def test_scalar_ranges_name_their_field():
    for field, value in [
        ("seed", -2),
        ("num_inference_steps", 0),
        ("guidance_scale", -1),
        ("flow_shift", 0),
        ("sample_solver", "ddim"),
    ]:
        with pytest.raises(ValidationError) as error:
            parse_params("t2v", {field: value})
        assert _error_fields(error) == [field], field


def test_unknown_keys_are_kept_and_aliases_accepted():
    params = parse_params(
        "t2v",
        {"model_name": "tiny-t2v", "lora_names": "a, b", "lora_multipliers": "0.5 0.8", "custom_flag": 3},
    )
    assert params.model == "tiny-t2v"
    assert params.model_extra == {"custom_flag": 3}
    assert params.lora_requests() == [("a", Multiplier.constant(0.5)), ("b", Multiplier.constant(0.8))]
    params = parse_params("t2v", {"activated_loras": ["a", "b"], "loras_multipliers": [0.3]})
    assert params.lora_requests() == [("a", Multiplier.constant(0.3)), ("b", Multiplier.constant(1.0))]
    with pytest.raises(ValidationError, match="loras_multipliers"):
        parse_params("t2v", {"activated_loras": ["a"], "loras_multipliers": "1 1"})
    with pytest.raises(ValidationError, match="loras_multipliers"):
        parse_params("t2v", {"activated_loras": ["a"], "loras_multipliers": "high"})


def test_image_inputs_are_validated(tmp_path):
    with pytest.raises(ValidationError, match="image_start"):
        parse_params("i2v", {"prompt": "x"})
    with pytest.raises(ValidationError) as error:
        parse_params("i2v", {"image_start": str(tmp_path / "missing.png")})
    assert _error_fields(error) == ["image_start"]
    with pytest.raises(ValidationError, match="URL"):
        parse_params("i2v", {"image_start": "https://example.com/a.png"})
    with pytest.raises(ValidationError, match="image_end"):
        parse_params("flf2v", {"image_start": np.zeros((8, 8, 3), np.uint8)})
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(np.full((8, 10, 3), 200, np.uint8)))
    params = parse_params("i2v", {"image_start": str(path)})
    assert params.image_start.shape == (8, 10, 3) and params.image_start[0, 0, 0] == 200
    assert parse_params("i2v", {"image_start": path.read_bytes()}).image_start.shape == (8, 10, 3)


def test_vace_requires_a_guide_and_magic_edit_an_image():
    with pytest.raises(ValidationError, match="video_guide"):
        parse_params("vace", {"prompt": "x"})
    with pytest.raises(ValidationError, match="video_mask"):
        parse_params(
            "vace", {"video_mask": np.zeros((9, 8, 8), np.uint8), "image_refs": [np.zeros((8, 8, 3))]}
        )
    with pytest.raises(ValidationError, match="image_url"):
        parse_params("magic_edit", {"prompt": "make it red"})
    with pytest.raises(ValidationError, match="prompt"):
        parse_params("magic_edit", {"image_url": np.zeros((8, 8, 3), np.uint8), "prompt": ""})


def test_flux_video_length_is_an_image_count():
    assert parse_params("flux", {"video_length": 4}).video_length == 4  # not quantized
    with pytest.raises(ValidationError, match="video_length"):
        parse_params("flux", {"video_length": 0})


def test_unsupported_task_type():
    with pytest.raises(UnsupportedTaskType, match="ltxv"):
        parse_params("ltxv", {})
