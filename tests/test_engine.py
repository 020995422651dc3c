"""The engine end to end on tiny random-weight models, through its public API only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from Wan2GP.catalog import Catalog
from Wan2GP.engine import Cancelled, Engine
from Wan2GP.errors import UnknownModel, UnsupportedTaskType, WeightsNotFound
from Wan2GP.tiny import TINY_WAN_LORA, ensure_tiny_models
from Wan2GP.video import decode_video, load_image, probe_video

# The engine fixtures (tiny models built once per session) live in tests/engine_fixtures.py.
pytest_plugins = ["engine_fixtures"]


def random_image(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_video(seed: int, frames: int = 9, height: int = 32, width: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def _frames(artifact) -> np.ndarray:
    if artifact.media_type == "image/png":
        return load_image(artifact.data)[None]
    return decode_video(artifact.data)[0]


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---- each family -----------------------------------------------------------------------------------------


def test_t2v_video_decodes_with_asked_size_and_metadata(engine):
    artifact = engine.generate(
        "t2v", {"prompt": "a cat walking", "video_length": 10, "resolution": "48x32", "seed": 3}, task_id="t1"
    )
    assert artifact.filename == "t1.mp4" and artifact.media_type == "video/mp4"
    info = probe_video(artifact.data)
    assert (info["frames"], info["width"], info["height"]) == (9, 48, 32)  # 10 frames -> 4n+1 = 9
    meta = artifact.metadata
    assert (meta["frames"], meta["width"], meta["height"], meta["fps"]) == (9, 48, 32, 8)
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["model"]) == (3, 2, 5.0, "tiny-t2v")
    assert set(meta["timings"]) == {"load", "encode_prompt", "denoise", "decode", "encode_file"}
    assert all(v >= 0 for v in meta["timings"].values())
    json.dumps(meta)  # storable as task metadata


def test_tiny_models_run_at_the_sizes_the_api_takes(engine):
    """The demo's models take any size a real model does: 832 wide is 52 patches across (the tiny models once
    had positions for 32, and failed deep in the transformer with a reshape error)."""
    params = {
        "prompt": "wide",
        "video_length": 5,
        "resolution": "832x480",
        "seed": 1,
        "num_inference_steps": 1,
    }
    artifact = engine.generate("t2v", params, task_id="wide")
    info = probe_video(artifact.data)
    assert (info["frames"], info["width"], info["height"]) == (5, 832, 480)


def test_same_seed_same_bytes_other_seed_other_frames(engine):
    params = {"model": "tiny-t2v", "prompt": "a dog running", "seed": 11}
    first = engine.generate("t2v", params)
    again = engine.generate("t2v", params)
    other = engine.generate("t2v", {**params, "seed": 12})
    assert first.data == again.data
    assert _diff(_frames(first), _frames(other)) > 1.0


def test_random_seed_is_reported_and_reproduces(engine):
    artifact = engine.generate("t2v", {"prompt": "a bird", "seed": -1})
    seed = artifact.metadata["seed"]
    assert 0 <= seed < 2**32
    assert engine.generate("t2v", {"prompt": "a bird", "seed": seed}).data == artifact.data


def test_prompt_changes_the_output(engine):
    a = engine.generate("t2v", {"prompt": "a red car in the city", "seed": 1})
    b = engine.generate("t2v", {"prompt": "a blue boat on the lake", "seed": 1})
    assert _diff(_frames(a), _frames(b)) > 0.5


def test_i2v_depends_on_its_image(engine):
    params = {"prompt": "a dog", "seed": 5, "image_start": random_image(1)}
    a = engine.generate("i2v", params)
    b = engine.generate("i2v", {**params, "image_start": random_image(2)})
    assert a.metadata["model"] == "tiny-i2v"
    assert probe_video(a.data)["frames"] == 9
    assert _diff(_frames(a), _frames(b)) > 0.5


def test_flf2v_and_i2v_with_last_frame(engine):
    params = {"prompt": "a dog", "seed": 5, "image_start": random_image(1), "image_end": random_image(3)}
    a = engine.generate("flf2v", params)
    b = engine.generate("i2v", params)  # an image_end makes an i2v task first-last-frame
    c = engine.generate("flf2v", {**params, "image_end": random_image(4)})
    assert a.metadata["model"] == b.metadata["model"] == "tiny-flf2v"
    assert a.data == b.data
    assert _diff(_frames(a), _frames(c)) > 0.5
    with pytest.raises(UnsupportedTaskType, match="image_end"):
        engine.generate("i2v", {**params, "model": "tiny-i2v"})


def test_vace_guide_mask_and_refs(engine):
    guide = random_video(7, frames=13)
    mask = np.zeros((13, 32, 32), np.uint8)
    mask[4:] = 255  # keep the first 4 frames, generate the rest
    params = {
        "prompt": "a dog",
        "seed": 2,
        "video_guide": guide,
        "video_mask": mask,
        "control_net_weight": 1.0,
    }
    a = engine.generate("vace", params)
    assert probe_video(a.data)["frames"] == 13  # the guide's length (already 4n+1)
    b = engine.generate("vace", {**params, "video_guide": random_video(8, frames=13)})
    assert _diff(_frames(a), _frames(b)) > 0.5
    refs = engine.generate("vace_21", {**params, "image_refs": [random_image(9)], "video_length": 9})
    assert probe_video(refs.data)["frames"] == 9
    assert _diff(_frames(refs), _frames(a)[:9]) > 0.1
    with pytest.raises(ValidationError, match="video_guide"):
        engine.generate("vace", {"prompt": "a dog"})


def test_vace_conditioning_from_tensors_equals_diffusers_pil_path(engine):
    """run_vace hands the guide and mask to the pipeline as tensors made where it runs (video_tensor); diffusers'
    own path from PIL frames converts each frame on the CPU. Both must give the same conditioning, bit for bit."""
    from PIL import Image

    from Wan2GP.pipelines import video_tensor

    engine.load("tiny-vace")
    pipe = engine.pipe
    guide = random_video(11, frames=9, height=48, width=64)
    mask = np.repeat(np.random.default_rng(12).choice([0, 255], (9, 48, 64, 1)).astype(np.uint8), 3, axis=-1)
    size = {"height": 48, "width": 64, "num_frames": 9, "dtype": torch.float32, "device": torch.device("cpu")}
    from_pil = pipe.preprocess_conditions(
        video=[Image.fromarray(f) for f in guide], mask=[Image.fromarray(f) for f in mask], **size
    )
    from_tensors = pipe.preprocess_conditions(
        video=video_tensor(guide, "cpu"), mask=video_tensor(mask, "cpu"), **size
    )
    for mine, theirs in zip(from_tensors[:2], from_pil[:2], strict=True):
        assert mine.shape == theirs.shape == (1, 3, 9, 48, 64)
        assert torch.equal(mine, theirs)
    assert from_pil[0].min() < -0.9 and from_pil[0].max() > 0.9  # the guide in [-1, 1]
    assert set(from_pil[1].unique().tolist()) == {0.0, 1.0}  # the mask in {0, 1}


def test_unit_levels_are_exact_by_division_and_by_table():
    """The table a GPU uses gives what dividing on the CPU gives (and numpy, which diffusers' PIL path uses)."""
    from Wan2GP.pipelines import unit_levels

    levels = torch.arange(256, dtype=torch.uint8).reshape(2, 8, 16)
    divided, looked_up = unit_levels(levels, lookup=False), unit_levels(levels, lookup=True)
    assert divided.dtype == looked_up.dtype == torch.float32 and looked_up.shape == levels.shape
    assert torch.equal(divided, looked_up)
    assert np.array_equal(looked_up.numpy().ravel(), np.arange(256, dtype=np.float32) / np.float32(255))
    assert looked_up.min() == 0.0 and looked_up.max() == 1.0


def test_flux_images(engine):
    one = engine.generate("flux", {"prompt": "a red car", "seed": 1, "resolution": "48x32"}, task_id="f")
    assert one.filename == "f.png" and one.media_type == "image/png"
    assert load_image(one.data).shape == (32, 48, 3)
    several = engine.generate("flux", {"prompt": "a red car", "seed": 1, "video_length": 3})
    assert several.metadata["frames"] == 3 and probe_video(several.data)["frames"] == 3


def test_magic_edit_runs_flux_kontext(engine):
    params = {"image_url": random_image(5, 64, 64), "prompt": "make it red", "resolution": "32x32", "seed": 9}
    edit = engine.generate("magic_edit", params, task_id="e")
    assert edit.filename == "e.png" and load_image(edit.data).shape == (32, 32, 3)
    assert edit.metadata["model"] == "tiny-flux-kontext" and edit.metadata["loras"] == []
    other = engine.generate("magic_edit", {**params, "image_url": random_image(6, 64, 64)})
    assert _diff(_frames(edit), _frames(other)) > 0  # the edited image conditions the output
    in_scene = engine.generate("magic_edit", {**params, "in_scene": True})
    assert [lora["file"].endswith("InScene-v1.0.safetensors") for lora in in_scene.metadata["loras"]] == [
        True
    ]
    assert in_scene.data != edit.data
    assert engine.generate("magic_edit", params).data == edit.data  # the in-scene LoRA is gone again


def test_single_image_is_one_png_frame(engine):
    artifact = engine.generate("single_image", {"prompt": "a cat", "seed": 4, "video_length": 33})
    assert artifact.media_type == "image/png" and artifact.metadata["frames"] == 1
    assert load_image(artifact.data).shape == (32, 32, 3)
    # Sizes round down to the model's multiple (16 for Wan).
    odd = engine.generate("single_image", {"prompt": "a cat", "seed": 4, "resolution": "50x40"})
    assert load_image(odd.data).shape == (32, 48, 3)
    flux = engine.generate("single_image", {"prompt": "a cat", "seed": 4, "model": "tiny-flux"})
    assert flux.metadata["model"] == "tiny-flux" and flux.media_type == "image/png"


def test_generate_video_routes_by_model_family(engine):
    vace = engine.generate(
        "generate_video", {"model": "tiny-vace", "video_guide": random_video(1), "seed": 1}
    )
    assert vace.metadata["family"] == "vace"
    assert engine.generate("generate_video", {"seed": 1}).metadata["model"] == "tiny-t2v"
    with pytest.raises(ValidationError, match="image_start"):
        engine.generate("generate_video", {"model": "tiny-i2v"})


def test_wrong_model_or_task(engine):
    with pytest.raises(UnsupportedTaskType, match="tiny-flux"):
        engine.generate("t2v", {"model": "tiny-flux"})
    with pytest.raises(UnknownModel, match="nope"):
        engine.generate("t2v", {"model": "nope"})
    with pytest.raises(UnsupportedTaskType):
        engine.generate("hunyuan", {})
    with pytest.raises(WeightsNotFound, match="no-such-lora"):
        engine.generate("t2v", {"activated_loras": ["no-such-lora"]})


# ---- loading ------------------------------------------------------------------------------------------


def test_model_stays_loaded_between_tasks(fresh_engine):
    assert fresh_engine.loaded_model_id is None
    first = fresh_engine.load("tiny-t2v")
    assert not first.reused and "transformer" in first.components_loaded and first.memory_bytes > 0
    fresh_engine.generate("t2v", {"seed": 1})
    fresh_engine.generate("t2v", {"seed": 2, "prompt": "other"})
    assert fresh_engine.load_count == 1
    again = fresh_engine.load("tiny-t2v")
    assert again.reused and again.components_loaded == [] and fresh_engine.load_count == 1


def test_model_switch_keeps_shared_components(fresh_engine):
    fresh_engine.generate("t2v", {"seed": 1})
    pipe = fresh_engine.pipe
    text_encoder, vae, transformer = pipe.text_encoder, pipe.vae, pipe.transformer
    fresh_engine.generate("vace", {"seed": 1, "video_guide": random_video(3)})
    assert fresh_engine.load_count == 2 and fresh_engine.loaded_model_id == "tiny-vace"
    assert fresh_engine.pipe.text_encoder is text_encoder and fresh_engine.pipe.vae is vae
    assert fresh_engine.pipe.transformer is not transformer
    report = fresh_engine.load("tiny-t2v")
    assert report.components_loaded == ["scheduler", "transformer"]  # the scheduler is only a config
    assert set(report.components_reused) == {"text_encoder", "tokenizer", "vae"}
    assert fresh_engine.load_count == 3
    # Different weights are never shared: Flux keeps nothing of Wan.
    assert fresh_engine.load("tiny-flux").components_reused == []


def test_switching_back_gives_the_same_output(fresh_engine):
    before = fresh_engine.generate("t2v", {"seed": 21})
    fresh_engine.generate("flux", {"seed": 21})
    assert fresh_engine.generate("t2v", {"seed": 21}).data == before.data


def test_memory_profiles(catalog):
    with pytest.raises(ValueError, match="memory_profile"):
        Engine(memory_profile="everything", catalog=catalog)
    engine = Engine(device="cuda", memory_profile="cpu", catalog=catalog)
    assert engine.device == "cpu"  # the cpu profile wins over the device
    outputs = []
    for profile in ("resident", "model_offload", "group_offload", "cpu"):
        engine = Engine(device="cpu", memory_profile=profile, catalog=catalog)
        report = engine.load("tiny-t2v")
        assert report.memory_bytes == sum(
            p.numel() * p.element_size()
            for m in engine.pipe.components.values()
            if hasattr(m, "parameters")
            for p in list(m.parameters()) + list(m.buffers())
        )
        outputs.append(engine.generate("t2v", {"model": "tiny-t2v", "seed": 1}).data)
    assert len(set(outputs)) == 1


# ---- LoRAs ----------------------------------------------------------------------------------------------


def test_lora_applies_then_leaves(engine, tiny_dir):
    lora = TINY_WAN_LORA  # a name in the tiny models' LoRA folder
    params = {"model": "tiny-t2v", "prompt": "a cat", "seed": 6}
    baseline = engine.generate("t2v", params)
    with_lora = engine.generate("t2v", {**params, "activated_loras": [lora], "loras_multipliers": "1.0"})
    assert with_lora.metadata["loras"] == [{"file": lora, "multiplier": 1.0}]
    assert _diff(_frames(with_lora), _frames(baseline)) > 0.5
    weaker = engine.generate("t2v", {**params, "additional_loras": {lora: 0.3}})
    assert weaker.data not in (with_lora.data, baseline.data)
    after = engine.generate("t2v", params)
    assert after.metadata["loras"] == [] and after.data == baseline.data


def test_lora_by_name_from_lora_dir(catalog, tiny_dir):
    engine = Engine(device="cpu", catalog=catalog, lora_dirs=[tiny_dir / "loras"])
    artifact = engine.generate("t2v", {"model": "tiny-t2v", "lora_names": "tiny-wan-lora", "seed": 1})
    assert artifact.metadata["loras"][0]["file"].endswith(TINY_WAN_LORA)


def test_lora_flags_use_presets_unless_built_in(engine, tiny_dir, tmp_path, monkeypatch):
    causvid = engine.generate("t2v", {"model": "tiny-t2v", "use_causvid_lora": True, "seed": 1})
    meta = causvid.metadata
    assert (meta["steps"], meta["guidance"], meta["flow_shift"]) == (9, 1.0, 1.0)
    assert meta["loras"][0]["file"].endswith("Wan21_CausVid_14B_T2V_lora_rank32.safetensors")
    light = engine.generate("t2v", {"model": "tiny-t2v", "use_lighti2x_lora": True, "num_inference_steps": 3})
    assert (light.metadata["steps"], light.metadata["flow_shift"]) == (3, 5.0)  # explicit params win

    # A model whose JSON lists the LoRA keeps the JSON's settings.
    definition = json.loads(Catalog.load().get("tiny-t2v").model_dump_json())
    definition.update(id="tiny-t2v-causvid", aliases=[], default=False)
    definition["loras"] = [{"file": "Wan21_CausVid_14B_T2V_lora_rank32.safetensors", "preset": "causvid"}]
    definition["defaults"].update(num_inference_steps=3, guidance_scale=1.5)
    (tmp_path / "causvid.json").write_text(json.dumps(definition))
    monkeypatch.setenv("HWGP_MODELS_DIR", str(tmp_path))
    built_in = Engine(device="cpu", catalog=Catalog.load(tiny_dir=tiny_dir.parent), lora_dirs=[])
    meta = built_in.generate(
        "t2v", {"model": "tiny-t2v-causvid", "use_causvid_lora": True, "seed": 1}
    ).metadata
    assert (meta["steps"], meta["guidance"], meta["flow_shift"]) == (3, 1.5, 3.0)
    assert len(meta["loras"]) == 1


# ---- progress and cancel ------------------------------------------------------------------------------


def test_progress_reports_every_step(engine):
    seen = []
    engine.generate("t2v", {"seed": 1, "num_inference_steps": 3}, progress=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cancel_stops_at_the_next_step(engine):
    seen = []
    with pytest.raises(Cancelled, match="step 1/4"):
        engine.generate(
            "t2v",
            {"seed": 1, "num_inference_steps": 4},
            progress=lambda s, n: seen.append(s),
            should_cancel=lambda: len(seen) >= 1,
        )
    assert seen == [1]
    with pytest.raises(Cancelled):
        engine.generate("flux", {"seed": 1}, should_cancel=lambda: True)
    # The engine is still usable, and the cancelled run left nothing behind.
    assert engine.generate("t2v", {"seed": 1}).data == engine.generate("t2v", {"seed": 1}).data


# ---- tiny models --------------------------------------------------------------------------------------


def test_tiny_models_are_built_once_and_load_with_the_real_classes(tiny_dir):
    from diffusers import WanPipeline
    from transformers import AutoTokenizer

    stamp = (tiny_dir / "t2v" / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_models(tiny_dir.parent) == tiny_dir
    assert (tiny_dir / "t2v" / "model_index.json").stat().st_mtime_ns == stamp
    pipe = WanPipeline.from_pretrained(str(tiny_dir / "t2v"), local_files_only=True)
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 100_000
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir / "t2v" / "tokenizer"))
    ids = tokenizer("a cat walking").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
